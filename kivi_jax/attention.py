"""Attention of new tokens over one layer of the cache, in pure jnp.

This is the reference the decode kernels must match: scores against the
quantized block (dequantized here; a kernel never materializes it), the
full-precision ring and the new tokens, under one softmax (SPEC.md, "Attention
in a decode step").
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import Array

from kivi_jax.cache import LayerKV, dequantize_block, n_quantized, ring_positions
from kivi_jax.config import KIVIConfig

# Finite, so a query that sees no key (a padding row) gets a uniform softmax, not NaN.
_MASKED = float(jnp.finfo(jnp.float32).min)


def cache_attention(q: Array, layer: LayerKV, k_new: Array, v_new: Array,
                    lengths: Array, n_new: Array, config: KIVIConfig,
                    sliding_window: int | None = None) -> Array:
  """Causal GQA attention of `T` new queries over the cache and themselves.

  Args:
    q: `[B, T, Hq, D]` queries of the new tokens (RoPE applied), unscaled.
    layer: one layer's cache before the new tokens are appended.
    k_new, v_new: `[B, Hkv, T, D]` keys and values of the new tokens.
    lengths: int32 `[B]`, tokens already cached per row; new token `j` of row
      `b` sits at position `lengths[b] + j`.
    n_new: int32 `[B]`, real new tokens per row; the rest are padding.
    sliding_window: if set, a query at position `i` sees keys at `p > i - W`.

  Returns:
    `[B, T, Hq, D]` in `q.dtype`.
  """
  b, t, hq, d = q.shape
  hkv = k_new.shape[1]
  dtype = q.dtype
  nq = n_quantized(lengths, config)

  # [B, Hkv, C, D] each: the block as full precision (the reference's shortcut).
  k_block = dequantize_block(layer.k, config.k_bits, config.key_axis, config, dtype)
  v_block = dequantize_block(layer.v, config.v_bits, config.value_axis, config, dtype)
  c = k_block.shape[2]
  ring_pos, ring_valid = ring_positions(lengths, config)
  new_pos = lengths[:, None] + jnp.arange(t)[None, :]

  # [B, Hkv, S, D] with S = C + R + T, and per key its position and liveness.
  keys = jnp.concatenate([k_block, layer.ring_k.astype(dtype), k_new.astype(dtype)], 2)
  values = jnp.concatenate([v_block, layer.ring_v.astype(dtype), v_new.astype(dtype)], 2)
  block_pos = jnp.broadcast_to(jnp.arange(c)[None, :], (b, c))
  key_pos = jnp.concatenate([block_pos, ring_pos, new_pos], 1)
  key_live = jnp.concatenate([
      block_pos < nq[:, None],
      ring_valid,
      jnp.arange(t)[None, :] < n_new[:, None],
  ], 1)

  # [B, T, S]
  visible = key_live[:, None, :] & (key_pos[:, None, :] <= new_pos[:, :, None])
  if sliding_window is not None:
    visible &= key_pos[:, None, :] > new_pos[:, :, None] - sliding_window

  qg = q.reshape(b, t, hkv, hq // hkv, d)
  # [B, Hkv, rep, T, S]
  scores = jnp.einsum("BTKGD,BKSD->BKGTS", qg, keys,
                      preferred_element_type=jnp.float32) / jnp.sqrt(jnp.float32(d))
  scores = jnp.where(visible[:, None, None], scores, _MASKED)
  probs = jnp.exp(scores - scores.max(-1, keepdims=True))
  probs = probs / probs.sum(-1, keepdims=True)
  out = jnp.einsum("BKGTS,BKSD->BTKGD", probs.astype(values.dtype), values,
                   preferred_element_type=jnp.float32)
  return out.reshape(b, t, hq, d).astype(dtype)
