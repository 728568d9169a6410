"""KIVI-2 decode attention over main's packed cache, codes turned into fp16 operands
by two instructions per two codes: a Pallas (Triton) prototype.

Not product code (see README.md). Main's layout is unchanged: the word of row rr and
channel d of a packing block holds 16 slots of 2-bit codes, slot s at bits 2 s (token
s * 32 + rr of the block's 512).

Codes as operands, two channels to a register. `prmt` puts byte `hb` of the words of
two neighbouring channels into the two 16-bit lanes of one register (`select_byte`;
slots 4 hb .. 4 hb + 3). `lop3(x, 3 << 2 j, M_j)` then keeps bits 2 j .. 2 j + 1 of
each lane under the fp16 exponent of M_j = 2^(10 - 2 j), so each lane is the fp16
number M_j + code, exactly, and `sub.f16x2` of M_j leaves the code (`codes`). Each
output lane comes from its own input element alone, so the inline PTX is
elementwise whichever two elements Triton puts in a register. A step's operand is a
[32 tokens, D] tile whose registers hold neighbouring channels, as the dots' shared
memory layouts want them. Scales fold into the dots' other operands:

  keys    s[h, t] = q'_g . code_t + q[h] . z_g,  q'_g = fp16(q[h] * s_g);
  values  o[h, c] = sum_t P'[(h, cg), t] code_t[c] + sum_t p[h, t] z_t[cg],
          P'[(h, cg), t] = fp16(p[h, t] s_t[cg]): 16 rows (4 heads x 4 channel
          groups), each channel keeping its group's row.

A program (row, kv head, split) walks its packing blocks a byte at a time: it loads
the block's word tiles, selects one byte (4 slots), and runs one step per group
(slot) on it, as main's kernel. The query rows (head, channel group) repeat each
head's row 4 times, so the probabilities come out in the value dot's 16 rows.

Shapes (B rows, K kv heads, H = 4 query heads per kv head, D = 128, C capacity):
  q [B, K, H, D]; k_codes, v_codes [B, K, C/16, D] uint32 (main's `pack`);
  k_scale, k_zero [B, K, C/32, D]; v_scale, v_zero [B, K, C, D/32]; n_valid [B].
Returns per-split partials (acc [B, K, S, H, D], m [B, K, S, H], l [B, K, S, H]) for
`kivi_jax.pallas_kernels.decode_attention.merge_partials`.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from kivi_jax.pallas_kernels import decode_attention as da

H, D, G = 4, 128, 32  # query heads per kv head, head dim, group size
BLOCK = 16 * G  # tokens per packing block
NCG = D // G  # value channel groups
NEG = -1e30


def _splat(x, value, dtype):
  return jnp.full(x.shape, value, dtype)


def select_byte(words, hb, asm: bool):
  """int32 `words` [G, D] -> int16 [G, D] whose low byte is byte `hb` of the word."""
  if asm:
    sel = hb * 0x11 + (4 + hb) * 0x1100  # lane 0 from the first word, lane 1 the second
    [out] = pltriton.elementwise_inline_asm(
        "prmt.b32 $0, $1, $2, $3;", args=[words, _splat(words, sel, jnp.int32)],
        constraints="=r,r,r,r,r", pack=2,
        result_shape_dtypes=[jax.ShapeDtypeStruct(words.shape, jnp.int16)])
    return out  # the high byte of each lane is masked off by `codes`
  return ((words >> (8 * hb)) & 255).astype(jnp.int16)


def codes(x, j, asm: bool):
  """int16 `x` (bits 2 j .. 2 j + 1 of each, j traced in 0 .. 3) -> fp16 codes."""
  mask = (3 << (2 * j)).astype(jnp.int16)
  bits = ((25 - 2 * j) << 10).astype(jnp.int16)  # M_j's fp16 bit pattern
  if asm:
    [out] = pltriton.elementwise_inline_asm(
        # (a & b) | c, then minus M_j: the code itself, as fp16.
        "{ .reg .b32 t; lop3.b32 t, $1, $2, $3, 0xea; sub.rn.f16x2 $0, t, $3; }",
        args=[x, _splat(x, mask, jnp.int16), _splat(x, bits, jnp.int16)],
        constraints="=r,r,r,r", pack=2,
        result_shape_dtypes=[jax.ShapeDtypeStruct(x.shape, jnp.float16)])
    return out
  return ((x.astype(jnp.int32) >> (2 * j)) & 3).astype(jnp.float16)


def _kernel(q_ref, kw_ref, ks_ref, kz_ref, vw_ref, vs_ref, vz_ref, n_ref,
            acc_ref, m_ref, l_ref, *, blocks_per_split: int, sm_scale: float, asm: bool):
  split = pl.program_id(2)
  q = q_ref[...].astype(jnp.float32) * sm_scale  # [H, D]
  n = n_ref[0]
  first = split * blocks_per_split
  last = jnp.minimum(first + blocks_per_split, (n + BLOCK - 1) // BLOCK)
  rr = jax.lax.broadcasted_iota(jnp.int32, (1, G), 1)
  own_cgroup = (jax.lax.broadcasted_iota(jnp.int32, (H, NCG, D), 2) // G
                == jax.lax.broadcasted_iota(jnp.int32, (H, NCG, D), 1))
  rep = lambda x: jnp.broadcast_to(x[:, None], (H, NCG, *x.shape[1:])).reshape(  # noqa: E731
      H * NCG, *x.shape[1:])  # each head's row 4 times: rows (head, channel group)

  def byte(c, carry):
    # Byte hb of block blk's words: loaded again for each byte, so that the word
    # tiles are not held in registers across the block.
    blk, hb = c // 4, c % 4
    rows = pl.ds(pl.multiple_of(blk * G, G), G)
    kx, vx = select_byte(kw_ref[rows], hb, asm), select_byte(vw_ref[rows], hb, asm)

    def step(j, carry):
      m_prev, l_prev, acc, zacc = carry
      g = blk * 16 + 4 * hb + j  # the group (slot 4 hb + j)
      ks = ks_ref[pl.ds(g, 1), :].astype(jnp.float32)  # [1, D]
      kz = kz_ref[pl.ds(g, 1), :].astype(jnp.float32)
      qh = rep((q * ks).astype(jnp.float16))  # [16, D]
      bias = rep(jnp.sum(q * kz, axis=1))  # [16]
      s = jax.lax.dot_general(qh, codes(kx, j, asm), (((1,), (1,)), ((), ())),
                              preferred_element_type=jnp.float32) + bias[:, None]
      live = g * G + rr < n  # [1, G]
      s = jnp.where(live, s, NEG)  # [16, G]
      m_new = jnp.maximum(m_prev, jnp.max(s, axis=1))
      corr = jnp.exp(m_prev - m_new)
      p = jnp.where(live, jnp.exp(s - m_new[:, None]), 0.0)
      l_new = l_prev * corr + jnp.sum(p, axis=1)
      toks = pl.ds(pl.multiple_of(g * G, G), G)
      vs = vs_ref[toks, :].astype(jnp.float32).T  # [NCG, G]
      vz = vz_ref[toks, :].astype(jnp.float32).T
      p3 = p.reshape(H, NCG, G)
      ph = (p3 * vs[None]).reshape(H * NCG, G).astype(jnp.float16)
      zacc = zacc * corr + jnp.sum((p3 * vz[None]).reshape(H * NCG, G), axis=1)
      pv = jax.lax.dot_general(ph, codes(vx, j, asm), (((1,), (0,)), ((), ())),
                               preferred_element_type=jnp.float32)  # [16, D]
      return m_new, l_new, acc * corr[:, None] + pv, zacc

    return jax.lax.fori_loop(0, 4, step, carry)

  init = (jnp.full((H * NCG,), NEG, jnp.float32), jnp.zeros((H * NCG,), jnp.float32),
          jnp.zeros((H * NCG, D), jnp.float32), jnp.zeros((H * NCG,), jnp.float32))
  m, l, acc, zacc = jax.lax.fori_loop(4 * first, 4 * jnp.maximum(first, last), byte, init)
  # Each channel keeps the row of its own channel group.
  full = (acc + zacc[:, None]).reshape(H, NCG, D)
  acc_ref[...] = jnp.sum(jnp.where(own_cgroup, full, 0.0), axis=1)
  m_ref[...] = jnp.max(m.reshape(H, NCG), axis=1)  # the 4 copies of a head are equal
  l_ref[...] = jnp.max(l.reshape(H, NCG), axis=1)


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
  as_int = lambda w: jax.lax.bitcast_convert_type(w, jnp.int32)  # noqa: E731
  inputs = [q, as_int(k_codes), k_scale, k_zero, as_int(v_codes), v_scale, v_zero,
            n_valid.astype(jnp.int32)]
  kernel = functools.partial(_kernel, blocks_per_split=blocks_per_split,
                             sm_scale=1.0 / math.sqrt(d), asm=asm)
  slab = lambda x: pl.BlockSpec((None, None, *x.shape[2:]), lambda i, j, s: (i, j, 0, 0))
  out = lambda *dims: pl.BlockSpec((None, None, None, *dims),
                                   lambda i, j, s: (i, j, s) + (0,) * len(dims))
  return da.pallas_call(
      kernel, inputs, [*map(slab, inputs[:-1]), pl.BlockSpec((1,), lambda i, j, s: (i,))],
      [out(H, D), out(H), out(H)],
      [jax.ShapeDtypeStruct((b, k, splits, H, D), jnp.float32),
       jax.ShapeDtypeStruct((b, k, splits, H), jnp.float32),
       jax.ShapeDtypeStruct((b, k, splits, H), jnp.float32)],
      grid=(b, k, splits), poison=False, num_warps=num_warps, num_stages=num_stages,
      interpret=interpret, name="kivi_decode_magic")
