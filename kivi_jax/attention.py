"""Attention of new tokens over one layer of the cache, in pure jnp.

This is the reference the decode kernels must match: scores against the
quantized block (dequantized here; a kernel never materializes it), the
full-precision ring and the new tokens, under one softmax (SPEC.md, "Attention
in a decode step").
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import Array

from kivi_jax.cache import (LayerKV, dequantize_block, kernel_backend, kernel_interpret,
                            n_quantized, ring_positions)
from kivi_jax.config import KIVIConfig
from pallas_kernels import decode_attention as gpu_decode
from pallas_kernels import decode_attention_hidden as gpu_hidden
from pallas_kernels import decode_attention_tpu as tpu_decode

# Finite, so a query that sees no key (a padding row) gets a uniform softmax, not NaN.
_MASKED = float(jnp.finfo(jnp.float32).min)


def apply_rope(x: Array, positions: Array, inv_freq: Array) -> Array:
  """Rotates `x` `[B, T, H, Dh]` at int `positions` `[B, T]` (HF's rotate_half layout)."""
  # [B, T, Dh/2]
  freqs = positions[..., None].astype(jnp.float32) * inv_freq
  # [B, T, 1, Dh]
  cos = jnp.cos(jnp.concatenate([freqs, freqs], -1))[:, :, None, :].astype(x.dtype)
  sin = jnp.sin(jnp.concatenate([freqs, freqs], -1))[:, :, None, :].astype(x.dtype)
  x1, x2 = jnp.split(x, 2, axis=-1)
  return x * cos + jnp.concatenate([-x2, x1], -1) * sin


def _rotate_keys(keys: Array, positions: Array, inv_freq: Array) -> Array:
  """`apply_rope` of keys `[B, Hkv, S, D]` at positions `[B, S]`."""
  return apply_rope(keys.swapaxes(1, 2), positions, inv_freq).swapaxes(1, 2)


def kernel_applies(config: KIVIConfig, head_dim: int, num_kv_heads: int,
                   which: str) -> bool:
  """Whether the `which` ("gpu" or "tpu") decode kernel reads this cache.

  Both read KIVI's axes with both tensors quantized in groups of a power of
  two (at least 16) tokens (values per channel group, or per head where the
  group is wider than the head, `check_head_dim`), in 2, 4, 8 bits or
  ternary, keys cached after or before RoPE, and SKVQ's layout
  (`channel_group`): the TPU kernel at any width, the GPU's
  (`decode_attention_hidden`) where the hidden dim is a multiple of 16 (tiles
  of a power of two channels).
  """
  g = config.group_size
  if not (config.quantizes_keys and config.quantizes_values and g >= 16
          and g & (g - 1) == 0):
    return False
  if config.channel_group is not None:
    return which == "tpu" or num_kv_heads * head_dim % 16 == 0
  return config.key_axis == "channel" and config.value_axis == "token"


def resolve_impl(impl: str, config: KIVIConfig, head_dim: int, num_kv_heads: int,
                 t: int) -> str:
  """Which implementation reads the cache: "reference", "gpu" or "tpu"."""
  which = kernel_backend(impl)
  if which == "reference" or t != 1 or not kernel_applies(config, head_dim, num_kv_heads,
                                                          which):
    return "reference"
  return which


def cache_attention(q: Array, layer: LayerKV, k_new: Array, v_new: Array,
                    lengths: Array, n_new: Array, config: KIVIConfig,
                    sliding_window: int | None = None, impl: str = "reference",
                    rope_inv_freq: Array | None = None) -> Array:
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
    rope_inv_freq: `[D/2]`, the model's RoPE frequencies, exactly when
      `config.pre_rope`: the cache and `k_new` hold keys before RoPE, and
      attention rotates them (dequantized) at their positions.

  Returns:
    `[B, T, Hq, D]` in `q.dtype`.
  """
  if config.pre_rope != (rope_inv_freq is not None):
    raise ValueError("rope_inv_freq must be given exactly when config.pre_rope is set")
  which = resolve_impl(impl, config, q.shape[-1], k_new.shape[1], q.shape[1])
  if which != "reference":
    return _decode_with_kernel(q, layer, k_new, v_new, lengths, n_new, config,
                               sliding_window, which, rope_inv_freq)
  b, t, hq, d = q.shape
  hkv = k_new.shape[1]
  dtype = q.dtype
  nq = n_quantized(lengths, config)

  # [B, Hkv, C, D] each: the block as full precision (the reference's shortcut).
  k_block = dequantize_block(layer.k, config.k_bits, config.key_axis, config, dtype,
                             layer.k_map, d)
  v_block = dequantize_block(layer.v, config.v_bits, config.value_axis, config, dtype,
                             layer.v_map, d)
  c = k_block.shape[2]
  new_pos = lengths[:, None] + jnp.arange(t)[None, :]
  block_pos = jnp.broadcast_to(config.sinks + jnp.arange(c)[None, :], (b, c))

  # [B, Hkv, S, D] with S = (sinks) + C + R + T, and per key its position and
  # liveness; the block goes after the sinks.
  parts = _full_precision_parts(layer, k_new, v_new, lengths, n_new, config)
  parts.insert(1 if config.sinks else 0,
               (k_block, v_block, block_pos, block_pos < config.sinks + nq[:, None]))
  keys, values, key_pos, key_live = _concat(parts, dtype)
  if rope_inv_freq is not None:
    keys = _rotate_keys(keys, key_pos, rope_inv_freq)

  # [B, T, S]
  visible = key_live[:, None, :] & (key_pos[:, None, :] <= new_pos[:, :, None])
  if sliding_window is not None:
    visible &= key_pos[:, None, :] > new_pos[:, :, None] - sliding_window

  qg = q.reshape(b, t, hkv, hq // hkv, d)
  acc = jnp.promote_types(dtype, jnp.float32)  # float32, or float64 for float64 inputs
  # [B, Hkv, rep, T, S]
  scores = jnp.einsum("BTKGD,BKSD->BKGTS", qg, keys,
                      preferred_element_type=acc) / jnp.sqrt(jnp.float32(d))
  scores = jnp.where(visible[:, None, None], scores, _MASKED)
  probs = jnp.exp(scores - scores.max(-1, keepdims=True))
  probs = probs / probs.sum(-1, keepdims=True)
  out = jnp.einsum("BKGTS,BKSD->BTKGD", probs.astype(values.dtype), values,
                   preferred_element_type=acc)
  return out.reshape(b, t, hq, d).astype(dtype)


def _full_precision_parts(layer: LayerKV, k_new, v_new, lengths, n_new,
                          config: KIVIConfig) -> list[tuple[Array, Array, Array, Array]]:
  """What attention reads unquantized, in order: (the sinks,) the ring and the
  new tokens, each as `(keys, values [B, Hkv, n, D], positions, live [B, n])`."""
  b, _, t, _ = k_new.shape
  ring_pos, ring_valid = ring_positions(lengths, config)
  new_pos = lengths[:, None] + jnp.arange(t)[None, :]
  parts = [(layer.ring_k, layer.ring_v, ring_pos, ring_valid),
           (k_new, v_new, new_pos, jnp.arange(t)[None, :] < n_new[:, None])]
  if config.sinks:
    sink_pos = jnp.broadcast_to(jnp.arange(config.sinks)[None, :], (b, config.sinks))
    parts.insert(0, (layer.sink_k, layer.sink_v, sink_pos, sink_pos < lengths[:, None]))
  return parts


def _concat(parts, dtype) -> tuple[Array, Array, Array, Array]:
  """`parts` joined along the key axis, keys and values in `dtype`."""
  keys, values, pos, live = zip(*parts)
  return (jnp.concatenate([x.astype(dtype) for x in keys], 2),
          jnp.concatenate([x.astype(dtype) for x in values], 2),
          jnp.concatenate(pos, 1), jnp.concatenate(live, 1))


def _decode_with_kernel(q, layer: LayerKV, k_new, v_new, lengths, n_new,
                        config: KIVIConfig, sliding_window, which: str, rope_inv_freq):
  """One decode step: a kernel over the packed block, jnp over the sinks, the
  ring and the new token (at most S + R + 1 keys), merged by their log-sum-exps."""
  b, _, hq, d = q.shape
  hkv = k_new.shape[1]
  rep = hq // hkv
  # [B, Hkv, rep, D]
  qg = q[:, 0].reshape(b, hkv, rep, d)
  nq = n_quantized(lengths, config)
  lo = jnp.zeros_like(lengths) if sliding_window is None else jnp.maximum(
      lengths - sliding_window + 1, 0)
  # The block holds body tokens: token S + i at index i.
  rows = (nq, jnp.maximum(lo - config.sinks, 0))
  blocks = (layer.k.codes, layer.k.scale, layer.k.zero, layer.v.codes, layer.v.scale,
            layer.v.zero)
  kw = dict(k_bits=config.k_bits, v_bits=config.v_bits, group_size=config.group_size)
  # Keys before RoPE: the kernel rotates the query instead (its docstring).
  rope = {}
  if rope_inv_freq is not None:
    q1, q2 = jnp.split(q[:, 0], 2, axis=-1)
    rope = dict(q_rot=jnp.concatenate([q2, -q1], -1),  # [B, Hq, D]
                rope_theta=jnp.concatenate([rope_inv_freq, rope_inv_freq]))
    kw["pos_offset"] = config.sinks
  if config.channel_group is None:
    # [B, Hkv, M, D]: a kv head's query rows, padded with zeros to what the
    # kernel's dot wants: 16 rows on GPUs, 8 sublanes on TPUs.
    m_rows = max(16 if which == "gpu" else tpu_decode.MIN_ROWS,
                 1 << (rep - 1).bit_length())
    pad = lambda x: jnp.pad(x.reshape(b, hkv, rep, d),  # noqa: E731
                            ((0, 0), (0, 0), (0, m_rows - rep), (0, 0)))
    if rope:
      rope["q_rot"] = pad(rope["q_rot"])
    o_blk, lse_blk = _block_kernel(which, pad(qg), *blocks, *rows, **rope, **kw)
    o_blk, lse_blk = o_blk[:, :, :rep], lse_blk[:, :, :rep]
  else:
    o_blk, lse_blk = _hidden_block_attention(which, q[:, 0], layer, blocks, rows, rope, kw)

  # [B, Hkv, (S +) R + 1, D]: (the sinks,) the ring and the new token, with
  # positions and liveness.
  keys, values, pos, live = _concat(
      _full_precision_parts(layer, k_new, v_new, lengths, n_new, config),
      layer.ring_k.dtype)
  live &= pos >= lo[:, None]
  if rope_inv_freq is not None:
    keys = _rotate_keys(keys, pos, rope_inv_freq)
  # [B, Hkv, rep, (S +) R + 1]
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


def _block_kernel(which: str, *args, hidden: bool = False, **kw):
  """`(o, lse)` of the `which` kernel over the block (SKVQ's layout with
  `hidden`); off its own backend a kernel runs in Pallas interpret mode (tests
  on a CPU)."""
  if which == "gpu":
    kernel = (gpu_hidden.hidden_decode_attention if hidden
              else gpu_decode.quantized_decode_attention)
  else:
    kernel = tpu_decode.quantized_decode_attention
  return kernel(*args, **kw, interpret=kernel_interpret(which))


def _hidden_block_attention(which: str, q, layer: LayerKV, blocks, rows, rope: dict, kw):
  """The block of SKVQ's layout (one "head" of the hidden dim `H`, channels in
  each tensor's calibrated order) read by the `which` kernel:
  `(o [B, Hkv, rep, D], lse [B, Hkv, rep])` for queries `q` `[B, Hq, D]` (and
  `rope`'s `q_rot` alike).

  Every query head becomes a row over the whole hidden dim holding its own
  channels where its kv head's keys sit (zeros elsewhere), so `q' . k` over
  `H` is the head's own score (SPEC.md: `q . k = Pq . Pk`); its output row is
  read back at its kv head's value channels.
  """
  b, hq, d = q.shape
  hkv = layer.ring_k.shape[1]
  rep = hq // hkv
  kv_of = jnp.arange(hq) // rep
  m_rows = max(16 if which == "gpu" else tpu_decode.MIN_ROWS, 1 << (hq - 1).bit_length())

  def spread(x):  # [B, Hq, D] -> [B, 1, M, H] in the keys' channel order
    x = jax.nn.one_hot(kv_of, hkv, dtype=x.dtype)[None, :, :, None] * x[:, :, None, :]
    x = jnp.take(x.reshape(b, hq, hkv * d), layer.k_map.perm, axis=-1)
    return jnp.pad(x, ((0, 0), (0, m_rows - hq), (0, 0)))[:, None]

  if rope:
    rope = dict(q_rot=spread(rope["q_rot"]),
                rope_theta=jnp.tile(rope["rope_theta"], hkv)[layer.k_map.perm])
  o, lse = _block_kernel(which, spread(q), *blocks, *rows, layer.k_map.groups,
                         layer.v_map.groups, **rope, sm_scale=1.0 / math.sqrt(d), **kw,
                         hidden=True)
  # [B, Hq, Hkv, D] in hidden order, then each head's own kv head.
  o = jnp.take(o[:, 0, :hq], jnp.argsort(layer.v_map.perm), axis=-1).reshape(b, hq, hkv, d)
  o = jnp.take_along_axis(o, kv_of[None, :, None, None], axis=2)[:, :, 0]
  return o.reshape(b, hkv, rep, d), lse[:, 0, :hq].reshape(b, hkv, rep)
