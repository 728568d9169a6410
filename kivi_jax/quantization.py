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
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import Array

from kivi_jax.config import QuantAxis, channel_group, codes_per_word


def pack(codes: Array, bits: int, group_size: int) -> Array:
  """Packs integer codes `[..., T, D]` in `[0, 2^bits)` into uint32 `[..., T/w, D]`."""
  w, g = codes_per_word(bits), group_size
  *lead, t, d = codes.shape
  if t % (w * g):
    raise ValueError(f"token axis ({t}) must be a multiple of {w * g} (codes per word "
                     f"{w} x group_size {g}) to pack {bits}-bit codes")
  codes = codes.astype(jnp.uint32).reshape(*lead, t // (w * g), w, g, d)
  shifts = (jnp.arange(w, dtype=jnp.uint32) * bits)[:, None, None]
  # The bit fields are disjoint, so their sum is their bitwise or.
  words = jnp.sum(codes << shifts, axis=-3, dtype=jnp.uint32)
  return words.reshape(*lead, t // w, d)


def unpack(words: Array, bits: int, group_size: int) -> Array:
  """Inverse of `pack`: uint32 `[..., T/w, D]` -> uint8 codes `[..., T, D]`."""
  w, g = codes_per_word(bits), group_size
  *lead, tw, d = words.shape
  words = words.reshape(*lead, tw // g, 1, g, d)
  shifts = (jnp.arange(w, dtype=jnp.uint32) * bits)[:, None, None]
  codes = (words >> shifts) & jnp.uint32(2**bits - 1)
  return codes.reshape(*lead, tw * w, d).astype(jnp.uint8)


def _grouped(x: Array, group_size: int, axis: QuantAxis) -> Array:
  """`[..., T, D]` -> groups on axis -2 (channel) or -1 (token)."""
  *lead, t, d = x.shape
  if axis == "channel":
    return x.reshape(*lead, t // group_size, group_size, d)
  c = channel_group(group_size, d)
  return x.reshape(*lead, t, d // c, c)


def quantize(
    x: Array, bits: int, group_size: int, axis: QuantAxis, scale_dtype, clip: float = 1.0
) -> tuple[Array, Array, Array]:
  """Asymmetric `bits`-bit quantization of `x` `[..., T, D]`.

  Returns `(codes, scale, zero)`: uint8 codes `[..., T, D]` (unpacked) and scale,
  zero in `scale_dtype` with the shapes in the module docstring. Codes are
  computed from the *stored* scale and zero, so the only error beyond `scale/2`
  is the clipping caused by rounding them to `scale_dtype`.

  `clip` < 1 is SKVQ's clipped dynamic quantization: each group's `lo` and `hi`
  are multiplied by `clip` before its scale and zero are computed and codes are
  clamped, trading the extremes' error for finer steps. A constant group is not
  clipped (it has no steps to gain) and still dequantizes exactly.
  """
  red = -2 if axis == "channel" else -1
  xg = _grouped(x, group_size, axis).astype(jnp.float32)
  lo = jnp.min(xg, axis=red, keepdims=True)
  hi = jnp.max(xg, axis=red, keepdims=True)
  if clip != 1.0:
    spread = hi > lo
    lo, hi = jnp.where(spread, lo * clip, lo), jnp.where(spread, hi * clip, hi)
  levels = 2**bits - 1
  scale = ((hi - lo) / levels).astype(scale_dtype)
  zero = lo.astype(scale_dtype)
  s32, z32 = scale.astype(jnp.float32), zero.astype(jnp.float32)
  # A constant group has scale 0: every code is 0 and x' = zero = x exactly.
  safe = jnp.where(s32 > 0, s32, 1.0)
  q = jnp.where(s32 > 0, jnp.round((xg - z32) / safe), 0.0)
  codes = jnp.clip(q, 0, levels).astype(jnp.uint8).reshape(x.shape)
  return codes, jnp.squeeze(scale, red), jnp.squeeze(zero, red)


def dequantize(
    codes: Array, scale: Array, zero: Array, group_size: int, axis: QuantAxis, dtype
) -> Array:
  """`codes * scale + zero` with each group's scale broadcast, in `dtype`."""
  red = -2 if axis == "channel" else -1
  cg = _grouped(codes, group_size, axis).astype(jnp.float32)
  s = jnp.expand_dims(scale.astype(jnp.float32), red)
  z = jnp.expand_dims(zero.astype(jnp.float32), red)
  return (cg * s + z).reshape(codes.shape).astype(dtype)
