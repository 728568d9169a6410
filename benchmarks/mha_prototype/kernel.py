"""Decode attention of one query row per kv head (MHA) over a KIVI-packed block,
on CUDA cores: Pallas (Triton) GPU kernel.

With one query row a tensor-core dot is 1/16 useful (its rows pad to 16), so
this kernel multiplies codes and query on CUDA cores and keeps the work per
cached element small:
  - a code becomes an exact float32 by two integer ops and a subtraction
    (`(w >> shift) & mask | 0x4B000000` is the float 2^23 + code);
  - keys: the group's scale folds into the query (`q * s_g`, once per group),
    the zero into a per-group bias (`q . z_g`); each channel chunk's products
    accumulate elementwise and are summed over the channels once per group;
  - values: each token's scale folds into its probability, the zero into a
    `[G, 1]` column; products accumulate elementwise in a `[G, chunk]` tile
    per channel chunk and are summed over the tokens once, at the end;
  - the softmax's reference maximum moves only when a group's maximum exceeds
    it by more than `_RESCALE_MARGIN` (FlashAttention-4's lazy rescaling), so
    the accumulators are rescaled rarely, not every group.

Same inputs and outputs as `decode_attention.quantized_decode_partials`
(2, 4 and 8-bit codes, KIVI's layout, keys after RoPE), with M = 1.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from kivi_jax.pallas_kernels.common import MASK_VALUE as _NEG
from kivi_jax.pallas_kernels.common import codes_per_word
from kivi_jax.pallas_kernels.decode_attention import default_splits, live_groups, pallas_call

# exp(8) ~ 3000: probabilities stay below it between rescalings.
_RESCALE_MARGIN = 8.0
_ONE = 0x3F800000  # float32 1.0


def _fma_codes(words, j, bits: int, mult, acc, asm: bool):
  """`acc + f * mult` elementwise, with `f = 1 + code / 2^bits` the float32
  holding code `j` of each word (bits `j * bits ..`) at the top of its
  mantissa. Compiled: a rotation of the word that puts the code there, an
  and-or under 1.0's exponent, and one fused multiply-add."""
  if not asm:
    code = (words >> (j * bits).astype(jnp.uint32)) & jnp.uint32(2**bits - 1)
    return acc + (1.0 + code.astype(jnp.float32) * 2.0**-bits) * mult
  top = 23 - bits  # the code's lowest bit in f's mantissa
  rot = ((top - j * bits) % 32).astype(jnp.int32)
  mask = (2**bits - 1) << top
  [out] = pltriton.elementwise_inline_asm(
      "{ .reg .b32 t; shf.l.wrap.b32 t, $1, $1, $2; "
      f"lop3.b32 t, t, {mask}, {_ONE}, 0xea; fma.rn.f32 $0, t, $3, $4; }}",
      args=[words, jnp.full(words.shape, rot, jnp.int32),
            jnp.broadcast_to(mult, words.shape), jnp.broadcast_to(acc, words.shape)],
      constraints="=r,r,r,r,r", pack=1,
      result_shape_dtypes=[jax.ShapeDtypeStruct(words.shape, jnp.float32)])
  return out


