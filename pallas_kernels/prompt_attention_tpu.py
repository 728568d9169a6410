"""Causal attention of a prompt over itself on a TPU: a Pallas (Mosaic TPU) flash kernel.

The prefill's attention (`kivi_jax.attention.prompt_attention`, whose jnp path is
the reference) without `[T, T]` scores: the grid walks each query block's key
blocks in order, an online softmax in VMEM scratch, key blocks wholly past the
diagonal, the row's length or the window skipped (and not fetched again: their
index names the nearest block read). Each query head reads its kv head's
blocks (GQA). Row lengths arrive by scalar prefetch.

Verified in TPU interpret mode and by Pallas's TPU lowering on a CPU only (no TPU
was available).

Shapes (B batch, T tokens, Hq query heads over Hkv kv heads, D head dim):
  q        [B, T, Hq, D]    (RoPE applied, unscaled)
  k, v     [B, T, Hkv, D]
  n_valid  [B] int32: row b's real tokens are its first n_valid[b]
Returns `[B, T, Hq, D]` in q's dtype; rows past `n_valid` are meaningless.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from kivi_jax.pallas_kernels.common import MASK_VALUE as _NEG

BLOCK = 128  # query and key tokens a block (whole prompts of up to 128 in one)


def _kernel(n_ref, q_ref, k_ref, v_ref, o_ref, m_sc, l_sc, acc_sc, *, block: int,
            sm_scale: float, window: int | None):
  b, qi, ki = pl.program_id(0), pl.program_id(2), pl.program_id(3)
  n = n_ref[b]
  q0, k0 = qi * block, ki * block

  @pl.when(ki == 0)
  def _init():
    m_sc[...] = jnp.full(m_sc.shape, _NEG, jnp.float32)
    l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
    acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

  # Whether some query of the block sees some key of this key block.
  seen = (k0 <= q0 + block - 1) & (k0 < n)
  if window is not None:
    seen &= k0 + block - 1 > q0 - window

  @pl.when(seen)
  def _step():
    s = jax.lax.dot_general(q_ref[...], k_ref[...], (((1,), (1,)), ((), ())),
                            preferred_element_type=jnp.float32) * sm_scale
    q_pos = q0 + jax.lax.broadcasted_iota(jnp.int32, (block, 1), 0)
    k_pos = k0 + jax.lax.broadcasted_iota(jnp.int32, (1, block), 1)
    # Causal: a real row (q < n) sees real keys only; later rows are meaningless.
    visible = k_pos <= q_pos
    if window is not None:
      visible &= k_pos > q_pos - window
    m_prev = m_sc[...]
    m_new = jnp.maximum(m_prev, jnp.max(jnp.where(visible, s, _NEG), axis=1, keepdims=True))
    p = jnp.where(visible, jnp.exp(s - m_new), 0.0)
    corr = jnp.exp(m_prev - m_new)
    l_sc[...] = l_sc[...] * corr + jnp.sum(p, axis=1, keepdims=True)
    acc_sc[...] = acc_sc[...] * corr + jax.lax.dot_general(
        p.astype(v_ref.dtype), v_ref[...], (((1,), (0,)), ((), ())),
        preferred_element_type=jnp.float32)
    m_sc[...] = m_new

  @pl.when(ki == pl.num_programs(3) - 1)
  def _finish():
    l = l_sc[...]
    o_ref[...] = (acc_sc[...] / jnp.where(l > 0, l, 1.0)).astype(o_ref.dtype)


@functools.partial(jax.jit, static_argnames=("sliding_window", "interpret"))
def prompt_attention(q, k, v, n_valid, *, sliding_window: int | None = None,
                     interpret=False):
  """`[B, T, Hq, D]`: each token's causal attention over its row's first
  `n_valid` tokens (the module doc). `interpret`: False on a TPU, or
  `pltpu.InterpretParams(...)` elsewhere."""
  b, t, hq, d = q.shape
  hkv = k.shape[2]
  if hq % hkv:
    raise ValueError(f"query heads ({hq}) must be a multiple of kv heads ({hkv})")
  rep = hq // hkv
  # A block of whole 8-row tiles, or the whole (padded) prompt.
  block = min(BLOCK, -(-t // 8) * 8)
  tp = -(-t // block) * block
  nb = tp // block
  pad = lambda x: jnp.pad(x, ((0, 0), (0, tp - t), (0, 0), (0, 0))).swapaxes(1, 2)  # noqa: E731

  def kv_block(i, h, qi, ki, n_ref):
    # A skipped block (past the diagonal or the row's length, before the window)
    # names the nearest block read instead, so it is not fetched again.
    last = jnp.maximum(jnp.minimum(qi, (n_ref[i] - 1) // block), 0)
    first = 0 if sliding_window is None else jnp.maximum(
        (qi * block - sliding_window + 1) // block, 0)
    return i, h // rep, jnp.clip(ki, jnp.minimum(first, last), last), 0

  spec = lambda index: pl.BlockSpec((None, None, block, d), index)  # noqa: E731
  kernel = functools.partial(_kernel, block=block, sm_scale=1.0 / math.sqrt(d),
                             window=sliding_window)
  out = pl.pallas_call(
      kernel,
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=1,
          grid=(b, hq, nb, nb),
          in_specs=[spec(lambda i, h, qi, ki, n_ref: (i, h, qi, 0)), spec(kv_block),
                    spec(kv_block)],
          out_specs=spec(lambda i, h, qi, ki, n_ref: (i, h, qi, 0)),
          scratch_shapes=[pltpu.VMEM((block, 1), jnp.float32),
                          pltpu.VMEM((block, 1), jnp.float32),
                          pltpu.VMEM((block, d), jnp.float32)]),
      out_shape=jax.ShapeDtypeStruct((b, hq, tp, d), q.dtype),
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
      interpret=interpret,
      name="kivi_prompt_attention_tpu",
  )(n_valid.astype(jnp.int32), pad(q), pad(k), pad(v))
  return out.swapaxes(1, 2)[:, :t]
