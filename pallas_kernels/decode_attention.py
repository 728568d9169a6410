"""Decode attention over a KIVI-packed block: Pallas (Triton) GPU kernel + reference.

One decode query per row attends to the quantized block of the cache without
ever materializing it in full precision (SPEC.md, PALLAS_NOTES.md "Algebra that
keeps codes packed"):

  keys, per channel, group g:  q . k_t = (q * s_g) . code_t + q . z_g
  values, per token t, channel group c:
                               sum_t p_t v_t[c] = sum_t (p_t s_t[c]) code_t[c] + sum_t p_t z_t[c]

Codes are read in group slots (`kivi_jax.quantization.pack`): shifting a tile of
G word rows by a static amount yields one whole group of G consecutive tokens,
so a group's key scale folds into the query and its value scales into the
probabilities with no reshapes. The sequence is split across programs (flash
decoding); the splits are merged by log-sum-exp outside the kernel, as is the
full-precision ring (see `kivi_jax.attention`).

Shapes (B batch, K kv heads, M query rows per kv head padded to 16, D head dim,
C block capacity in tokens, G group size, w codes per word):
  q        [B, K, M, D]      model dtype
  k_codes  [B, K, C/w_k, D]  uint32        k_scale, k_zero [B, K, C/G, D]
  v_codes  [B, K, C/w_v, D]  uint32        v_scale, v_zero [B, K, D/G, C]
  n_valid  [B] int32: quantized tokens per row (a multiple of G)
  lo       [B] int32: first visible token per row (sliding window; 0 for none)
Returns `(o, lse)`: o [B, K, M, D] float32, attention normalized over the
block; lse [B, K, M] float32, its log-sum-exp (very negative where a row sees no
block token).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

# Finite, so empty splits merge without NaN (JAX's decode attention uses 0.7 * min).
_NEG = -1e30


def _kernel(q_ref, kw_ref, ks_ref, kz_ref, vw_ref, vs_ref, vz_ref, n_ref, lo_ref,
            acc_ref, m_ref, l_ref, *, k_bits: int, v_bits: int, group: int,
            groups_per_split: int, sm_scale: float, compute_dtype):
  """One program: batch row b, kv head h, split s over groups of the block.

  An outer loop walks super-blocks of `w_max` groups (whole packing blocks of
  both tensors) and loads their word tiles once; an inner loop walks the groups
  (slots) with a dynamic shift, so the body stays small to compile.
  """
  g_sz = group
  wk, wv = 32 // k_bits, 32 // v_bits
  w_max = max(wk, wv)
  m_rows, d = q_ref.shape
  n_cgroups = d // g_sz
  split = pl.program_id(2)

  q = q_ref[...].astype(jnp.float32)  # [M, D]
  n_groups = n_ref[0] // g_sz
  lo_tok = lo_ref[0]
  first = jnp.maximum(split * groups_per_split, lo_tok // g_sz)
  last = jnp.minimum((split + 1) * groups_per_split, n_groups)
  tok_in_group = jnp.arange(g_sz)

  def key_tile(g):
    row = pl.multiple_of((g // wk) * g_sz, g_sz)
    return kw_ref[pl.ds(row, g_sz), :]  # [G, D] uint32

  def value_tiles(g):
    row = pl.multiple_of((g // wv) * g_sz, g_sz)
    return [vw_ref[pl.ds(row, g_sz), pl.ds(c * g_sz, g_sz)] for c in range(n_cgroups)]

  def superblock(sb, carry):
    g0 = sb * w_max
    # Tiles of a tensor whose packing block spans the whole super-block are
    # loaded once here; the other tensor's are loaded per group below.
    kw_block = key_tile(g0) if wk == w_max else None
    vw_block = value_tiles(g0) if wv == w_max else None

    def group_step(j, carry):
      m_prev, l_prev, accs = carry
      g = g0 + j
      kw = kw_block if kw_block is not None else key_tile(g)
      kshift = ((g % wk) * k_bits).astype(jnp.uint32)
      kc = ((kw >> kshift) & (2**k_bits - 1)).astype(jnp.int32)
      ks = ks_ref[pl.ds(g, 1), :].astype(jnp.float32)  # [1, D]
      kz = kz_ref[pl.ds(g, 1), :].astype(jnp.float32)
      qs = (q * ks).astype(compute_dtype)
      s = jax.lax.dot_general(qs, kc.astype(compute_dtype), (((1,), (1,)), ((), ())),
                              preferred_element_type=jnp.float32)  # [M, G]
      s = (s + jnp.sum(q * kz, axis=1, keepdims=True)) * sm_scale
      tok = g * g_sz + tok_in_group
      live = ((g >= first) & (g < last) & (tok >= lo_tok))[None, :]  # [1, G]
      s = jnp.where(live, s, _NEG)
      m_new = jnp.maximum(m_prev, jnp.max(s, axis=1))
      corr = jnp.exp(m_prev - m_new)
      p = jnp.where(live, jnp.exp(s - m_new[:, None]), 0.0)  # [M, G]
      l_new = l_prev * corr + jnp.sum(p, axis=1)
      # Values: per channel group c, fold each token's scale into p.
      vws = vw_block if vw_block is not None else value_tiles(g)
      vshift = ((g % wv) * v_bits).astype(jnp.uint32)
      tok0 = pl.multiple_of(g * g_sz, g_sz)
      new_accs = []
      for c in range(n_cgroups):
        vc = ((vws[c] >> vshift) & (2**v_bits - 1)).astype(jnp.int32)  # [G tok, G ch]
        vs = vs_ref[pl.ds(c, 1), pl.ds(tok0, g_sz)].astype(jnp.float32)  # [1, G]
        vz = vz_ref[pl.ds(c, 1), pl.ds(tok0, g_sz)].astype(jnp.float32)
        pv = jax.lax.dot_general((p * vs).astype(compute_dtype), vc.astype(compute_dtype),
                                 (((1,), (0,)), ((), ())),
                                 preferred_element_type=jnp.float32)  # [M, G]
        bias = jnp.sum(p * vz, axis=1, keepdims=True)
        new_accs.append(accs[c] * corr[:, None] + pv + bias)
      return m_new, l_new, tuple(new_accs)

    return jax.lax.fori_loop(0, w_max, group_step, carry)

  init = (jnp.full((m_rows,), _NEG, jnp.float32), jnp.zeros((m_rows,), jnp.float32),
          tuple(jnp.zeros((m_rows, g_sz), jnp.float32) for _ in range(n_cgroups)))
  sb_first = first // w_max
  sb_last = jnp.maximum(sb_first, (last + w_max - 1) // w_max)
  m, l, accs = jax.lax.fori_loop(sb_first, sb_last, superblock, init)
  for c in range(n_cgroups):
    acc_ref[:, pl.ds(c * g_sz, g_sz)] = accs[c]
  m_ref[...] = m
  l_ref[...] = l


def merge_partials(acc, m, l):
  """Merges unnormalized partials over axis -3 (splits): acc [..., S, M, D], m/l [..., S, M].

  Returns (o [..., M, D], lse [..., M]); rows with no live key get o = 0.
  """
  m_all = jnp.max(m, axis=-2)
  w = jnp.exp(m - m_all[..., None, :])
  l_all = jnp.sum(w * l, axis=-2)
  acc_all = jnp.sum(w[..., None] * acc, axis=-3)
  o = acc_all / jnp.where(l_all > 0, l_all, 1.0)[..., None]
  lse = jnp.where(l_all > 0, m_all + jnp.log(jnp.where(l_all > 0, l_all, 1.0)), _NEG)
  return o, lse


def default_splits(batch: int, kv_heads: int, n_superblocks: int,
                   target_programs: int = 1024) -> int:
  """Enough sequence splits that batch x heads x splits fills a large GPU."""
  want = -(-target_programs // (batch * kv_heads))
  return max(1, min(want, n_superblocks))


@functools.partial(jax.jit, static_argnames=(
    "k_bits", "v_bits", "group_size", "splits", "num_warps", "num_stages", "interpret"))
def quantized_decode_attention(q, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero,
                               n_valid, lo, *, k_bits: int, v_bits: int, group_size: int,
                               splits: int | None = None, num_warps: int = 4,
                               num_stages: int = 2, interpret: bool = False):
  """Attention of `q` over the quantized block (module docstring for shapes)."""
  b, kh, m_rows, d = q.shape
  g = group_size
  w_max = max(32 // k_bits, 32 // v_bits)
  capacity = k_codes.shape[2] * (32 // k_bits)
  n_superblocks = capacity // (w_max * g)
  if splits is None:
    splits = default_splits(b, kh, n_superblocks)
  groups_per_split = -(-n_superblocks // splits) * w_max
  compute_dtype = jnp.float32 if q.dtype == jnp.float32 else jnp.bfloat16
  kernel = functools.partial(
      _kernel, k_bits=k_bits, v_bits=v_bits, group=g, groups_per_split=groups_per_split,
      sm_scale=1.0 / math.sqrt(d), compute_dtype=compute_dtype)
  slab = lambda x: pl.BlockSpec((None, None, *x.shape[2:]), lambda i, j, s: (i, j, 0, 0))
  row = pl.BlockSpec((1,), lambda i, j, s: (i,))
  acc, m, l = pl.pallas_call(
      kernel,
      grid=(b, kh, splits),
      in_specs=[slab(q), slab(k_codes), slab(k_scale), slab(k_zero), slab(v_codes),
                slab(v_scale), slab(v_zero), row, row],
      out_specs=[
          pl.BlockSpec((None, None, None, m_rows, d), lambda i, j, s: (i, j, s, 0, 0)),
          pl.BlockSpec((None, None, None, m_rows), lambda i, j, s: (i, j, s, 0)),
          pl.BlockSpec((None, None, None, m_rows), lambda i, j, s: (i, j, s, 0)),
      ],
      out_shape=[
          jax.ShapeDtypeStruct((b, kh, splits, m_rows, d), jnp.float32),
          jax.ShapeDtypeStruct((b, kh, splits, m_rows), jnp.float32),
          jax.ShapeDtypeStruct((b, kh, splits, m_rows), jnp.float32),
      ],
      compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages),
      interpret=interpret,
      name="kivi_decode_attention",
  )(q, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, n_valid.astype(jnp.int32),
    lo.astype(jnp.int32))
  # As JAX's own decode attention: keep XLA from fusing the merge into the
  # kernel's consumers in a way that produced NaNs there.
  acc, m, l = jax.lax.optimization_barrier((acc, m, l))
  return merge_partials(acc, m, l)


def quantized_decode_attention_reference(q, k_codes, k_scale, k_zero, v_codes, v_scale,
                                         v_zero, n_valid, lo, *, k_bits: int, v_bits: int,
                                         group_size: int):
  """The same function in plain jnp: dequantize the block, mask, softmax."""
  from kivi_jax import quantization
  g = group_size
  d = q.shape[-1]
  keys = quantization.dequantize(quantization.unpack(k_codes, k_bits, g), k_scale, k_zero,
                                 g, "channel", jnp.float32)
  values = quantization.dequantize(quantization.unpack(v_codes, v_bits, g),
                                   v_scale.swapaxes(-1, -2), v_zero.swapaxes(-1, -2), g,
                                   "token", jnp.float32)
  s = jnp.einsum("bkmd,bktd->bkmt", q.astype(jnp.float32), keys) / math.sqrt(d)
  t = jnp.arange(keys.shape[2])
  live = (t[None, :] < n_valid[:, None]) & (t[None, :] >= lo[:, None])  # [B, T]
  s = jnp.where(live[:, None, None, :], s, _NEG)
  m = jnp.max(s, axis=-1)
  p = jnp.where(live[:, None, None, :], jnp.exp(s - m[..., None]), 0.0)
  l = jnp.sum(p, axis=-1)
  acc = jnp.einsum("bkmt,bktd->bkmd", p, values)
  return merge_partials(acc[:, :, None], m[:, :, None], l[:, :, None])
