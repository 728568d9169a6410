"""The quantized KV cache: an immutable pytree, a packed block plus a residual ring.

Semantics (SPEC.md, "The cache"): per layer, a quantized block of capacity `C`
tokens and a full-precision ring of `R` tokens. A row of length `L` holds its
oldest `n_quantized(L) = G * ceil(max(L - R, 0) / G)` tokens in the block and the
other `L - n_quantized(L)` (at most `R`) in the ring, token `t` at ring slot
`t % R`. `R = 0` quantizes every whole group, `G * floor(L / G)` tokens, and
rings the rest in `G` slots (`KIVIConfig.ring_size`). Prefill and decode both go through `append`, so a prefill of `n` tokens
leaves exactly the state of `n` single-token steps. Every row keeps its own
length, and its groups are aligned to its own first token.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct
from jax import Array

from kivi_jax import quantization
from kivi_jax.config import KIVIConfig, QuantAxis, channel_group, codes_per_word


@struct.dataclass
class QuantizedBlock:
  """The quantized part of one tensor (keys or values); `...` = `[Ly, B, Hkv]`.

  bits < 16:
    codes: uint32 `[..., C/w, D]`, `w = 32 // bits` codes per word, packed along
      tokens in group slots (`quantization.pack`).
    scale, zero: `[..., C/G, D]` for axis "channel", `[..., C, D/G]` for axis
      "token"; in the model dtype.
  bits == 16:
    codes: the tensor itself, model dtype `[..., C, D]`; scale and zero are None.
  """

  codes: Array
  scale: Array | None
  zero: Array | None


@struct.dataclass
class LayerKV:
  """Keys and values of the cache for all layers (leading `Ly` axis) or one.

  k, v: `QuantizedBlock`s of capacity `C` tokens.
  ring_k, ring_v: model dtype `[..., B, Hkv, R, D]` (`R = config.ring_size`);
    token `t` at slot `t % R`.
  """

  k: QuantizedBlock
  v: QuantizedBlock
  ring_k: Array
  ring_v: Array


@struct.dataclass
class KVCache:
  """The whole cache.

  layers: `LayerKV` with every array stacked on a leading layer axis `Ly`.
  lengths: int32 `[B]`, tokens cached per row (block plus ring).
  config: the static `KIVIConfig`.
  impl: static; which code reads the cache in a decode step: "auto" (the
    Pallas kernel for the backend where it applies, else the jnp reference),
    "reference", "gpu" or "tpu" (that kernel; in interpret mode on a CPU).
  """

  layers: LayerKV
  lengths: Array
  config: KIVIConfig = struct.field(pytree_node=False)
  impl: str = struct.field(pytree_node=False, default="auto")

  @property
  def capacity(self) -> int:
    """Largest length a row can reach (`C`, the block's capacity)."""
    return _block_tokens(self.layers.k, self.config.k_bits)

  def n_quantized(self) -> Array:
    """int32 `[B]`: tokens of each row that sit in the quantized block."""
    return n_quantized(self.lengths, self.config)

  def nbytes(self) -> int:
    """Bytes of every array in the cache (codes, scales, zeros, ring, lengths)."""
    return sum(x.nbytes for x in jax.tree_util.tree_leaves(self))


def _block_tokens(block: QuantizedBlock, bits: int) -> int:
  rows = block.codes.shape[-2]
  return rows if bits == 16 else rows * codes_per_word(bits)


def n_quantized(lengths: Array, config: KIVIConfig) -> Array:
  """`G * ceil(max(L - R, 0) / G)`: the tokens a row of length `L` has quantized
  (`G * floor(L / G)` for `R = 0`)."""
  g, r = config.group_size, config.residual_length
  keep = r or g - 1
  return (jnp.maximum(lengths - keep, 0) + g - 1) // g * g


def _empty_block(lead, capacity, head_dim, bits, axis: QuantAxis, group_size, dtype):
  if bits == 16:
    return QuantizedBlock(jnp.zeros((*lead, capacity, head_dim), dtype), None, None)
  codes = jnp.zeros((*lead, capacity // codes_per_word(bits), head_dim), jnp.uint32)
  if axis == "channel":
    sshape = (*lead, capacity // group_size, head_dim)
  else:
    sshape = (*lead, capacity, head_dim // channel_group(group_size, head_dim))
  return QuantizedBlock(codes, jnp.zeros(sshape, dtype), jnp.zeros(sshape, dtype))


def block_granularity(config: KIVIConfig) -> int:
  """Capacity is a whole number of packing blocks (`w * G` tokens) of each tensor."""
  w = max(codes_per_word(b) if b < 16 else 1 for b in (config.k_bits, config.v_bits))
  return w * config.group_size


IMPLS = ("auto", "reference", "gpu", "tpu")


def init_cache(model_config, kv_config: KIVIConfig, batch_size: int, max_length: int,
               dtype=None, impl: str = "auto") -> KVCache:
  """An empty cache for `batch_size` rows of up to `max_length` tokens each.

  Args:
    model_config: anything with `num_layers`, `num_kv_heads`, `head_dim` and
      `dtype` (a `models.ModelConfig`).
    kv_config: how keys and values are quantized.
    batch_size, max_length: positive; the block capacity is `max_length` rounded
      up to a whole number of packing blocks (`block_granularity`).
    dtype: dtype of the ring, of 16-bit blocks and of scales and zeros; the
      model's by default.
    impl: decode-attention implementation (`KVCache.impl`).
  """
  if impl not in IMPLS:
    raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
  if not isinstance(kv_config, KIVIConfig):
    raise TypeError(f"kv_config must be a KIVIConfig, got {type(kv_config).__name__}")
  for name, value in (("batch_size", batch_size), ("max_length", max_length)):
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
      raise ValueError(f"{name} must be a positive integer, got {value!r}")
  kv_config.check_head_dim(model_config.head_dim)
  dtype = jnp.dtype(dtype or model_config.dtype)
  g = kv_config.group_size
  step = block_granularity(kv_config)
  capacity = -(-max_length // step) * step
  lead = (model_config.num_layers, batch_size, model_config.num_kv_heads)
  d = model_config.head_dim
  ring_shape = (*lead, kv_config.ring_size, d)
  layers = LayerKV(
      k=_empty_block(lead, capacity, d, kv_config.k_bits, kv_config.key_axis, g, dtype),
      v=_empty_block(lead, capacity, d, kv_config.v_bits, kv_config.value_axis, g, dtype),
      ring_k=jnp.zeros(ring_shape, dtype),
      ring_v=jnp.zeros(ring_shape, dtype),
  )
  return KVCache(layers, jnp.zeros((batch_size,), jnp.int32), kv_config, impl)


def ring_positions(lengths: Array, config: KIVIConfig) -> tuple[Array, Array]:
  """Token position held by each ring slot, and whether it is a live token.

  Returns int32 `[B, R]` positions and bool `[B, R]` validity.
  """
  r = config.ring_size
  nq = n_quantized(lengths, config)[:, None]
  slots = jnp.arange(r)[None, :]
  pos = nq + (slots - nq) % r
  return pos, pos < lengths[:, None]


def dequantize_block(block: QuantizedBlock, bits: int, axis: QuantAxis,
                     config: KIVIConfig, dtype) -> Array:
  """The block as a `[..., C, D]` tensor in `dtype` (reference path only)."""
  if bits == 16:
    return block.codes.astype(dtype)
  codes = quantization.unpack(block.codes, bits, config.group_size)
  return quantization.dequantize(codes, block.scale, block.zero, config.group_size, axis,
                                 dtype)


def _scatter(dst: Array, idx: Array, src: Array, add: bool = False) -> Array:
  """Per batch row `b`: `dst[b, :, idx[b]] = src[b]` (or `+=`) on the token axis.

  dst `[B, Hkv, N, X]`, idx int32 `[B, n]`, src `[B, Hkv, n, X]`; indices out of
  range are dropped.
  """
  def one(d, i, s):
    ref = d.at[:, i]
    return ref.add(s, mode="drop") if add else ref.set(s, mode="drop")
  return jax.vmap(one)(dst, idx, src)


def _gather(x: Array, idx: Array) -> Array:
  """Per batch row `b`: `x[b, :, idx[b]]`; x `[B, Hkv, N, D]`, idx `[B, n]`."""
  return jax.vmap(lambda a, i: a[:, i])(x, idx)


def _write_tokens(block: QuantizedBlock, x: Array, start: Array, n_tokens: Array,
                  bits: int, axis: QuantAxis, config: KIVIConfig) -> QuantizedBlock:
  """Quantizes `x` `[B, Hkv, n, D]` (n a multiple of G) and writes its first
  `n_tokens[b]` tokens at token `start[b]` of the block (both multiples of G)."""
  g = config.group_size
  n = x.shape[2]
  capacity = _block_tokens(block, bits)
  i = jnp.arange(n)[None, :]
  live = i < n_tokens[:, None]
  tok = jnp.where(live, start[:, None] + i, capacity)  # [B, n]; dead ones dropped
  if bits == 16:
    return QuantizedBlock(_scatter(block.codes, tok, x.astype(block.codes.dtype)),
                          None, None)
  dtype = block.scale.dtype
  codes, scale, zero = quantization.quantize(x, bits, g, axis, dtype, config.clip)
  w = codes_per_word(bits)
  group = tok // g
  row = jnp.where(live, group // w * g + tok % g, block.codes.shape[-2])
  shift = ((group % w) * bits).astype(jnp.uint32)[:, None, :, None]
  # Each slot of a word is written once, into zero bits: adding is or-ing, and
  # groups of one flush that share word rows combine.
  words = _scatter(block.codes, row, codes.astype(jnp.uint32) << shift, add=True)
  if axis == "channel":
    grp = jnp.where(live[:, ::g], start[:, None] // g + jnp.arange(n // g)[None, :],
                    capacity)
    return QuantizedBlock(words, _scatter(block.scale, grp, scale),
                          _scatter(block.zero, grp, zero))
  return QuantizedBlock(words, _scatter(block.scale, tok, scale),
                        _scatter(block.zero, tok, zero))


def append(layer: LayerKV, k_new: Array, v_new: Array, lengths: Array,
           n_new: Array, config: KIVIConfig) -> LayerKV:
  """Appends each row's first `n_new[b]` tokens of `k_new`, `v_new` to one layer.

  Args:
    layer: one layer's `LayerKV` (no layer axis).
    k_new, v_new: `[B, Hkv, T, D]`, the new tokens (right-padded per row).
    lengths: int32 `[B]`, tokens cached per row before the append.
    n_new: int32 `[B]`, real new tokens per row (`<= T`).

  The ring's live tokens followed by the new ones form a "tail" starting at
  token `nq0 = n_quantized(lengths)`. Its first `n_quantized(lengths + n_new) -
  nq0` tokens (whole groups, at most `G * ceil(T / G)`) are quantized into the
  block; the rest become the new ring.
  """
  g, r = config.group_size, config.ring_size
  t = k_new.shape[2]
  dtype = layer.ring_k.dtype
  nq0 = n_quantized(lengths, config)
  new_lengths = lengths + n_new
  nq1 = n_quantized(new_lengths, config)

  # [B, R + T]: tail index i is token nq0 + i, from the ring or the new tokens.
  tail_pos = nq0[:, None] + jnp.arange(r + t)[None, :]
  from_ring = tail_pos < lengths[:, None]
  ring_slot = tail_pos % r
  new_idx = jnp.clip(tail_pos - lengths[:, None], 0, t - 1)

  def tail_of(ring, new):
    return jnp.where(from_ring[:, None, :, None], _gather(ring, ring_slot),
                     _gather(new.astype(dtype), new_idx))

  k_tail = tail_of(layer.ring_k, k_new)
  v_tail = tail_of(layer.ring_v, v_new)

  n_flush = nq1 - nq0
  flush_len = g * -(-t // g)
  k_block = _write_tokens(layer.k, k_tail[:, :, :flush_len], nq0, n_flush, config.k_bits,
                          config.key_axis, config)
  v_block = _write_tokens(layer.v, v_tail[:, :, :flush_len], nq0, n_flush, config.v_bits,
                          config.value_axis, config)

  # Ring slot s now holds token nq1 + ((s - nq1) mod R), tail index that - nq0.
  pos, valid = ring_positions(new_lengths, config)
  src = jnp.clip(pos - nq0[:, None], 0, r + t - 1)
  keep = valid[:, None, :, None]
  ring_k = jnp.where(keep, _gather(k_tail, src), layer.ring_k)
  ring_v = jnp.where(keep, _gather(v_tail, src), layer.ring_v)
  return LayerKV(k_block, v_block, ring_k, ring_v)