def _kernel(q_ref, kw_ref, ks_ref, kz_ref, vw_ref, vs_ref, vz_ref, n_ref, lo_ref,
            acc_ref, m_ref, l_ref, *, k_bits: int, v_bits: int, group: int,
            groups_per_split: int, sm_scale: float, chunk: int, hold: bool, lazy: bool, asm: bool, prefetch: bool):
  g_sz = group
  d = q_ref.shape[-1]
  n_chunks = d // chunk
  cg = min(g_sz, d)
  wk, wv = codes_per_word(k_bits), codes_per_word(v_bits)
  w_min = min(wk, wv)
  split = pl.program_id(2)
  first, last, _ = live_groups(split, n_ref, lo_ref, g_sz, groups_per_split)
  lo_tok = lo_ref[0]
  cols = lambda c: pl.ds(c * chunk, chunk)  # noqa: E731
  # [1, chunk] per chunk, the softmax scale folded in.
  qs = [q_ref[:, cols(c)].astype(jnp.float32) * sm_scale for c in range(n_chunks)]
  row = jax.lax.broadcasted_iota(jnp.int32, (g_sz,), 0)

  def tiles(ref, g, w):
    rows = pl.ds(pl.multiple_of((g // w) * g_sz, g_sz), g_sz)
    return [ref[rows, cols(c)] for c in range(n_chunks)]

  n_groups = ks_ref.shape[0]

  def loads(g, kw=None, vw=None):
    g = jnp.minimum(g, n_groups - 1)
    if kw is None:
      kw, vw = tiles(kw_ref, g, wk), tiles(vw_ref, g, wv)
    tok = pl.ds(pl.multiple_of(g * g_sz, g_sz), g_sz)
    ks = [ks_ref[pl.ds(g, 1), cols(c)] for c in range(n_chunks)]
    kz = [kz_ref[pl.ds(g, 1), cols(c)] for c in range(n_chunks)]
    vs = [vs_ref[tok, pl.ds((c * chunk) // cg, 1)] for c in range(n_chunks)]
    vz = [vz_ref[tok, pl.ds((c * chunk) // cg, 1)] for c in range(n_chunks)]
    return kw, vw, ks, kz, vs, vz

  def group_step(g, carry, kw, vw, pre=None):
    m_ref_, l, accs, zaccs = carry
    if pre is None:
      pre = loads(g, kw, vw)
    kw, vw, ks_all, kz_all, vs_all, vz_all = pre
    s2d = jnp.zeros((g_sz, chunk), jnp.float32)
    bias = jnp.float32(0)
    for c in range(n_chunks):
      ks = ks_all[c].astype(jnp.float32)  # [1, chunk]
      kz = kz_all[c].astype(jnp.float32)
      # code = 2^b (f - 1): q . k = sum(q'' f) + sum(q z - q''), q'' = 2^b q s.
      qk = qs[c] * ks * 2.0**k_bits
      s2d = _fma_codes(kw[c], g % wk, k_bits, qk, s2d, asm)
      bias = bias + jnp.sum(qs[c] * kz - qk)
    s = jnp.sum(s2d, axis=1) + bias  # [G]
    live = (g * g_sz + row) >= lo_tok
    s = jnp.where(live, s, _NEG)
    m_new = jnp.maximum(m_ref_, jnp.max(s))
    if lazy:
      def rescale(args):
        m_old, l, accs, zaccs = args
        corr = jnp.exp(m_old - m_new)
        return m_new, l * corr, [a * corr for a in accs], [z * corr for z in zaccs]
      m_ref_, l, accs, zaccs = jax.lax.cond(
          m_new > m_ref_ + _RESCALE_MARGIN, rescale, lambda args: args,
          (m_ref_, l, accs, zaccs))
    else:
      corr = jnp.exp(m_ref_ - m_new)
      m_ref_, l = m_new, l * corr
      accs = [a * corr for a in accs]
      zaccs = [z * corr for z in zaccs]
    p = jnp.where(live, jnp.exp(s - m_ref_), 0.0)  # [G]
    l = l + jnp.sum(p)
    p = p[:, None]
    tok = pl.ds(pl.multiple_of(g * g_sz, g_sz), g_sz)
    new_accs, new_zaccs = [], []
    for c in range(n_chunks):
      vgrp = pl.ds((c * chunk) // cg, 1)
      vs = vs_all[c].astype(jnp.float32)  # [G, 1]
      vz = vz_all[c].astype(jnp.float32)
      pv = p * vs * 2.0**v_bits  # as the keys: sum_t p'' f + sum_t (p z - p'')
      new_accs.append(_fma_codes(vw[c], g % wv, v_bits, pv, accs[c], asm))
      new_zaccs.append(zaccs[c] + (p * vz - pv))
    return m_ref_, l, new_accs, new_zaccs

  def block_step(st, carry):
    g0 = st * w_min
    kw, vw = (tiles(kw_ref, g0, wk), tiles(vw_ref, g0, wv)) if hold else (None, None)
    lo_g = jnp.maximum(g0, first)
    hi_g = jnp.minimum(g0 + w_min, last)
    return jax.lax.fori_loop(lo_g, hi_g,
                             lambda g, cr: group_step(g, cr, kw, vw), carry)

  init = (jnp.float32(_NEG), jnp.float32(0),
          [jnp.zeros((g_sz, chunk), jnp.float32) for _ in range(n_chunks)],
          [jnp.zeros((g_sz, 1), jnp.float32) for _ in range(n_chunks)])
  if prefetch:
    def pf_step(g, cr):
      state, pre = cr
      nxt = loads(g + 1)
      return group_step(g, state, None, None, pre), nxt
    (m, l, accs, zaccs), _ = jax.lax.fori_loop(
        first, jnp.maximum(first, last), pf_step, (init, loads(first)))
  elif hold:
    st_first = first // w_min
    st_last = jnp.maximum(st_first, (last + w_min - 1) // w_min)
    m, l, accs, zaccs = jax.lax.fori_loop(st_first, st_last, block_step, init)
  else:
    m, l, accs, zaccs = jax.lax.fori_loop(
        first, jnp.maximum(first, last), lambda g, cr: group_step(g, cr, None, None), init)
  for c in range(n_chunks):
    o = jnp.sum(accs[c], axis=0) + jnp.sum(zaccs[c], axis=0)  # [chunk]
    acc_ref[:, cols(c)] = o[None, :]
  m_ref[...] = jnp.full((1,), m, jnp.float32)
  l_ref[...] = jnp.full((1,), l, jnp.float32)


@functools.partial(jax.jit, static_argnames=(
    "k_bits", "v_bits", "group_size", "splits", "chunk", "hold", "lazy", "prefetch", "num_warps",
    "num_stages", "interpret", "poison"))
def mha_decode_partials(q, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, n_valid, lo,
                        *, k_bits: int, v_bits: int, group_size: int,
                        splits: int | None = None, chunk: int = 32, hold: bool = True,
                        lazy: bool = True, prefetch: bool = False, num_warps: int = 4, num_stages: int = 1,
                        interpret: bool = False, poison: bool = False):
  b, kh, m_rows, d = q.shape
  if m_rows != 1:
    raise ValueError(f"q has {m_rows} rows per kv head; this kernel takes 1")
  g = group_size
  chunk = min(chunk, g, d)
  w_min = min(codes_per_word(k_bits), codes_per_word(v_bits))
  capacity = k_codes.shape[2] * codes_per_word(k_bits)
  n_steps = capacity // (w_min * g)
  if splits is None:
    splits = default_splits(b, kh, n_steps)
  groups_per_split = -(-n_steps // splits) * w_min
  kernel = functools.partial(
      _kernel, k_bits=k_bits, v_bits=v_bits, group=g, groups_per_split=groups_per_split,
      sm_scale=1.0 / math.sqrt(d), chunk=chunk, hold=hold, lazy=lazy, prefetch=prefetch,
      asm=not interpret)
  slab = lambda x: pl.BlockSpec((None, None, *x.shape[2:]), lambda i, j, s: (i, j, 0, 0))
  row = pl.BlockSpec((1,), lambda i, j, s: (i,))
  out_specs = [
      pl.BlockSpec((None, None, None, 1, d), lambda i, j, s: (i, j, s, 0, 0)),
      pl.BlockSpec((None, None, None, 1), lambda i, j, s: (i, j, s, 0)),
      pl.BlockSpec((None, None, None, 1), lambda i, j, s: (i, j, s, 0)),
  ]
  out_shape = [
      jax.ShapeDtypeStruct((b, kh, splits, 1, d), jnp.float32),
      jax.ShapeDtypeStruct((b, kh, splits, 1), jnp.float32),
      jax.ShapeDtypeStruct((b, kh, splits, 1), jnp.float32),
  ]
  inputs = [q, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero,
            n_valid.astype(jnp.int32), lo.astype(jnp.int32)]
  in_specs = [slab(q), slab(k_codes), slab(k_scale), slab(k_zero), slab(v_codes),
              slab(v_scale), slab(v_zero), row, row]
  acc, m, l = pallas_call(kernel, inputs, in_specs, out_specs, out_shape,
                          grid=(b, kh, splits), poison=poison, num_warps=num_warps,
                          num_stages=num_stages, interpret=interpret,
                          name="kivi_mha_decode_attention")
  return jax.lax.optimization_barrier((acc, m, l))
