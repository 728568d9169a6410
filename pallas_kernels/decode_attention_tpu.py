"""Decode attention over a KIVI-packed block: Pallas Mosaic TPU kernel.

The same function as `decode_attention.quantized_decode_attention` (its jnp
reference, `quantized_decode_attention_reference`, is the specification for
both), laid out for the TPU: the grid's last axis walks the block sequentially,
one step of `gcd(w_k, w_v)` groups (a whole packing block of the tensor with
fewer codes per word, or 4 groups where ternary's 20 codes per word meet
another tensor's 16) at a time, accumulating an online softmax in VMEM scratch;
per-row lengths arrive by scalar prefetch. Word tiles are `[G, D]` uint32
(lane-dense for D = 128), widened shifts only (no int8 shifts), ternary digits
taken apart in float32 (no vector integer division), and per-token value scales
are expanded to `[P, D]` with a 0/1 matrix on the MXU instead of a lane reshape.

Verified in TPU interpret mode only (no TPU was available).

Shapes as in `decode_attention` (M query rows per kv head, padded to 8).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.common import MASK_VALUE as _NEG
from pallas_kernels.common import codes_per_word

MIN_ROWS = 8  # sublanes


def _kernel(n_ref, lo_ref, q_ref, kw_ref, ks_ref, kz_ref, vw_ref, vs_ref, vz_ref,
            o_ref, lse_ref, m_sc, l_sc, acc_sc, *, k_bits: float, v_bits: float,
            group: int, sm_scale: float, compute_dtype):
  g_sz = group
  wk, wv = codes_per_word(k_bits), codes_per_word(v_bits)
  w_step = math.gcd(wk, wv)
  p_tok = w_step * g_sz
  m_rows, d = q_ref.shape
  b, st = pl.program_id(0), pl.program_id(2)
  n_tok, lo_tok = n_ref[b], lo_ref[b]
  tok0 = st * p_tok

  @pl.when(st == 0)
  def _init():
    m_sc[...] = jnp.full(m_sc.shape, _NEG, jnp.float32)
    l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
    acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

  def unpack(words, first_slot, bits):
    # [G, D] uint32 -> [w_step * G, D] codes as float32, tokens in order.
    slot = first_slot + jax.lax.broadcasted_iota(jnp.int32, (w_step, 1, 1), 0)
    if bits == 1.5:
      # Slot j is base-3 digit j % 5 of byte j // 5; small integers are exact in
      # float32, so floor((x + 1/2) / n) is x // n without integer division.
      fdiv = lambda x, n: jnp.floor((x + 0.5) * (1.0 / n))  # noqa: E731
      sf = slot.astype(jnp.float32)
      byte_idx = fdiv(sf, 5)
      digit = sf - 5.0 * byte_idx
      power = jnp.where(digit == 0, 1.0, jnp.where(digit == 1, 3.0, jnp.where(
          digit == 2, 9.0, jnp.where(digit == 3, 27.0, 81.0))))
      byte = ((words[None] >> (8 * byte_idx.astype(jnp.int32)).astype(jnp.uint32))
              & jnp.uint32(255)).astype(jnp.int32).astype(jnp.float32)
      t = fdiv(byte, power)
      codes = t - 3.0 * fdiv(t, 3)
    else:
      codes = ((words[None] >> (slot * bits).astype(jnp.uint32))
               & jnp.uint32(2**bits - 1)).astype(jnp.int32).astype(jnp.float32)
    return codes.reshape(p_tok, d)

  @pl.when((tok0 < n_tok) & (tok0 + p_tok > lo_tok))
  def _step():
    g0 = st * w_step
    q = q_ref[...].astype(compute_dtype)
    ks = ks_ref[...].astype(jnp.float32)  # [w_step, D]
    kz = kz_ref[...].astype(jnp.float32)
    k = unpack(kw_ref[...], g0 % wk, k_bits).reshape(w_step, g_sz, d)
    k = (k * ks[:, None, :] + kz[:, None, :]).reshape(p_tok, d).astype(compute_dtype)
    s = jax.lax.dot_general(q, k, (((1,), (1,)), ((), ())),
                            preferred_element_type=jnp.float32) * sm_scale  # [M, P]
    tok = tok0 + jax.lax.broadcasted_iota(jnp.int32, (1, p_tok), 1)
    live = (tok < n_tok) & (tok >= lo_tok)
    s = jnp.where(live, s, _NEG)
    m_prev = m_sc[...]  # [M, 1]
    m_new = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
    corr = jnp.exp(m_prev - m_new)
    p = jnp.where(live, jnp.exp(s - m_new), 0.0)
    l_sc[...] = l_sc[...] * corr + jnp.sum(p, axis=1, keepdims=True)
    m_sc[...] = m_new
    # [D/cg, D] 0/1: channel j belongs to group c. Expands [P, D/cg] scales to [P, D].
    cg = min(g_sz, d)  # channels per value group (kivi_jax.config.channel_group)
    expand = (jax.lax.broadcasted_iota(jnp.int32, (d // cg, d), 1) // cg
              == jax.lax.broadcasted_iota(jnp.int32, (d // cg, d), 0)).astype(jnp.float32)
    vs = jnp.dot(vs_ref[...].astype(jnp.float32), expand, preferred_element_type=jnp.float32)
    vz = jnp.dot(vz_ref[...].astype(jnp.float32), expand, preferred_element_type=jnp.float32)
    v = (unpack(vw_ref[...], g0 % wv, v_bits) * vs + vz).astype(compute_dtype)  # [P, D]
    pv = jax.lax.dot_general(p.astype(compute_dtype), v, (((1,), (0,)), ((), ())),
                             preferred_element_type=jnp.float32)
    acc_sc[...] = acc_sc[...] * corr + pv

  @pl.when(st == pl.num_programs(2) - 1)
  def _finish():
    l = l_sc[...]
    o_ref[...] = acc_sc[...] / jnp.where(l > 0, l, 1.0)
    lse_ref[...] = jnp.where(l > 0, m_sc[...] + jnp.log(jnp.where(l > 0, l, 1.0)), _NEG)


@functools.partial(jax.jit, static_argnames=("k_bits", "v_bits", "group_size", "interpret"))
def quantized_decode_attention(q, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero,
                               n_valid, lo, *, k_bits: float, v_bits: float,
                               group_size: int, interpret=False):
  """`(o [B, K, M, D], lse [B, K, M])` over the quantized block; see the module doc.

  `interpret`: False on a TPU, or `pltpu.InterpretParams(...)` / True elsewhere.
  """
  b, kh, m_rows, d = q.shape
  g = group_size
  wk, wv = codes_per_word(k_bits), codes_per_word(v_bits)
  w_step = math.gcd(wk, wv)
  p_tok = w_step * g
  capacity = k_codes.shape[2] * wk
  n_steps = capacity // p_tok
  compute_dtype = jnp.float32 if q.dtype == jnp.float32 else jnp.bfloat16
  kernel = functools.partial(_kernel, k_bits=k_bits, v_bits=v_bits, group=g,
                             sm_scale=1.0 / math.sqrt(d), compute_dtype=compute_dtype)
  blk = lambda rows, cols, index: pl.BlockSpec((None, None, rows, cols), index)
  grid_spec = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=2,
      grid=(b, kh, n_steps),
      in_specs=[
          blk(m_rows, d, lambda i, j, s, n, lo: (i, j, 0, 0)),
          # The key (value) packing block holding groups s*w_step ..: word-row
          # block (s * w_step) // wk of G rows each.
          blk(g, d, lambda i, j, s, n, lo: (i, j, s * w_step // wk, 0)),
          blk(w_step, d, lambda i, j, s, n, lo: (i, j, s, 0)),
          blk(w_step, d, lambda i, j, s, n, lo: (i, j, s, 0)),
          blk(g, d, lambda i, j, s, n, lo: (i, j, s * w_step // wv, 0)),
          blk(p_tok, d // min(g, d), lambda i, j, s, n, lo: (i, j, s, 0)),
          blk(p_tok, d // min(g, d), lambda i, j, s, n, lo: (i, j, s, 0)),
      ],
      out_specs=[
          blk(m_rows, d, lambda i, j, s, n, lo: (i, j, 0, 0)),
          blk(m_rows, 1, lambda i, j, s, n, lo: (i, j, 0, 0)),
      ],
      scratch_shapes=[pltpu.VMEM((m_rows, 1), jnp.float32),
                      pltpu.VMEM((m_rows, 1), jnp.float32),
                      pltpu.VMEM((m_rows, d), jnp.float32)],
  )
  o, lse = pl.pallas_call(
      kernel,
      grid_spec=grid_spec,
      out_shape=[jax.ShapeDtypeStruct((b, kh, m_rows, d), jnp.float32),
                 jax.ShapeDtypeStruct((b, kh, m_rows, 1), jnp.float32)],
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "arbitrary")),
      interpret=interpret,
      name="kivi_decode_attention_tpu",
  )(n_valid.astype(jnp.int32), lo.astype(jnp.int32), q, k_codes, k_scale, k_zero,
    v_codes, v_scale, v_zero)
  return o, lse[..., 0]
