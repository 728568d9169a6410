"""Attention of new tokens over one layer of the cache, in pure jnp.

This is the reference the decode kernels must match: scores against the
quantized block (dequantized here; a kernel never materializes it), the
full-precision ring and the new tokens, under one softmax (SPEC.md, "Attention
in a decode step").
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import Array
from jax.experimental.pallas import tpu as pltpu

from kivi_jax.cache import LayerKV, dequantize_block, n_quantized, ring_positions
from kivi_jax.config import KIVIConfig
from pallas_kernels import decode_attention as gpu_decode
from pallas_kernels import decode_attention_tpu as tpu_decode

# Finite, so a query that sees no key (a padding row) gets a uniform softmax, not NaN.
_MASKED = float(jnp.finfo(jnp.float32).min)


def kernel_applies(config: KIVIConfig, head_dim: int) -> bool:
  """The decode kernels read KIVI's axes with both tensors quantized."""
  return (config.quantizes_keys and config.quantizes_values
          and config.key_axis == "channel" and config.value_axis == "token"
          and head_dim % config.group_size == 0)


def resolve_impl(impl: str, config: KIVIConfig, head_dim: int, t: int) -> str:
  """Which implementation reads the cache: "reference", "gpu" or "tpu"."""
  if t != 1 or not kernel_applies(config, head_dim):
    return "reference"
  if impl == "auto":
    backend = jax.default_backend()
    return backend if backend in ("gpu", "tpu") else "reference"
  return impl


def cache_attention(q: Array, layer: LayerKV, k_new: Array, v_new: Array,
                    lengths: Array, n_new: Array, config: KIVIConfig,
                    sliding_window: int | None = None, impl: str = "reference") -> Array:
  """Causal GQA attention of `T` new queries over the cache and themselves.

  Args:
    q: `[B, T, Hq, D]` queries of the new tokens (RoPE applied), unscaled.
    layer: one layer's cache before the new tokens are appended.
    k_new, v_new: `[B, Hkv, T, D]` keys and values of the new tokens.
    lengths: int32 `[B]`, tokens already cached per row; new token `j` of row
      `b` sits at position `lengths[b] + j`.
    n_new: int32 `[B]`, real new tokens per row; the rest are padding.
    sliding_window: if set, a query at position `i` sees keys at `p > i - W`.
    impl: `KVCache.impl`; a kernel reads the block in decode steps (T = 1).

  Returns:
    `[B, T, Hq, D]` in `q.dtype`.
  """
  which = resolve_impl(impl, config, q.shape[-1], q.shape[1])
  if which != "reference":
    return _decode_with_kernel(q, layer, k_new, v_new, lengths, n_new, config,
                               sliding_window, which)
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


def _decode_with_kernel(q, layer: LayerKV, k_new, v_new, lengths, n_new,
                        config: KIVIConfig, sliding_window, which: str):
  """One decode step: a kernel over the packed block, jnp over the ring and the
  new token (at most R + 1 keys), merged by their log-sum-exps."""
  b, _, hq, d = q.shape
  hkv = k_new.shape[1]
  rep = hq // hkv
  # Pad the query rows of a kv head with zeros to what the kernel's dot wants:
  # 16 rows on GPUs, 8 sublanes on TPUs.
  m_rows = max(16 if which == "gpu" else tpu_decode.MIN_ROWS, 1 << (rep - 1).bit_length())
  # [B, Hkv, rep, D]
  qg = q[:, 0].reshape(b, hkv, rep, d)
  nq = n_quantized(lengths, config)
  lo = jnp.zeros_like(lengths) if sliding_window is None else jnp.maximum(
      lengths - sliding_window + 1, 0)
  args = (jnp.pad(qg, ((0, 0), (0, 0), (0, m_rows - rep), (0, 0))),
          layer.k.codes, layer.k.scale, layer.k.zero, layer.v.codes, layer.v.scale,
          layer.v.zero, nq, lo)
  kw = dict(k_bits=config.k_bits, v_bits=config.v_bits, group_size=config.group_size)
  # Off its own backend a kernel runs in Pallas interpret mode (tests on a CPU).
  if which == "gpu":
    o_blk, lse_blk = gpu_decode.quantized_decode_attention(
        *args, **kw, interpret=jax.default_backend() != "gpu")
  else:
    interpret = False if jax.default_backend() == "tpu" else pltpu.InterpretParams()
    o_blk, lse_blk = tpu_decode.quantized_decode_attention(*args, **kw, interpret=interpret)
  o_blk, lse_blk = o_blk[:, :, :rep], lse_blk[:, :, :rep]

  # [B, Hkv, R + 1, D]: the ring and the new token, with positions and liveness.
  ring_pos, ring_valid = ring_positions(lengths, config)
  keys = jnp.concatenate([layer.ring_k, k_new.astype(layer.ring_k.dtype)], 2)
  values = jnp.concatenate([layer.ring_v, v_new.astype(layer.ring_v.dtype)], 2)
  live = jnp.concatenate([ring_valid & (ring_pos >= lo[:, None]), (n_new > 0)[:, None]], 1)
  # [B, Hkv, rep, R + 1]
  s = jnp.einsum("BKGD,BKSD->BKGS", qg, keys,
                 preferred_element_type=jnp.float32) / jnp.sqrt(jnp.float32(d))
  s = jnp.where(live[:, None, None], s, _MASKED)
  m = jnp.max(s, -1)
  p = jnp.where(live[:, None, None], jnp.exp(s - m[..., None]), 0.0)
  l = jnp.sum(p, -1)
  acc = jnp.einsum("BKGS,BKSD->BKGD", p, values.astype(jnp.float32))
  # The block's normalized (o, lse) is the partial (acc = o, m = lse, l = 1).
  out, _ = gpu_decode.merge_partials(
      jnp.stack([o_blk, acc], 2), jnp.stack([lse_blk, m], 2),
      jnp.stack([jnp.ones_like(l), l], 2))
  return out.reshape(b, 1, hq, d).astype(q.dtype)
