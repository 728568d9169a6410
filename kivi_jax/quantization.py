"""Reference quantization in pure jnp: the specification the Pallas kernels match.

Asymmetric quantization of a group `x` sharing one scale (SPEC.md):
  lo = min(x), hi = max(x), scale = (hi - lo) / (2^b - 1), zero = lo,
  q = clip(round((x - zero) / scale), 0, 2^b - 1),  x' = q * scale + zero.

Two groupings of a `[..., T, D]` tensor (T tokens, D channels of one head):
  axis="channel": per-channel quantization; G consecutive tokens of one channel
    share a scale. scale/zero `[..., T/G, D]`. (KIVI's keys.)
  axis="token": per-token quantization; G consecutive channels of one token
    share a scale (all D of the head where G > D). scale/zero `[..., T, D/G]`.
    (KIVI's values.)

Codes are packed along the token axis into uint32 words, `w = 32 // b` codes
per word, in *group slots*: `w` consecutive groups of `G` tokens form a packing
block of `G` word rows, and group `j` of the block occupies bits `[j*b, (j+1)*b)`
of every row. Token `t` (group `g = t // G`) sits at word row
`(g // w) * G + t % G`, slot `g % w`: `[..., T, D] -> [..., T/w, D]`, T a
multiple of `w * G`. Extracting one slot of a block's `G` rows yields one whole
group of consecutive tokens, which is what lets a kernel fold the group's
scale into the query or the probabilities; the channel axis stays last.

Ternary codes (1.5 bits, SKVQ's values) use the same slots, 20 to a word:
slot `j` is base-3 digit `j % 5` of byte `j // 5`, so a byte holds 5 codes
(3^5 = 243 <= 256): 1.6 bits per code.

The *pair* layout (`pair_pack`; a cache's `layout="pairs"`) packs 2-, 4- or
8-bit codes along a row's last axis instead, in spans of 128 columns, for
Hopper's `wgmma`: column `c = 16 s + 8 h + 2 j + e` (`s < 8`, `h, e < 2`,
`j < 4`) of a span sits in word `8 (s // p) + 2 j + h` of the span's `4 b`
words, at bit `b (s % p) + 16 e`, `p = 16 // b`. A thread of the WGMMA register
layout holds words `2 j + h` of its rows, and `(w >> b (s % p)) & field` in
each 16-bit half is then its pair of k-step `s`, already in place. A row of 64
columns (64-wide heads' keys) packs alone, read as 16-bit halves: column
`c = 8 t + 2 j + e` (`t < 8`) sits in word `4 (t // p) + j` of its `2 b` words,
at bit `b (t % p) + 16 e` (a thread of the WGMMA layout over the halves holds
words `4 k + j`).

`quantize` and `dequantize` also take an explicit channel grouping for axis
"token" (SKVQ's unequal groups over the reordered hidden dim): `groups = (ids,
n)`, `ids` int32 `[D]` the nondecreasing group of each channel, `n` groups;
scale and zero are then `[..., T, n]`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import Array

from kivi_jax.config import QuantAxis, channel_group, codes_per_word, levels
from kivi_jax.pallas_kernels.common import PAIR_SPAN, ieee_divide


def slot_fields(bits: float) -> tuple[np.ndarray, np.ndarray, int]:
  """Per slot `j` of a word: `(shift, divisor)` uint32 `[w]` and a field mask, so
  that slot `j`'s code is `((word >> shift[j]) & field) // divisor[j] % (levels + 1)`
  and a word is `sum_j code_j * divisor[j] << shift[j]`."""
  w = codes_per_word(bits)
  j = np.arange(w, dtype=np.uint32)
  if bits == 1.5:
    return (8 * (j // 5)).astype(np.uint32), (3 ** (j % 5)).astype(np.uint32), 255
  return (j * bits).astype(np.uint32), np.ones(w, np.uint32), 2**bits - 1


def pack(codes: Array, bits: float, group_size: int) -> Array:
  """Packs integer codes `[..., T, D]` in `[0, levels]` into uint32 `[..., T/w, D]`."""
  w, g = codes_per_word(bits), group_size
  *lead, t, d = codes.shape
  if t % (w * g):
    raise ValueError(f"token axis ({t}) must be a multiple of {w * g} (codes per word "
                     f"{w} x group_size {g}) to pack {bits}-bit codes")
  codes = codes.astype(jnp.uint32).reshape(*lead, t // (w * g), w, g, d)
  shift, div, _ = slot_fields(bits)
  place = jnp.asarray(div << shift)[:, None, None]
  # The fields are disjoint, so their sum is their bitwise or.
  words = jnp.sum(codes * place, axis=-3, dtype=jnp.uint32)
  return words.reshape(*lead, t // w, d)


def unpack(words: Array, bits: float, group_size: int) -> Array:
  """Inverse of `pack`: uint32 `[..., T/w, D]` -> uint8 codes `[..., T, D]`."""
  w, g = codes_per_word(bits), group_size
  *lead, tw, d = words.shape
  words = words.reshape(*lead, tw // g, 1, g, d)
  shift, div, field = slot_fields(bits)
  shift, div = jnp.asarray(shift)[:, None, None], jnp.asarray(div)[:, None, None]
  codes = ((words >> shift) & jnp.uint32(field)) // div % jnp.uint32(levels(bits) + 1)
  return codes.reshape(*lead, tw * w, d).astype(jnp.uint8)


PAIR_BITS = (2, 4, 8)


def _pair_fields(bits: int):
  """`(p, shift)`: steps per word and the shift of each `(s % p, e)` field,
  uint32 `[p, 2]` (module docstring, the pair layout)."""
  if bits not in PAIR_BITS:
    raise ValueError(f"the pair layout holds {PAIR_BITS}-bit codes, got {bits}")
  p = 16 // bits
  return p, (bits * np.arange(p)[:, None] + 16 * np.arange(2)).astype(np.uint32)


def pair_pack(codes: Array, bits: int) -> Array:
  """Packs integer codes `[..., n]` in `[0, 2^b - 1]` (n 64 or a multiple of 128)
  into uint32 `[..., n b / 32]` in the pair layout (module docstring)."""
  p, shift = _pair_fields(bits)
  *lead, n = codes.shape
  if n == PAIR_SPAN // 2:
    # Column 8 t + 2 j + e with t = p t_hi + t_lo: [..., t_hi, t_lo, j, e].
    c = codes.astype(jnp.uint32).reshape(*lead, 8 // p, p, 4, 2)
    place = jnp.asarray(shift)[:, None, :]  # [t_lo, 1, e]
    return jnp.sum(c << place, axis=(-3, -1), dtype=jnp.uint32).reshape(*lead, 2 * bits)
  if n % PAIR_SPAN:
    raise ValueError(f"the last axis ({n}) must be 64 or a multiple of {PAIR_SPAN} to pack "
                     "codes in the pair layout")
  # Column 16 s + 8 h + 2 j + e with s = p s_hi + s_lo: [..., span, s_hi, s_lo, h, j, e].
  c = codes.astype(jnp.uint32).reshape(*lead, n // PAIR_SPAN, 8 // p, p, 2, 4, 2)
  place = jnp.asarray(shift)[:, None, None, :]  # [s_lo, 1, 1, e]
  # The fields are disjoint, so their sum is their bitwise or.
  words = jnp.sum(c << place, axis=(-4, -1), dtype=jnp.uint32)  # [..., span, s_hi, h, j]
  return jnp.swapaxes(words, -1, -2).reshape(*lead, n * bits // 32)


def pair_unpack(words: Array, bits: int) -> Array:
  """Inverse of `pair_pack`: uint32 `[..., n b / 32]` -> uint8 codes `[..., n]`."""
  p, shift = _pair_fields(bits)
  *lead, nw = words.shape
  if nw == 2 * bits:  # a row of 64 columns
    w = words.reshape(*lead, 8 // p, 1, 4, 1)  # [..., t_hi, t_lo, j, e]
    c = (w >> jnp.asarray(shift)[:, None, :]) & jnp.uint32(2**bits - 1)
    return c.reshape(*lead, PAIR_SPAN // 2).astype(jnp.uint8)
  spans = nw // (4 * bits)
  w = jnp.swapaxes(words.reshape(*lead, spans, 8 // p, 4, 2), -1, -2)  # [.., s_hi, h, j]
  c = (w[..., None, :, :, None] >> jnp.asarray(shift)[:, None, None, :]) & jnp.uint32(
      2**bits - 1)  # [..., span, s_hi, s_lo, h, j, e]
  return c.reshape(*lead, spans * PAIR_SPAN).astype(jnp.uint8)


def _grouped(x: Array, group_size: int, axis: QuantAxis) -> Array:
  """`[..., T, D]` -> groups on axis -2 (channel) or -1 (token)."""
  *lead, t, d = x.shape
  if axis == "channel":
    return x.reshape(*lead, t // group_size, group_size, d)
  c = channel_group(group_size, d)
  return x.reshape(*lead, t, d // c, c)


# Up to this many (element, group) pairs `_segment` reduces each group's
# channels under a mask; past it, by a scan whose memory is linear in `x`. On an
# H200 at Llama-2-7B's width (a flush of 32 tokens x 4096 channels, 256 groups:
# 2**25 pairs a row) the masked way made SKVQ's step 17% faster at batch 1, 11%
# at 2, and 4-32% slower at 4 to 32 (`benchmarks/NOTES.md`).
SEGMENT_MASKED_PAIRS = 1 << 26


def _segment(reduce, identity: float, x: Array, ids: Array, n: int) -> Array:
  """`reduce` (`jnp.minimum` or `jnp.maximum`) over each group of channels,
  `[..., T, D]` -> `[..., T, n]`, `ids` sorted; an empty group gets `identity`.

  Little work (a decode step's flush of one group of tokens, few rows): each
  group's reduction over all channels with the others masked, `n` times the
  work of one pass over `x` in a handful of operations that XLA fuses. The scan
  below is some 300 operations, twice in each of a layer's two tensors, which
  doubled the HLO of SKVQ's decode step and its compile time
  (`benchmarks/NOTES.md`).

  More work (prefills, large batches): a scan along the channels restarting at
  each group's first one, read at each group's last: memory linear in `x`.
  (`jax.ops.segment_min` is a scatter, which XLA's GPU backend expanded to 42 GB
  for a prefill of 4 x 4096 tokens over Mistral-7B's 1024 channels.)
  """
  if x.size * n <= SEGMENT_MASKED_PAIRS:
    member = ids[None, :] == jnp.arange(n)[:, None]  # [n, D]
    return reduce.reduce(jnp.where(member, x[..., None, :], identity), axis=-1)
  starts = jnp.concatenate([jnp.ones((1,), bool), ids[1:] != ids[:-1]])

  def combine(a, b):
    return jnp.where(b[1], b[0], reduce(a[0], b[0])), a[1] | b[1]

  runs, _ = jax.lax.associative_scan(combine, (x, jnp.broadcast_to(starts, x.shape)),
                                     axis=-1)
  # Each group's last channel, by counting (`ids` is sorted): searchsorted's
  # default binary search is a while loop, whose every iteration a GPU step
  # waits on from the host (1664 a step of SKVQ at Llama-2-7B's width).
  upto = jnp.sum(ids[None, :] <= jnp.arange(n)[:, None], axis=-1)  # [n]
  last = upto - 1
  present = upto > jnp.concatenate([jnp.zeros((1,), upto.dtype), upto[:-1]])
  return jnp.where(present, jnp.take(runs, jnp.maximum(last, 0), axis=-1), identity)


def quantize(
    x: Array, bits: float, group_size: int, axis: QuantAxis, scale_dtype,
    clip: float | Array = 1.0, groups: tuple[Array, int] | None = None,
) -> tuple[Array, Array, Array]:
  """Asymmetric `bits`-bit quantization of `x` `[..., T, D]`.

  Returns `(codes, scale, zero)`: uint8 codes `[..., T, D]` (unpacked) and scale,
  zero in `scale_dtype` with the shapes in the module docstring. Codes are
  computed from the *stored* scale and zero, so the only error beyond `scale/2`
  is the clipping caused by rounding them to `scale_dtype`.

  `clip` < 1 (a number or a traced scalar) is SKVQ's clipped dynamic
  quantization: each group's `lo` and `hi` are multiplied by `clip` before its
  scale and zero are computed and codes are clamped, trading the extremes'
  error for finer steps. A constant group is not clipped (it has no steps to
  gain) and still dequantizes exactly. `groups` (axis "token" only): the
  module docstring's explicit channel grouping.
  """
  x32 = x.astype(jnp.float32)
  if groups is not None:
    if axis != "token":
      raise ValueError(f"explicit channel groups need axis='token', got {axis!r}")
    ids, n = groups
    lo = _segment(jnp.minimum, jnp.inf, x32, ids, n)[..., None, :]  # [..., T, 1, n]
    hi = _segment(jnp.maximum, -jnp.inf, x32, ids, n)[..., None, :]
    xg, red = x32[..., None, :], -2  # broadcasts against lo[..., ids]
  else:
    red = -2 if axis == "channel" else -1
    xg = _grouped(x32, group_size, axis)
    lo = jnp.min(xg, axis=red, keepdims=True)
    hi = jnp.max(xg, axis=red, keepdims=True)
  if not (isinstance(clip, (int, float)) and clip == 1):
    spread = hi > lo
    lo, hi = jnp.where(spread, lo * clip, lo), jnp.where(spread, hi * clip, hi)
  top = levels(bits)
  # Times the float32 reciprocal, spelled out: XLA rewrites a division by a
  # constant so anyway, and the GPU kernels must round as this does.
  scale = ((hi - lo) * (1.0 / top)).astype(scale_dtype)
  zero = lo.astype(scale_dtype)
  s32, z32 = scale.astype(jnp.float32), zero.astype(jnp.float32)
  if groups is not None:
    s32, z32 = s32[..., ids], z32[..., ids]
  # A constant group has scale 0: every code is 0 and x' = zero = x exactly.
  safe = jnp.where(s32 > 0, s32, 1.0)
  # IEEE division, as the GPU write kernel divides.
  q = jnp.where(s32 > 0, jnp.round(ieee_divide(xg - z32, safe)), 0.0)
  codes = jnp.clip(q, 0, top).astype(jnp.uint8).reshape(x.shape)
  return codes, jnp.squeeze(scale, red), jnp.squeeze(zero, red)


def dequantize(
    codes: Array, scale: Array, zero: Array, group_size: int, axis: QuantAxis, dtype,
    groups: tuple[Array, int] | None = None,
) -> Array:
  """`codes * scale + zero` with each group's scale broadcast, in `dtype`."""
  if groups is not None:
    ids, _ = groups
    s, z = scale.astype(jnp.float32)[..., ids], zero.astype(jnp.float32)[..., ids]
    return (codes.astype(jnp.float32) * s + z).astype(dtype)
  red = -2 if axis == "channel" else -1
  cg = _grouped(codes, group_size, axis).astype(jnp.float32)
  s = jnp.expand_dims(scale.astype(jnp.float32), red)
  z = jnp.expand_dims(zero.astype(jnp.float32), red)
  return (cg * s + z).reshape(codes.shape).astype(dtype)
