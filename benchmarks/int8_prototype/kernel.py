"""KIVI-2 decode attention on 8-bit or bf16 tensor-core operands made without
dequantizing: a Pallas (Triton) prototype.

Not product code (see README.md). One program per (row, kv head, split) walks its
part of the packed block in steps of T = 128 tokens (four key groups of 32):

  keys    s[h, t] = sum_c (q[h, c] s_g[c]) code[t, c] + q[h] . z_g      (g = t // 32)
          The folded query q[h] * s_g is one operand row per (h, g): 16 rows (4 heads
          x 4 groups), one dot against the step's key codes [T, 128], and each token
          keeps the row of its own group.
  values  o[h, c] = sum_t (p[h, t] s_t[cg]) code[t, c] + sum_t p[h, t] z_t[cg]
          (cg = c // 32). The folded probabilities p[h, t] * s_t[cg] are one operand
          row per (h, cg): 16 rows again, one dot against the value codes, and each
          channel keeps the row of its group.

Mode "int8": the folded rows are rounded to int8 with a scale per row, the codes are
int8 and the dots accumulate in int32. Mode "bf16": the folded rows are rounded to
bf16 and each code is the bf16 number 128 + code (`MAGIC`), whose 128 times the
row's sum is taken off after the dot.

The codes reach the dots several to a register: inline PTX (`unpack`) turns one word
into four int8 codes (`(w >> 2j) & 0x03030303`) or two bf16 ones (shift, then `lop3`
into 0x4300) in two instructions. That needs a word's lanes to be consecutive
elements of the dot's contraction, so the prototype packs the cache differently from
main (`pack_keys`, `pack_values`; below for int8's four lanes, while bf16's two lanes
hold element 2 j + b of a word's 16 at bits 16 b + 2 j):

  keys    words [C, D / 16]: word i of token t holds channel 16 i + 4 j + b at
          bits 8 b + 2 j (contraction over channels);
  values  words [C / 16, D]: word r of channel c holds token 16 r + 4 j + b at
          bits 8 b + 2 j (contraction over tokens).

The PTX treats a register's lanes as consecutive elements of the last axis, which
Triton does not promise: with 8 warps the results are wrong (NOTES.md).

Shapes (B rows, K kv heads, H = 4 query heads per kv head, D = 128, C capacity):
  q [B, K, H, D]; kw [B, K, C, D/16] int32; ks, kz [B, K, C/32, D];
  vw [B, K, C/16, D] int32; vs, vz [B, K, C, D/32]; n_valid [B] int32.
Returns per-split partials (acc [B, K, S, H, D], m [B, K, S, H], l [B, K, S, H])
for `kivi_jax.pallas_kernels.decode_attention.merge_partials`.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from kivi_jax.pallas_kernels import decode_attention as da

H, D, G, T = 4, 128, 32, 128  # query heads per kv head, head dim, group, step tokens
NG, NCG = T // G, D // G  # key groups per step, value channel groups
NEG = -1e30


def _fields(mode: str):
  """Codes per register (`lanes`) and their bit stride: four 8-bit lanes for int8
  operands, two 16-bit lanes for bf16 ones."""
  lanes = {"int8": 4, "bf16": 2}[mode]
  return lanes, 32 // lanes


def _shifts(mode: str):
  """[16 // lanes, lanes]: the bit of code `lanes * j + b` of a word."""
  lanes, width = _fields(mode)
  return width * np.arange(lanes)[None, :] + 2 * np.arange(16 // lanes)[:, None]


def pack_keys(codes, mode: str):
  """`codes` [..., C, D] in 0..3 -> words [..., C, D/16] int32 (module docstring)."""
  lanes, _ = _fields(mode)
  c = np.asarray(codes, np.uint32).reshape(*codes.shape[:-1], D // 16, 16 // lanes, lanes)
  return (c << _shifts(mode)).sum(axis=(-1, -2), dtype=np.uint32).view(np.int32)


def pack_values(codes, mode: str):
  """`codes` [..., C, D] in 0..3 -> words [..., C/16, D] int32 (module docstring)."""
  lanes, _ = _fields(mode)
  *lead, n, d = codes.shape
  c = np.asarray(codes, np.uint32).reshape(*lead, n // 16, 16 // lanes, lanes, d)
  return (c << _shifts(mode)[:, :, None]).sum(axis=(-2, -3), dtype=np.uint32).view(np.int32)


# One register of codes from a word `$1` and the shift `2 j` of its lanes. bf16: each
# 16-bit lane becomes 0x4300 | code, the bf16 number 128 + code (lop3 0xea: (a & b) | c).
_ASM = {
    "int8": "{ .reg .b32 t; shr.b32 t, $1, $5; and.b32 $0, t, 0x03030303; }",
    "bf16": "{ .reg .b32 t; shr.b32 t, $1, $3; lop3.b32 $0, t, 0x00030003, 0x43004300, 0xea; }",
}
MAGIC = {"int8": 0.0, "bf16": 128.0}  # what unpack adds to each code


def unpack(words, mode: str, asm: bool):
  """int32 `words` [X, Y] -> codes [X, Y * 16] (word y's code k at 16 y + k), as int8
  codes or as bf16 `128 + code` (`MAGIC`).

  With `asm`, inline PTX makes one register of codes (four int8 or two bf16) from a
  word in two instructions (Triton packs the lanes into one register, `pack`);
  otherwise the same function in jnp ops, for interpret mode."""
  lanes, width = _fields(mode)
  x, y = words.shape
  shape = (x, y, 16 // lanes, lanes)
  wb = jnp.broadcast_to(words[:, :, None, None], shape)
  j = jax.lax.broadcasted_iota(jnp.int32, shape, 2)
  dtype = jnp.int8 if mode == "int8" else jnp.bfloat16
  if asm:
    [codes] = pltriton.elementwise_inline_asm(
        _ASM[mode], args=[wb, 2 * j], constraints="=r" + ",r" * (2 * lanes), pack=lanes,
        result_shape_dtypes=[jax.ShapeDtypeStruct(shape, dtype)])
  else:
    b = jax.lax.broadcasted_iota(jnp.int32, shape, 3)
    codes = ((wb >> (2 * j + width * b)) & 3)
    codes = codes.astype(jnp.int8) if mode == "int8" else (codes + 128).astype(dtype)
  return codes.reshape(x, y * 16)


def fold(x, axis: int, mode: str):
  """A folded operand `x` for the dot, and its scale per slice along `axis`
  (x ~ operand * scale): int8 with max |x| -> 127, or bf16 with scale 1."""
  if mode == "bf16":
    return x.astype(jnp.bfloat16), jnp.ones_like(jnp.sum(x, axis=axis, keepdims=True))
  amax = jnp.max(jnp.abs(x), axis=axis, keepdims=True)
  inv = jnp.where(amax > 0, 127.0 / amax, 0.0)
  return jnp.floor(x * inv + 0.5).astype(jnp.int8), amax * (1.0 / 127.0)


def _dot(a, b, mode: str):
  """a [M, K] . b [N, K]^T, accumulated in int32 or float32, as float32; with bf16
  codes (128 + code in b) the 128 * row sums of a are taken off."""
  out = jax.lax.dot_general(a, b, (((1,), (1,)), ((), ())),
                            preferred_element_type=jnp.int32 if mode == "int8" else jnp.float32)
  out = out.astype(jnp.float32)
  if MAGIC[mode]:
    out = out - MAGIC[mode] * jnp.sum(a.astype(jnp.float32), axis=1, keepdims=True)
  return out


def _kernel(q_ref, kw_ref, ks_ref, kz_ref, vw_ref, vs_ref, vz_ref, n_ref,
            acc_ref, m_ref, l_ref, *, steps_per_split: int, sm_scale: float, mode: str, asm: bool):
  split = pl.program_id(2)
  q = q_ref[...].astype(jnp.float32) * sm_scale  # [H, D]
  n = n_ref[0]
  first = split * steps_per_split
  last = jnp.minimum(first + steps_per_split, (n + T - 1) // T)
  tok_in_step = jax.lax.broadcasted_iota(jnp.int32, (1, T), 1)
  own_group = (jax.lax.broadcasted_iota(jnp.int32, (1, NG, T), 2) // G
               == jax.lax.broadcasted_iota(jnp.int32, (1, NG, T), 1))
  own_cgroup = (jax.lax.broadcasted_iota(jnp.int32, (1, NCG, D), 2) // G
                == jax.lax.broadcasted_iota(jnp.int32, (1, NCG, D), 1))

  def step(i, carry):
    m_prev, l_prev, acc, zacc = carry
    t0 = pl.multiple_of(i * T, T)
    # Scores: a folded int8 query row per (head, group).
    ks = ks_ref[pl.ds(i * NG, NG), :].astype(jnp.float32)  # [NG, D]
    kz = kz_ref[pl.ds(i * NG, NG), :].astype(jnp.float32)
    qi, qscale = fold(q[:, None, :] * ks[None, :, :], 2, mode)  # [H, NG, D], [H, NG, 1]
    bias = jnp.sum(q[:, None, :] * kz[None, :, :], axis=2, keepdims=True)  # [H, NG, 1]
    kc = unpack(kw_ref[pl.ds(t0, T), :], mode, asm)  # [T, D]
    s_all = _dot(qi.reshape(H * NG, D), kc, mode).reshape(H, NG, T) * qscale + bias
    s = jnp.sum(jnp.where(own_group, s_all, 0.0), axis=1)  # [H, T]
    live = t0 + tok_in_step < n
    s = jnp.where(live, s, NEG)
    m_new = jnp.maximum(m_prev, jnp.max(s, axis=1))
    corr = jnp.exp(m_prev - m_new)
    p = jnp.where(live, jnp.exp(s - m_new[:, None]), 0.0)  # [H, T]
    l_new = l_prev * corr + jnp.sum(p, axis=1)
    # Values: a folded int8 probability row per (head, channel group).
    vs = vs_ref[pl.ds(t0, T), :].astype(jnp.float32).T  # [NCG, T]
    vz = vz_ref[pl.ds(t0, T), :].astype(jnp.float32).T
    pi, pscale = fold(p[:, None, :] * vs[None, :, :], 2, mode)  # [H, NCG, T]
    vc = unpack(vw_ref[pl.ds(i * (T // 16), T // 16), :].T, mode, asm)  # [D, T]
    pv = _dot(pi.reshape(H * NCG, T), vc, mode).reshape(H, NCG, D) * pscale
    zacc = zacc * corr[:, None] + jnp.sum(p[:, None, :] * vz[None, :, :], axis=2)
    return m_new, l_new, acc * corr[:, None, None] + pv, zacc

  init = (jnp.full((H,), NEG, jnp.float32), jnp.zeros((H,), jnp.float32),
          jnp.zeros((H, NCG, D), jnp.float32), jnp.zeros((H, NCG), jnp.float32))
  m, l, acc, zacc = jax.lax.fori_loop(first, jnp.maximum(first, last), step, init)
  # Each channel keeps the row of its own channel group.
  acc_ref[...] = jnp.sum(jnp.where(own_cgroup, acc + zacc[:, :, None], 0.0), axis=1)
  m_ref[...] = m
  l_ref[...] = l


@functools.partial(jax.jit, static_argnames=("splits", "mode", "num_warps", "num_stages", "asm",
                                             "interpret"))
def partials(q, kw, ks, kz, vw, vs, vz, n_valid, *, splits: int, mode: str, num_warps: int = 4,
             num_stages: int = 2, asm: bool = True, interpret: bool = False):
  """Per-split partials of attention over the block (module docstring)."""
  b, k, h, d = q.shape
  if (h, d) != (H, D):
    raise ValueError(f"the prototype takes {H} query heads of dim {D}, got {h} of {d}")
  capacity = kw.shape[2]
  steps_per_split = -(-(capacity // T) // splits)
  kernel = functools.partial(_kernel, steps_per_split=steps_per_split,
                             sm_scale=1.0 / math.sqrt(d), mode=mode, asm=asm)
  slab = lambda x: pl.BlockSpec((None, None, *x.shape[2:]), lambda i, j, s: (i, j, 0, 0))
  out = lambda *dims: pl.BlockSpec((None, None, None, *dims),
                                   lambda i, j, s: (i, j, s) + (0,) * len(dims))
  inputs = [q, kw, ks, kz, vw, vs, vz, n_valid.astype(jnp.int32)]
  return da.pallas_call(
      kernel, inputs, [*map(slab, inputs[:-1]), pl.BlockSpec((1,), lambda i, j, s: (i,))],
      [out(H, D), out(H), out(H)],
      [jax.ShapeDtypeStruct((b, k, splits, H, D), jnp.float32),
       jax.ShapeDtypeStruct((b, k, splits, H), jnp.float32),
       jax.ShapeDtypeStruct((b, k, splits, H), jnp.float32)],
      grid=(b, k, splits), poison=False, num_warps=num_warps, num_stages=num_stages,
      interpret=interpret, name="kivi_decode_int8")
