"""SPEC.md's formulas in float64 numpy: the independent reference for the tests."""

import numpy as np


def quantize(x, bits, group_size, axis, clip=1.0):
  """Returns (codes, scale, zero, dequantized), all float64, `x` [..., T, D].

  `clip`: SPEC.md's clipped dynamic quantization (lo and hi scaled by it; a
  constant group is left alone)."""
  x = np.asarray(x, np.float64)
  *lead, t, d = x.shape
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
  scale = (hi - lo) / (2**bits - 1)
  with np.errstate(divide="ignore", invalid="ignore"):
    q = np.where(scale > 0, np.clip(np.round((g - lo) / scale), 0, 2**bits - 1), 0)
  deq = q * scale + lo
  return (q.reshape(x.shape), np.squeeze(scale, red), np.squeeze(lo, red),
          deq.reshape(x.shape))


def attention(q, keys, values, visible):
  """softmax(q k^T / sqrt(d)) v in float64; q [Tq, D], keys/values [S, D], visible [Tq, S]."""
  s = q @ keys.T / np.sqrt(q.shape[-1])
  s = np.where(visible, s, -np.inf)
  p = np.exp(s - s.max(-1, keepdims=True))
  return (p / p.sum(-1, keepdims=True)) @ values
