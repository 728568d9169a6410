"""KIVI-2 decode attention over main's packed cache, codes turned into fp16 operands
by one logic instruction per two codes: a Pallas (Triton) prototype.

Not product code (see README.md). Main's layout is unchanged: a word holds 16 slots
of 2-bit codes, slot s at bits 2 s (token s * 32 + row of its packing block of 512
tokens). Read as two int16 halves, a half holds slots 8 h .. 8 h + 7.

Codes without shifts. `lop3(x, 3 << 2 j, M_j)` on a register of two halves keeps bits
2 j .. 2 j + 1 of each half under the fp16 exponent of M_j = 2^(10 - 2 j): each lane
is the fp16 number M_j + code, exactly (j = 0 .. 3; slots 4 .. 7 of a half after one
shift right by 8), and `sub.f16x2` of M_j leaves the code: two instructions per two
codes. Lanes never mix, so the inline PTX is elementwise whichever two elements
Triton puts in a register. Scales fold into the dots' other operands:

  keys    s[h, t] = q'_g . code_t + q[h] . z_g,  q'_g = fp16(q[h] * s_g);
  values  o[h, c] = sum_t P'[t, (h, cg)] code_t[c] + sum_t p[h, t] z_t[cg],
          P'[t, (h, cg)] = fp16(p[h, t] s_t[cg]): 16 columns (4 heads x 4 channel
          groups), each channel keeping its group's column.

A program (row, kv head, split) loads one packing block's word tiles at a time and
runs four steps j of 128 tokens on them: slots 8 h + 4 b + j for h, b in {0, 1}, one
pair of dots per b (b = 1 from the tiles shifted right by 8). Keys have 16 query
rows (head, h, b); each token keeps the row of its own group.

Shapes (B rows, K kv heads, H = 4 query heads per kv head, D = 128, C capacity):
  q [B, K, H, D]; k_codes, v_codes [B, K, C/16, D] uint32 (main's `pack`);
  k_scale, k_zero [B, K, C/32, D]; v_scale, v_zero [B, K, C, D/32]; n_valid [B].
Returns per-split partials (acc [B, K, S, H, D], m [B, K, S, H], l [B, K, S, H]) for
`pallas_kernels.decode_attention.merge_partials`.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

H, D, G = 4, 128, 32  # query heads per kv head, head dim, group size
BLOCK = 16 * G  # tokens per packing block
NCG = D // G  # value channel groups
NEG = -1e30


def _splat(x, value):
  return jnp.full(x.shape, value, jnp.int16)


def codes(halves, j, asm: bool):
  """int16 `halves` (bits 2 j .. 2 j + 1 of each, j traced in 0 .. 3) -> fp16 codes."""
  mask = 3 << (2 * j)
  bits = ((25 - 2 * j) << 10).astype(jnp.int16)  # M_j's fp16 bit pattern
  if asm:
    [out] = pltriton.elementwise_inline_asm(
        # (a & b) | c, then minus M_j: the code itself, as fp16.
        "{ .reg .b32 t; lop3.b32 t, $1, $2, $3, 0xea; sub.rn.f16x2 $0, t, $3; }",
        args=[halves, _splat(halves, mask.astype(jnp.int16)), _splat(halves, bits)],
        constraints="=r,r,r,r", pack=2,
        result_shape_dtypes=[jax.ShapeDtypeStruct(halves.shape, jnp.float16)])
    return out
  return ((halves.astype(jnp.int32) >> (2 * j)) & 3).astype(jnp.float16)


def high_bytes(halves, asm: bool):
  """Each int16 half shifted right by 8 (its slots 4 .. 7 at bits 0 .. 7)."""
  if asm:
    [out] = pltriton.elementwise_inline_asm(
        "shr.b32 $0, $1, 8;", args=[halves], constraints="=r,r", pack=2,
        result_shape_dtypes=[jax.ShapeDtypeStruct(halves.shape, jnp.int16)])
    return out  # the lanes' stray high bits are masked off by `codes`
  return (halves.astype(jnp.int32) >> 8).astype(jnp.int16)


def step_codes(halves, j, asm: bool):
  """Codes [D, 64] of slots 8 h + j of a block tile [G, D, 2] of int16 halves (of its
  slots 4 .. 7 for a tile shifted right by 8): row rr's at column 2 rr + h (h, the
  half, fastest: the two halves of a register are neighbours)."""
  return jnp.transpose(codes(halves, j, asm), (1, 0, 2)).reshape(D, 2 * G)


def _kernel(q_ref, kh_ref, ks_ref, kz_ref, vh_ref, vs_ref, vz_ref, n_ref,
            acc_ref, m_ref, l_ref, *, blocks_per_split: int, sm_scale: float, asm: bool):
  split = pl.program_id(2)
  q = q_ref[...].astype(jnp.float32) * sm_scale  # [H, D]
  n = n_ref[0]
  first = split * blocks_per_split
  last = jnp.minimum(first + blocks_per_split, (n + BLOCK - 1) // BLOCK)
  col = jax.lax.broadcasted_iota(jnp.int32, (1, 2 * G), 1)  # 2 rr + h
  shape = (1, 2, 2, 2 * G)  # query rows (h', b') of a head, columns
  row_h = jax.lax.broadcasted_iota(jnp.int32, shape, 1)
  row_b = jax.lax.broadcasted_iota(jnp.int32, shape, 2)
  own_row = [(row_h == jax.lax.broadcasted_iota(jnp.int32, shape, 3) % 2) & (row_b == b)
             for b in (0, 1)]
  own_cgroup = (jax.lax.broadcasted_iota(jnp.int32, (D, H, NCG), 0) // G
                == jax.lax.broadcasted_iota(jnp.int32, (D, H, NCG), 2))

  def block(blk, carry):
    rows = pl.ds(pl.multiple_of(blk * G, G), G)
    kh, vh = kh_ref[rows], vh_ref[rows]  # [G, D, 2] int16
    tiles = ((kh, vh), (high_bytes(kh, asm), high_bytes(vh, asm)))  # b = 0, 1

    def step(j, carry):
      m_prev, l_prev, acc, zacc = carry
      # Folded fp16 query rows (head, h, b): slot 8 h + 4 b + j's group.
      ks = ks_ref[blk, :, :, j].astype(jnp.float32)  # [2, 2, D]
      kz = kz_ref[blk, :, :, j].astype(jnp.float32)
      qh = (q[:, None, None, :] * ks[None]).astype(jnp.float16).reshape(4 * H, D)
      bias = jnp.sum(q[:, None, None, :] * kz[None], axis=3)[..., None]  # [H, 2, 2, 1]
      s, live = [], []
      for b, (kt, _) in enumerate(tiles):
        s_all = jax.lax.dot_general(qh, step_codes(kt, j, asm), (((1,), (0,)), ((), ())),
                                    preferred_element_type=jnp.float32)  # [16, 64]
        s_all = s_all.reshape(H, 2, 2, 2 * G) + bias
        tok = blk * BLOCK + (8 * (col % 2) + 4 * b + j) * G + col // 2
        live.append(tok < n)
        s.append(jnp.where(live[b], jnp.sum(jnp.where(own_row[b], s_all, 0.0), axis=(1, 2)),
                           NEG))  # [H, 64]
      m_new = jnp.maximum(m_prev, jnp.maximum(jnp.max(s[0], axis=1), jnp.max(s[1], axis=1)))
      corr = jnp.exp(m_prev - m_new)
      p = [jnp.where(lv, jnp.exp(sb - m_new[:, None]), 0.0) for sb, lv in zip(s, live)]
      l_new = l_prev * corr + jnp.sum(p[0], axis=1) + jnp.sum(p[1], axis=1)
      corr16 = jnp.broadcast_to(corr[:, None], (H, NCG)).reshape(1, H * NCG)
      acc, zacc = acc * corr16, zacc * corr16[0]
      for b, (_, vt) in enumerate(tiles):
        # Folded fp16 probabilities [64, (head, channel group)].
        vs = jnp.transpose(vs_ref[blk, :, b, j].astype(jnp.float32), (1, 0, 2))
        vz = jnp.transpose(vz_ref[blk, :, b, j].astype(jnp.float32), (1, 0, 2))
        pt = p[b].T[:, :, None]  # [64, H, 1]
        ph = (pt * vs.reshape(2 * G, 1, NCG)).reshape(2 * G, H * NCG).astype(jnp.float16)
        zacc = zacc + jnp.sum((pt * vz.reshape(2 * G, 1, NCG)).reshape(2 * G, H * NCG), axis=0)
        acc = acc + jax.lax.dot_general(step_codes(vt, j, asm), ph, (((1,), (0,)), ((), ())),
                                        preferred_element_type=jnp.float32)  # [D, 16]
      return m_new, l_new, acc, zacc

    return jax.lax.fori_loop(0, 4, step, carry)

  init = (jnp.full((H,), NEG, jnp.float32), jnp.zeros((H,), jnp.float32),
          jnp.zeros((D, H * NCG), jnp.float32), jnp.zeros((H * NCG,), jnp.float32))
  m, l, acc, zacc = jax.lax.fori_loop(first, jnp.maximum(first, last), block, init)
  # Each channel keeps the column of its own channel group.
  full = (acc + zacc[None, :]).reshape(D, H, NCG)
  acc_ref[...] = jnp.sum(jnp.where(own_cgroup, full, 0.0), axis=2).T
  m_ref[...] = m
  l_ref[...] = l


@functools.partial(jax.jit, static_argnames=("splits", "num_warps", "num_stages", "asm",
                                             "interpret"))
def partials(q, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, n_valid, *,
             splits: int, num_warps: int = 4, num_stages: int = 2, asm: bool = True,
             interpret: bool = False):
  """Per-split partials of attention over the block (module docstring)."""
  b, k, h, d = q.shape
  if (h, d) != (H, D):
    raise ValueError(f"the prototype takes {H} query heads of dim {D}, got {h} of {d}")
  capacity = k_codes.shape[2] * 16
  if capacity % BLOCK:
    raise ValueError(f"capacity {capacity} is not a multiple of {BLOCK}")
  nblk = capacity // BLOCK
  blocks_per_split = -(-nblk // splits)
  halves = lambda w: jax.lax.bitcast_convert_type(w, jnp.int16)  # [.., C/16, D, 2]
  per_block = lambda x, *tail: x.reshape(b, k, nblk, 2, 2, 4, *tail)  # slot 8 h + 4 b + j
  inputs = [q, halves(k_codes), per_block(k_scale, D), per_block(k_zero, D),
            halves(v_codes), per_block(v_scale, G, NCG), per_block(v_zero, G, NCG),
            n_valid.astype(jnp.int32)]
  kernel = functools.partial(_kernel, blocks_per_split=blocks_per_split,
                             sm_scale=1.0 / math.sqrt(d), asm=asm)
  slab = lambda x: pl.BlockSpec((None, None, *x.shape[2:]),
                                lambda i, j, s, n=x.ndim - 2: (i, j) + (0,) * n)
  out = lambda *dims: pl.BlockSpec((None, None, None, *dims),
                                   lambda i, j, s: (i, j, s) + (0,) * len(dims))
  return pl.pallas_call(
      kernel,
      grid=(b, k, splits),
      in_specs=[*map(slab, inputs[:-1]), pl.BlockSpec((1,), lambda i, j, s: (i,))],
      out_specs=[out(H, D), out(H), out(H)],
      out_shape=[jax.ShapeDtypeStruct((b, k, splits, H, D), jnp.float32),
                 jax.ShapeDtypeStruct((b, k, splits, H), jnp.float32),
                 jax.ShapeDtypeStruct((b, k, splits, H), jnp.float32)],
      compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages),
      interpret=interpret,
      name="kivi_decode_magic",
  )(*inputs)
