"""SPEC.md's formulas in float64 numpy: the independent reference for the tests."""

import numpy as np


def levels(bits):
  """Largest code: 2^b - 1, or 2 for SKVQ's ternary (1.5-bit) codes."""
  return 2 if bits == 1.5 else 2**bits - 1


def quantize(x, bits, group_size, axis, clip=1.0, groups=None, scale_dtype=None):
  """Returns (codes, scale, zero, dequantized), all float64, `x` [..., T, D].

  `clip`: SPEC.md's clipped dynamic quantization (lo and hi scaled by it; a
  constant group is left alone). `groups`: per-token groups given as the group
  id of each channel (SKVQ's unequal groups), instead of runs of G channels.
  `scale_dtype` (e.g. fp8): scale and zero are stored in it, and codes are
  computed from the stored values."""
  x = np.asarray(x, np.float64)
  *lead, t, d = x.shape
  if groups is not None:
    # One group at a time, by masking: independent of how the code under test
    # reduces segments.
    codes, deq = np.zeros_like(x), np.zeros_like(x)
    n = int(np.max(groups)) + 1
    scale, zero = np.zeros((*lead, t, n)), np.zeros((*lead, t, n))
    for gi in range(n):
      cols = np.flatnonzero(np.asarray(groups) == gi)
      c, s, z, dq = quantize(x[..., cols], bits, len(cols), "token", clip,
                             scale_dtype=scale_dtype)
      codes[..., cols], deq[..., cols] = c, dq
      scale[..., gi], zero[..., gi] = s[..., 0], z[..., 0]
    return codes, scale, zero, deq
  if axis == "channel":
    g = x.reshape(*lead, t // group_size, group_size, d)
    red = -2
  else:
    # Per token: groups of G channels, or the whole head where G exceeds it.
    c = min(group_size, d)
    g = x.reshape(*lead, t, d // c, c)
    red = -1
  lo, hi = g.min(red, keepdims=True), g.max(red, keepdims=True)
  spread = hi > lo
  lo, hi = np.where(spread, lo * clip, lo), np.where(spread, hi * clip, hi)
  scale = (hi - lo) / levels(bits)
  if scale_dtype is not None:
    scale = scale.astype(scale_dtype).astype(np.float64)
    lo = lo.astype(scale_dtype).astype(np.float64)
  with np.errstate(divide="ignore", invalid="ignore"):
    q = np.where(scale > 0, np.clip(np.round((g - lo) / scale), 0, levels(bits)), 0)
  deq = q * scale + lo
  return (q.reshape(x.shape), np.squeeze(scale, red), np.squeeze(lo, red),
          deq.reshape(x.shape))


def quantize_hidden(x, bits, perm, groups, clip=1.0, scale_dtype=None):
  """SKVQ's quantization of `x` [Hkv, T, Dh] (SPEC.md, "SKVQ"): per token over the
  hidden dim (heads side by side), channels in `perm` order, in `groups`.
  Returns the dequantized tensor in `x`'s own layout, float64."""
  hkv, t, dh = x.shape
  hidden = np.asarray(x, np.float64).transpose(1, 0, 2).reshape(t, hkv * dh)
  deq = np.empty_like(hidden)
  deq[:, perm] = quantize(hidden[:, perm], bits, 0, "token", clip, groups, scale_dtype)[3]
  return deq.reshape(t, hkv, dh).transpose(1, 0, 2)


def rope(x, positions, theta=10000.0):
  """RoPE (rotate_half layout) of `x` [..., S, D] at `positions` [S], float64."""
  x = np.asarray(x, np.float64)
  d = x.shape[-1]
  inv_freq = 1.0 / theta ** (np.arange(0, d, 2) / d)
  ang = np.asarray(positions, np.float64)[:, None] * np.concatenate([inv_freq, inv_freq])
  x1, x2 = x[..., :d // 2], x[..., d // 2:]
  return x * np.cos(ang) + np.concatenate([-x2, x1], -1) * np.sin(ang)


def attention(q, keys, values, visible):
  """softmax(q k^T / sqrt(d)) v in float64; q [Tq, D], keys/values [S, D], visible [Tq, S]."""
  s = q @ keys.T / np.sqrt(q.shape[-1])
  s = np.where(visible, s, -np.inf)
  p = np.exp(s - s.max(-1, keepdims=True))
  return (p / p.sum(-1, keepdims=True)) @ values
