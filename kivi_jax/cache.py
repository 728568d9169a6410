"""The quantized KV cache: an immutable pytree, a packed block plus a residual ring.

Semantics (SPEC.md, "The cache"): per layer, a quantized block of capacity `C`
tokens and a full-precision ring of `R` tokens. A row of length `L` holds its
oldest `n_quantized(L) = G * ceil(max(L - R, 0) / G)` tokens in the block and the
other `L - n_quantized(L)` (at most `R`) in the ring, token `t` at ring slot
`t % R`. `R = 0` quantizes every whole group, `G * floor(L / G)` tokens, and
rings the rest in `G` slots (`KIVIConfig.ring_size`). Prefill and decode both
go through `append`, so a prefill of `n` tokens leaves exactly the state of `n`
single-token steps. Every row keeps its own length, and its groups are aligned
to its own first token.

SKVQ's additions (SPEC.md, "SKVQ") live in the same pytree: with `S` sinks the
first `S` tokens of a row sit in a small full-precision block and everything
above applies to the rest (the "body": token `S + i` is body token `i`); with
`channel_group` the blocks are quantized over the hidden dim, all KV heads'
channels side by side in the order of a per-layer `ChannelMap`.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jax import Array
from jax.experimental.pallas import tpu as pltpu

from kivi_jax import quantization, sharding
from kivi_jax.checks import positive_int
from kivi_jax.config import IMPLS, KIVIConfig, QuantAxis, channel_group, codes_per_word
from kivi_jax.pallas_kernels import (decode_attention_pairs, quantize_pack, quantize_pack_tpu,
                                     ring_update)
from kivi_jax.pallas_kernels.quantize_pack import scatter_tokens


@struct.dataclass
class QuantizedBlock:
  """The quantized part of one tensor (keys or values); `...` = `[B, Hkv]`.

  With `channel_group` (SKVQ) the head axis has size 1 and `D` is the hidden
  dim `Hkv * Dh` in the `ChannelMap`'s order, with scale and zero `[..., n, C]`
  for `n` groups, tokens last (a group's tokens contiguous for the decode
  kernels, `decode_attention_hidden`).

  bits < 16, layout "slots":
    codes: uint32 `[..., C/w, D]`, `w = 32 // bits` codes per word, packed along
      tokens in group slots (`quantization.pack`).
    scale, zero: `[..., C/G, D]` for axis "channel", `[..., C, D/G]` for axis
      "token"; in the model dtype.
  bits < 16, layout "pairs" (`quantization.pair_pack`, for Hopper's `wgmma`:
  each row packed along the axis a kernel contracts):
    axis "channel": codes uint32 `[..., C, D b/32]`, each token's channels
      packed; scale, zero `[..., C/G, D]`.
    axis "token": codes uint32 `[..., D, C b/32]`, each channel's tokens
      packed; scale, zero `[..., D/G, C]` (transposed).
  bits == 16:
    codes: the tensor itself, model dtype `[..., C, D]`; scale and zero are None.

  layout: static; "slots" or "pairs" (`init_cache`'s `layout`).
  """

  codes: Array
  scale: Array | None
  zero: Array | None
  layout: str = struct.field(pytree_node=False, default="slots")


@struct.dataclass
class ChannelMap:
  """How one tensor's hidden dim is grouped (SKVQ; one layer's).

  perm: int32 `[H]`, `H = Hkv * Dh`: cache channel `j` holds hidden channel
    `perm[j]` (head `perm[j] // Dh`, channel `perm[j] % Dh` of it).
  groups: int32 `[H]`: the group of cache channel `j`, nondecreasing.
  clip: float32 `[]`: the clip factor of this layer and tensor.

  Constant for the cache's life; arrays rather than static configuration so
  that a calibration is data, not a recompilation.
  """

  perm: Array
  groups: Array
  clip: Array

  def positions(self) -> Array:
    """int32 `[H]`: the cache channel holding each hidden channel (`perm`'s
    inverse, by a scatter rather than a sort)."""
    hidden = self.perm.shape[-1]
    return jnp.zeros(hidden, jnp.int32).at[self.perm].set(jnp.arange(hidden, dtype=jnp.int32))


@struct.dataclass
class LayerKV:
  """Keys and values of one layer of the cache.

  k, v: `QuantizedBlock`s of capacity `C` tokens (body tokens, see module).
  ring_k, ring_v: model dtype `[B, Hkv, R, D]` (`R = config.ring_size`);
    body token `t` at slot `t % R`.
  sink_k, sink_v: model dtype `[B, Hkv, S, D]`, tokens `0 .. S - 1`, or
    None without sinks.
  k_map, v_map: `ChannelMap`s with `channel_group`, else None.
  """

  k: QuantizedBlock
  v: QuantizedBlock
  ring_k: Array
  ring_v: Array
  sink_k: Array | None = None
  sink_v: Array | None = None
  k_map: ChannelMap | None = None
  v_map: ChannelMap | None = None

  @property
  def layout(self) -> str:
    """How the quantized blocks are packed: "pairs" where either tensor's is
    (a 16-bit tensor lies as it is), else "slots"."""
    return "pairs" if "pairs" in (self.k.layout, self.v.layout) else "slots"


@struct.dataclass
class KVCache:
  """The whole cache.

  layers: one `LayerKV` per layer, each its own arrays: a decode step reads
    and updates every layer's buffers in place (a stack of layers would be
    sliced, that is copied, layer by layer).
  lengths: int32 `[B]`, tokens cached per row (block plus ring).
  config: the static `KIVIConfig`.
  impl: static; which code reads the cache in a decode step: "auto" (the
    Pallas kernel for the backend where it applies, else the jnp reference),
    "reference", "gpu" or "tpu" (that kernel; in interpret mode on a CPU).
    The same choice picks what writes the blocks: the backend's
    quantize-and-pack kernel or the jnp reference (`write_kernel`).
  mesh: static; the `jax.sharding.Mesh` the cache is split over (rows over
    "data", kv heads over "model": `kivi_jax.sharding`), or None on one device.
    With a mesh, each layer's write and attention run per shard.
  """

  layers: LayerKV
  lengths: Array
  config: KIVIConfig = struct.field(pytree_node=False)
  impl: str = struct.field(pytree_node=False, default="auto")
  mesh: Any = struct.field(pytree_node=False, default=None)

  @property
  def capacity(self) -> int:
    """Largest length a row can reach: the block's capacity `C`, the most tokens
    the ring keeps beside a full block (`ring_keeps`) and the `S` sinks."""
    return self.block_capacity + ring_keeps(self.config) + self.config.sinks

  @property
  def block_capacity(self) -> int:
    """The quantized block's capacity `C`, in tokens (`block_capacity`)."""
    return _block_tokens(self.layers[0].k, self.config.k_bits, self.config.key_axis,
                         self.config)

  @property
  def layout(self) -> str:
    """How the quantized blocks are packed: `init_cache`'s `layout`."""
    return self.layers[0].layout

  def n_quantized(self) -> Array:
    """int32 `[B]`: tokens of each row that sit in the quantized block."""
    return n_quantized(self.lengths, self.config)

  def nbytes(self) -> int:
    """Bytes of every array in the cache (codes, scales, zeros, ring, lengths)."""
    return sum(x.nbytes for x in jax.tree_util.tree_leaves(self))


def _block_tokens(block: QuantizedBlock, bits: int, axis: QuantAxis,
                  config: KIVIConfig) -> int:
  """The block's capacity `C`: its scales' (its codes may hold more: `_empty_block`)."""
  if bits == 16:
    return block.codes.shape[-2]
  if axis == "token" and (block.layout == "pairs" or config.channel_group is not None):
    return block.scale.shape[-1]  # tokens last
  return block.scale.shape[-2] * (config.group_size if axis == "channel" else 1)


def body_lengths(lengths: Array, config: KIVIConfig) -> Array:
  """int32 `[B]`: tokens of each row past the `S` sinks."""
  return jnp.maximum(lengths - config.sinks, 0)


def ring_keeps(config: KIVIConfig) -> int:
  """The most body tokens a row holds outside the block: `R`, or `G - 1` when
  `R = 0` (`n_quantized`)."""
  return config.residual_length or config.group_size - 1


def _body_n_quantized(body: Array, config: KIVIConfig) -> Array:
  g = config.group_size
  return (jnp.maximum(body - ring_keeps(config), 0) + g - 1) // g * g


def n_quantized(lengths: Array, config: KIVIConfig) -> Array:
  """`G * ceil(max(L - R, 0) / G)`: the tokens a row of `L` body tokens has
  quantized (`G * floor(L / G)` for `R = 0`); `lengths` count the sinks too."""
  return _body_n_quantized(body_lengths(lengths, config), config)


def _empty_block(lead, capacity, head_dim, bits, axis: QuantAxis, config: KIVIConfig,
                 dtype, layout: str = "slots"):
  """An empty block of `capacity` tokens; `head_dim` is the hidden dim with
  `channel_group`. Its codes take whole packing blocks (`w * G` tokens, `G`
  word rows): more than `capacity` tokens where it is not a multiple of them
  (SKVQ's `block_granularity`); scales and zeros take exactly `capacity`.
  In the pair layout `capacity` is a multiple of 128 and `head_dim` 64 or one."""
  if bits == 16:
    return QuantizedBlock(jnp.zeros((*lead, capacity, head_dim), dtype), None, None)
  g = config.group_size
  sdtype = config.scale_dtype or dtype
  if layout == "pairs":
    if axis == "channel":
      cshape, sshape = (capacity, head_dim * bits // 32), (capacity // g, head_dim)
    else:
      cg = channel_group(g, head_dim)
      cshape, sshape = (head_dim, capacity * bits // 32), (head_dim // cg, capacity)
    zeros = lambda shape, dt: jnp.zeros((*lead, *shape), dt)  # noqa: E731
    return QuantizedBlock(zeros(cshape, jnp.uint32), zeros(sshape, sdtype),
                          zeros(sshape, sdtype), layout)
  rows = -(-capacity // (codes_per_word(bits) * g)) * g
  codes = jnp.zeros((*lead, rows, head_dim), jnp.uint32)
  if axis == "channel":
    sshape = (*lead, capacity // config.group_size, head_dim)
  elif config.channel_group is not None:  # tokens last (decode_attention_hidden)
    sshape = (*lead, config.hidden_groups(head_dim), capacity)
  else:
    sshape = (*lead, capacity, head_dim // channel_group(config.group_size, head_dim))
  return QuantizedBlock(codes, jnp.zeros(sshape, sdtype), jnp.zeros(sshape, sdtype))


def block_granularity(config: KIVIConfig) -> int:
  """Capacity is a whole number of each tensor's spans of the TPU write kernel:
  packing blocks (`w * G` tokens), two where `w` is 4 or 20 so that the
  per-channel scales of a span fill 8 rows (`quantize_pack_tpu`).

  SKVQ's layout (`channel_group`) is written by the jnp reference and read a
  step of `gcd(w_k, w_v)` groups at a time (`decode_attention_tpu`), its
  scales (tokens last) in blocks of whole 128-token lanes: its capacity is a
  whole number of both, and each tensor's codes are rounded up to whole
  packing blocks on their own (`_empty_block`). (The common multiple of
  ternary's 20 groups a word and 2-bit's 16 was 2560 tokens at G = 32.)"""
  if config.channel_group is not None:
    words = [codes_per_word(b) for b in (config.k_bits, config.v_bits) if b < 16]
    return math.lcm(config.group_size * max(math.gcd(*words), 1), 128)
  return math.lcm(*(quantize_pack_tpu.tiles_per_program(b) * codes_per_word(b)
                    * config.group_size
                    for b in (config.k_bits, config.v_bits) if b < 16),
                  config.group_size)


def block_capacity(kv_config: KIVIConfig, max_length: int, layout: str) -> int:
  """The block's capacity `C` for rows of up to `max_length` tokens: the most
  tokens such a row quantizes (`n_quantized(max_length)`: the ring keeps the
  newest `R - G + 1` to `R` outside the block), rounded up to whole steps of
  the layout's writers and readers, at least one step.

  The slot layout's step is `block_granularity`; the pair layout's is a span
  of 128 tokens and a group (`PAIR_SPAN`), its first step the decode
  kernel's (`decode_attention_pairs.step_tokens`: the kernel reads a last
  partial step past the block's end as zeros, which its masks drop). At 1024 +
  512 tokens with R = 128 and G = 32 the pair layout's block holds 1408 tokens
  where a block of `max_length` rounded to 512 held 1536: a KIVI-2 row of
  Llama-2-7B's shapes in 196 MiB against 208."""
  g = kv_config.group_size
  body = max(max_length - kv_config.sinks, 0)
  quantized = -(-max(body - ring_keeps(kv_config), 0) // g) * g
  if layout == "pairs":
    step = math.lcm(g, quantization.PAIR_SPAN)
    least = max(step, decode_attention_pairs.step_tokens(g))
  else:
    step = least = block_granularity(kv_config)
  return max(-(-quantized // step) * step, least)


def equal_groups(hidden: int, n: int) -> np.ndarray:
  """int32 `[hidden]`: `n` contiguous groups of near-equal size, channel `j` in
  group `j * n // hidden`."""
  return (np.arange(hidden) * n // hidden).astype(np.int32)


def plain_channel_map(config: KIVIConfig, hidden: int) -> ChannelMap:
  """Hidden channels in their own order in equal contiguous groups, clipped by
  `config.clip`: the map of `channel_group` without calibration."""
  return ChannelMap(perm=jnp.arange(hidden, dtype=jnp.int32),
                    groups=jnp.asarray(equal_groups(hidden, config.hidden_groups(hidden))),
                    clip=jnp.asarray(config.clip, jnp.float32))


LAYOUTS = ("slots", "pairs")


def pair_kernel_reads(impl: str, kv_config: KIVIConfig, head_dim: int, rows: int, dtype,
                      scale_dtype) -> bool:
  """Whether `decode_attention_pairs`' kernel reads a block of this config in
  the pair layout: with a GPU's kernels (`impl`) on a Hopper GPU, KIVI's axes,
  keys cached after RoPE, and what `decode_attention_pairs.applies` names
  (`rows` query rows per kv head)."""
  return (kernel_backend(impl) == "gpu" and kv_config.key_axis == "channel"
          and kv_config.value_axis == "token" and not kv_config.pre_rope
          and kv_config.channel_group is None
          and decode_attention_pairs.applies(kv_config.k_bits, kv_config.v_bits,
                                             kv_config.group_size, head_dim, rows, dtype,
                                             scale_dtype)
          and decode_attention_pairs.hopper())


def resolve_layout(layout: str, model_config, kv_config: KIVIConfig, impl: str,
                   dtype, mesh=None) -> str:
  """`init_cache`'s `layout` with "auto" resolved: "pairs" where
  `pair_kernel_reads` (a Hopper GPU's decode kernel reads it), else "slots". A
  cache split over a `mesh` keeps the slots (the pair layout is not tested
  split over devices)."""
  if layout != "auto":
    return layout
  if mesh is not None:
    return "slots"
  hkv = model_config.num_kv_heads
  rows = getattr(model_config, "num_heads", hkv) // hkv
  reads = pair_kernel_reads(impl, kv_config, model_config.head_dim, rows, dtype,
                            kv_config.scale_dtype or dtype)
  return "pairs" if reads else "slots"


def check_layout(layout: str, kv_config: KIVIConfig, head_dim: int) -> None:
  """Raises ValueError where `init_cache`'s `layout` cannot hold this config."""
  if layout not in ("auto", *LAYOUTS):
    raise ValueError(f"layout must be one of {('auto', *LAYOUTS)}, got {layout!r}")
  if layout != "pairs":  # "auto" takes "pairs" only where it holds the config
    return
  if kv_config.channel_group is not None:
    raise ValueError("layout='pairs' packs each head's blocks; SKVQ's channel_group "
                     "layout (over the hidden dim) has only layout='slots'")
  for name in ("k_bits", "v_bits"):
    bits = getattr(kv_config, name)
    if bits != 16 and bits not in quantization.PAIR_BITS:
      raise ValueError(f"layout='pairs' holds {quantization.PAIR_BITS}- or 16-bit "
                       f"tensors, got {name}={bits}")
  if head_dim % quantization.PAIR_SPAN and head_dim != quantization.PAIR_SPAN // 2:
    raise ValueError(f"layout='pairs' needs a head_dim of {quantization.PAIR_SPAN // 2} or a "
                     f"multiple of {quantization.PAIR_SPAN}, got head_dim={head_dim}")


def init_cache(model_config, kv_config: KIVIConfig, batch_size: int, max_length: int,
               dtype=None, impl: str = "auto", calibration=None, mesh=None,
               layout: str = "auto") -> KVCache:
  """An empty cache for `batch_size` rows of up to `max_length` tokens each.

  Args:
    model_config: anything with `num_layers`, `num_kv_heads`, `head_dim` and
      `dtype` (a `kivi_jax.ModelConfig`).
    kv_config: how keys and values are quantized.
    batch_size, max_length: positive; the block holds what a row of
      `max_length` tokens quantizes, rounded up to the layout's steps
      (`block_capacity`), so `KVCache.capacity` may exceed `max_length`.
    dtype: dtype of the ring, of 16-bit blocks and of scales and zeros; the
      model's by default.
    impl: decode-attention implementation (`KVCache.impl`).
    calibration: a `kivi_jax.calibration.Calibration` made for this model and
      `kv_config`; required where `kv_config.needs_calibration`.
    mesh: a `kivi_jax.make_mesh` mesh to split the cache over (`KVCache.mesh`);
      each device creates only its own shard.
    layout: how the quantized blocks are packed (`QuantizedBlock`): "slots"
      (every kernel's) or "pairs" (each row packed along the axis Hopper's
      `wgmma` contracts: 2-, 4- or 8-bit codes, head_dim 64 or a multiple of 128, not
      SKVQ's hidden-dim layout; a 16-bit tensor lies as it is in either). The
      GPU's `quantize_pack_pairs` writes "pairs" (jnp elsewhere); on a Hopper GPU
      `decode_attention_pairs`' kernel reads it, elsewhere the jnp reference.
      "auto" (the default): "pairs" where that kernel reads the cache and no
      `mesh` splits it (`resolve_layout`), else "slots".
  """
  if impl not in IMPLS:
    raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
  if not isinstance(kv_config, KIVIConfig):
    raise TypeError(f"kv_config must be a KIVIConfig, got {type(kv_config).__name__}")
  batch_size = positive_int("batch_size", batch_size)
  max_length = positive_int("max_length", max_length)
  kv_config.check_head_dim(model_config.head_dim)
  check_layout(layout, kv_config, model_config.head_dim)
  if kv_config.needs_calibration and calibration is None:
    raise ValueError(
        "kv_config has reorder=True or clip='calibrated': pass calibration=, a "
        "kivi_jax.calibrate(...) result for this model and config")
  if calibration is not None and kv_config.channel_group is None:
    raise ValueError("calibration= is for SKVQ's configs (channel_group set); kv_config "
                     "quantizes each head alone and has nothing to calibrate")
  dtype = jnp.dtype(dtype or model_config.dtype)
  if not jnp.issubdtype(dtype, jnp.floating):
    raise ValueError(f"dtype must be a floating-point type (the ring's, the scales' and a "
                     f"16-bit block's), got {dtype}")
  layout = resolve_layout(layout, model_config, kv_config, impl, dtype, mesh)
  capacity = block_capacity(kv_config, max_length, layout)
  ly, hkv, d = model_config.num_layers, model_config.num_kv_heads, model_config.head_dim
  lead = (batch_size, hkv)
  block_lead, block_d = lead, d
  if kv_config.channel_group is not None:
    block_lead, block_d = (batch_size, 1), hkv * d
    if calibration is not None:
      maps = calibration.channel_maps(model_config, kv_config)
    else:
      maps = [(plain_channel_map(kv_config, block_d), plain_channel_map(kv_config, block_d))
              for _ in range(ly)]

  def layer(i):
    # Every array its own buffer (the forward donates each one): no map or
    # zeros shared between layers or tensors.
    extra = {}
    if kv_config.sinks:
      sink_shape = (*lead, kv_config.sinks, d)
      extra.update(sink_k=jnp.zeros(sink_shape, dtype), sink_v=jnp.zeros(sink_shape, dtype))
    if kv_config.channel_group is not None:
      extra.update(k_map=maps[i][0], v_map=maps[i][1])
    ring_shape = (*lead, kv_config.ring_size, d)
    return LayerKV(
        k=_empty_block(block_lead, capacity, block_d, kv_config.k_bits, kv_config.key_axis,
                       kv_config, dtype, layout),
        v=_empty_block(block_lead, capacity, block_d, kv_config.v_bits,
                       kv_config.value_axis, kv_config, dtype, layout),
        ring_k=jnp.zeros(ring_shape, dtype), ring_v=jnp.zeros(ring_shape, dtype), **extra)

  def build():
    return KVCache(tuple(layer(i) for i in range(ly)), jnp.zeros((batch_size,), jnp.int32),
                   kv_config, impl)

  if mesh is None:
    return build()
  sharding.check_mesh(mesh, model_config, kv_config, batch_size)
  specs = sharding.cache_specs(jax.eval_shape(build))
  place = jax.tree.map(lambda s: jax.sharding.NamedSharding(mesh, s), specs)
  return jax.jit(build, out_shardings=place)().replace(mesh=mesh)


def ring_positions(lengths: Array, config: KIVIConfig) -> tuple[Array, Array]:
  """Token position held by each ring slot, and whether it is a live token.

  Returns int32 `[B, R]` positions (of the whole row, sinks counted) and bool
  `[B, R]` validity.
  """
  pos, valid = _body_ring_positions(body_lengths(lengths, config), config)
  return pos + config.sinks, valid


def _body_ring_positions(body: Array, config: KIVIConfig) -> tuple[Array, Array]:
  r = config.ring_size
  nq = _body_n_quantized(body, config)[:, None]
  slots = jnp.arange(r)[None, :]
  pos = nq + (slots - nq) % r
  return pos, pos < body[:, None]


def _groups(cmap: ChannelMap, block: QuantizedBlock):
  return cmap.groups, block.scale.shape[-2]


def dequantize_block(block: QuantizedBlock, bits: int, axis: QuantAxis,
                     config: KIVIConfig, dtype, cmap: ChannelMap | None = None,
                     head_dim: int | None = None) -> Array:
  """The block as a `[..., Hkv, C, Dh]` tensor in `dtype` (reference path only).

  With `channel_group`, `cmap` (one layer's) and `head_dim` say how the hidden
  dim maps back onto heads.
  """
  if bits == 16:
    x = block.codes.astype(dtype)
  elif block.layout == "pairs":
    codes = quantization.pair_unpack(block.codes, bits)
    scale, zero = block.scale, block.zero
    if axis == "token":  # [..., D, C] -> [..., C, D], scales likewise
      codes, scale, zero = (jnp.swapaxes(a, -1, -2) for a in (codes, scale, zero))
    x = quantization.dequantize(codes, scale, zero, config.group_size, axis, dtype)
  else:
    codes = quantization.unpack(block.codes, bits, config.group_size)
    codes = codes[..., :_block_tokens(block, bits, axis, config), :]
    scale, zero, groups = block.scale, block.zero, None
    if cmap is not None:  # SKVQ's scales, tokens last
      scale, zero = jnp.swapaxes(scale, -1, -2), jnp.swapaxes(zero, -1, -2)
      groups = _groups(cmap, block)
    x = quantization.dequantize(codes, scale, zero, config.group_size, axis, dtype, groups)
  if cmap is None:
    return x
  # [..., 1, C, H] in cache order -> hidden order -> [..., Hkv, C, Dh].
  x = jnp.take(x[..., 0, :, :], cmap.positions(), axis=-1)
  x = x.reshape(*x.shape[:-1], -1, head_dim)
  return jnp.swapaxes(x, -3, -2)


def to_hidden(x: Array, cmap: ChannelMap) -> Array:
  """`[B, Hkv, n, Dh]` -> `[B, 1, n, Hkv * Dh]` in `cmap`'s channel order."""
  b, hkv, n, d = x.shape
  x = jnp.swapaxes(x, 1, 2).reshape(b, 1, n, hkv * d)
  return jnp.take(x, cmap.perm, axis=-1)


def _gather(x: Array, idx: Array) -> Array:
  """Per batch row `b`: `x[b, :, idx[b]]`; x `[B, Hkv, N, D]`, idx `[B, n]`."""
  return jax.vmap(lambda a, i: a[:, i])(x, idx)


def kernel_backend(impl: str) -> str:
  """`KVCache.impl` with "auto" resolved: "gpu" or "tpu" on those backends (their
  kernels), else "reference"."""
  if impl != "auto":
    return impl
  backend = jax.default_backend()
  return backend if backend in ("gpu", "tpu") else "reference"


def kernel_interpret(which: str):
  """The `interpret` argument of a `which` ("gpu" or "tpu") kernel: compiled on
  its own backend, else Pallas interpret mode (tests on a CPU)."""
  if which == "gpu":
    return jax.default_backend() != "gpu"
  return False if jax.default_backend() == "tpu" else pltpu.InterpretParams()


def write_kernel(impl: str, config: KIVIConfig, head_dim: int) -> str | None:
  """Which quantize-and-pack kernel writes the blocks: "gpu", "tpu" or None
  (the jnp reference). `impl` (`KVCache.impl`) "auto" means the backend's
  kernel. Both kernels write KIVI's layouts (not SKVQ's `channel_group`) in
  power-of-two groups of at least 16 tokens; the GPU's also needs a
  power-of-two head dim of at least 32 (Triton blocks)."""
  which = kernel_backend(impl)
  g = config.group_size
  if (which not in ("gpu", "tpu") or config.channel_group is not None or g < 16
      or g & (g - 1)):
    return None
  if which == "gpu" and (head_dim < 32 or head_dim & (head_dim - 1)):
    return None
  return which


def block_writer(impl: str, config: KIVIConfig, head_dim: int, layout: str) -> str | None:
  """Which kernel writes a quantized block of `layout` ("pairs" or "slots"):
  "gpu", "tpu" or None (the jnp reference, whose quantization holds float32
  copies of what it writes). The pair layout's writer is the GPU's, in
  groups of up to a span."""
  which = write_kernel(impl, config, head_dim)
  if layout == "pairs":
    return which if which == "gpu" and config.group_size <= quantize_pack.SPAN else None
  return which


def _write_tokens(block: QuantizedBlock, x: Array, start: Array, n_tokens: Array,
                  bits: int, axis: QuantAxis, config: KIVIConfig,
                  cmap: ChannelMap | None, impl: str) -> QuantizedBlock:
  """Quantizes `x` `[B, Hkv, n, D]` (n a multiple of G) and writes its first
  `n_tokens[b]` tokens at token `start[b]` of the block (both multiples of G)."""
  if bits == 16:
    if cmap is not None:
      x = to_hidden(x, cmap)
    i = jnp.arange(x.shape[2])[None, :]
    tok = jnp.where(i < n_tokens[:, None], start[:, None] + i, block.codes.shape[-2])
    return QuantizedBlock(scatter_tokens(block.codes, tok, x.astype(block.codes.dtype)),
                          None, None)
  kw = dict(bits=bits, group_size=config.group_size, axis=axis)
  which = block_writer(impl, config, x.shape[-1], block.layout)
  if block.layout == "pairs":
    if which == "gpu":
      out = quantize_pack.quantize_pack_pairs(
          x, block.codes, block.scale, block.zero, start, n_tokens, clip=config.clip,
          interpret=kernel_interpret(which), **kw)
    else:
      out = quantize_pack.quantize_pack_pairs_reference(
          x, block.codes, block.scale, block.zero, start, n_tokens, config.clip, **kw)
    return QuantizedBlock(*out, block.layout)
  if which is not None:
    kernel = quantize_pack if which == "gpu" else quantize_pack_tpu
    out = kernel.quantize_pack(x, block.codes, block.scale, block.zero, start, n_tokens,
                               clip=config.clip, interpret=kernel_interpret(which), **kw)
  elif cmap is not None:
    out = quantize_pack.quantize_pack_reference(
        to_hidden(x, cmap), block.codes, block.scale, block.zero, start, n_tokens,
        cmap.clip, _groups(cmap, block), scales_last=True, **kw)
  else:
    out = quantize_pack.quantize_pack_reference(x, block.codes, block.scale, block.zero,
                                                start, n_tokens, config.clip, **kw)
  return QuantizedBlock(*out)


def append(layer: LayerKV, k_new: Array, v_new: Array, lengths: Array,
           n_new: Array, config: KIVIConfig, impl: str = "reference") -> LayerKV:
  """Appends each row's first `n_new[b]` tokens of `k_new`, `v_new` to one layer.

  Args:
    layer: one layer's `LayerKV`.
    k_new, v_new: `[B, Hkv, T, D]`, the new tokens (right-padded per row).
    lengths: int32 `[B]`, tokens cached per row before the append.
    n_new: int32 `[B]`, real new tokens per row (`<= T`).
    impl: `KVCache.impl`; where `write_kernel` names one, a quantize-and-pack
      kernel writes the block.

  New tokens at positions below `S` go to the sinks. Of the body, the ring's
  live tokens followed by the new ones form a "tail" starting at body token
  `nq0 = n_quantized(lengths)`. Its first `n_quantized(lengths + n_new) - nq0`
  tokens (whole groups, at most `G * ceil(T / G)`) are quantized into the
  block; the rest become the new ring.
  """
  return append_flushing(layer, k_new, v_new, lengths, n_new, config, impl)[0]


def append_flushing(layer: LayerKV, k_new: Array, v_new: Array, lengths: Array,
                    n_new: Array, config: KIVIConfig, impl: str = "reference"
                    ) -> tuple[LayerKV, tuple[Array, Array, Array, Array]]:
  """`append`, and the tokens it quantized as they were before quantization.

  Returns `(layer, flushed)`, `flushed = (keys, values, positions, live)`:
  keys and values `[B, Hkv, F, D]` in the cache dtype, positions (of the
  whole row, sinks counted) and liveness `[B, F]`. A decode step attends to
  the appended layer's block below `n_quantized(lengths)`, to `flushed` and
  to the appended ring, sinks and all: the same keys as the cache before the
  step plus the new token (SPEC.md, "Attention in a decode step"), read from
  the buffers the append wrote. Reading after writing is what lets XLA
  update the buffers in place: a read of the old buffers unordered with the
  write would make it copy them.
  """
  t = k_new.shape[2]
  dtype = layer.ring_k.dtype
  k_new, v_new = k_new.astype(dtype), v_new.astype(dtype)
  if config.sinks:
    s = config.sinks
    pos = lengths[:, None] + jnp.arange(t)[None, :]  # [B, T]
    sink = (pos < s) & (jnp.arange(t)[None, :] < n_new[:, None])
    sink_pos = jnp.where(sink, pos, s)  # dropped where not a sink
    layer = layer.replace(sink_k=scatter_tokens(layer.sink_k, sink_pos, k_new),
                          sink_v=scatter_tokens(layer.sink_v, sink_pos, v_new))
    # The body's new tokens start at new index j0: shift them to the front.
    j0 = jnp.clip(s - lengths, 0, n_new)
    idx = jnp.clip(j0[:, None] + jnp.arange(t)[None, :], 0, t - 1)
    k_new, v_new = _gather(k_new, idx), _gather(v_new, idx)
    n_new = n_new - j0
  body = body_lengths(lengths, config)
  nq0 = _body_n_quantized(body, config)
  nq1 = _body_n_quantized(body + n_new, config)
  if t == 1:
    k_flush, v_flush, ring_k, ring_v = _ring_window_step(layer, k_new, v_new, body, n_new,
                                                         nq0, config, impl)
  else:
    k_flush, v_flush, ring_k, ring_v = _ring_tail(layer, k_new, v_new, body, n_new, nq0,
                                                  nq1, config)
  n_flush = nq1 - nq0
  layer = layer.replace(
      k=_write_tokens(layer.k, k_flush, nq0, n_flush, config.k_bits, config.key_axis,
                      config, layer.k_map, impl),
      v=_write_tokens(layer.v, v_flush, nq0, n_flush, config.v_bits, config.value_axis,
                      config, layer.v_map, impl),
      ring_k=ring_k, ring_v=ring_v)
  i = jnp.arange(k_flush.shape[2])[None, :]
  return layer, (k_flush, v_flush, config.sinks + nq0[:, None] + i, i < n_flush[:, None])


def _ring_window_step(layer: LayerKV, k_new, v_new, body, n_new, nq0, config: KIVIConfig,
                      impl: str):
  """The ring's part of appending one body token per row: `(k_flush, v_flush,
  ring_k, ring_v)`, flushed tokens `[B, Hkv, G, D]`.

  Body token `t` sits at ring slot `t % R`. The new token's slot lies in a
  window of `G` slots aligned to `G`; when the step flushes, the flushed
  group occupies exactly that window (the ring is full and its oldest group
  starts at slot `nq0 % R`, where the new token lands; with `R = 0` the group
  is the window's `G - 1` tokens and the new one). So one read of the window,
  made before the new token is written (`kivi_jax.pallas_kernels.ring_update`), gives
  the flushed group.
  """
  g, r = config.group_size, config.ring_size
  if g == 1 and not config.residual_length:
    # Groups of one and no ring (`fp16`): the new token is the flushed group,
    # and the ring's one slot never holds a live token.
    return k_new, v_new, layer.ring_k, layer.ring_v
  d = k_new.shape[-1]
  # Where the flushed group holds the new token (R = 0): its window index.
  new_at = jnp.where((body - nq0 >= 0) & (body - nq0 < g), body - nq0, g)
  flushes = _body_n_quantized(body + n_new, config) > nq0
  args = (layer.ring_k, layer.ring_v, k_new, v_new, body % r, n_new, flushes, new_at)
  if kernel_backend(impl) == "gpu" and not (g & (g - 1) or d & (d - 1)):
    ring_k, ring_v, k_flush, v_flush = ring_update.ring_update(
        *args, group_size=g, interpret=kernel_interpret("gpu"))
  else:
    ring_k, ring_v, k_flush, v_flush = ring_update.ring_update_reference(*args,
                                                                         group_size=g)
  return k_flush, v_flush, ring_k, ring_v


def _ring_tail(layer: LayerKV, k_new, v_new, body, n_new, nq0, nq1, config: KIVIConfig):
  """The ring's part of appending any `T` body tokens per row (a prefill):
  `(k_flush, v_flush, ring_k, ring_v)`, flushed tokens `[B, Hkv, F, D]`,
  `F = G * ceil(T / G)` (the ring keeps `R - G + 1` to `R`), at most the
  block's capacity (a prompt may be longer than the block: `block_capacity`)."""
  g, r = config.group_size, config.ring_size
  t = k_new.shape[2]
  f = min(g * -(-t // g), _block_tokens(layer.k, config.k_bits, config.key_axis, config))
  # Flushed token i is body token nq0 + i, from the ring or the new tokens: one
  # gather from the two side by side. (A gather from the ring alone needs
  # nothing of the layer, so XLA may form every layer's at the program's start
  # and keep them all: a prefill row's keys and values of every layer at once.)
  flush_pos = nq0[:, None] + jnp.arange(f)[None, :]
  idx = jnp.where(flush_pos < body[:, None], flush_pos % r,
                  r + jnp.clip(flush_pos - body[:, None], 0, t - 1))
  k_flush = _gather(jnp.concatenate([layer.ring_k, k_new], axis=2), idx)
  v_flush = _gather(jnp.concatenate([layer.ring_v, v_new], axis=2), idx)
  # New token j stays in the ring if it is not quantized: at most R of them,
  # so their slots are distinct; the others are dropped (slot R is out of range).
  pos = body[:, None] + jnp.arange(t)[None, :]
  stays = (jnp.arange(t)[None, :] < n_new[:, None]) & (pos >= nq1[:, None])
  slot = jnp.where(stays, pos % r, r)
  return (k_flush, v_flush, scatter_tokens(layer.ring_k, slot, k_new),
          scatter_tokens(layer.ring_v, slot, v_new))


def _map_rows(fn, cache: KVCache, *others: KVCache) -> KVCache:
  """`fn` over the arrays of `cache` (and the matching ones of `others`) that
  have a leading row axis: all but the channel maps, kept as `cache`'s."""
  def layer(x: LayerKV, *ys: LayerKV) -> LayerKV:
    rows = jax.tree.map(fn, x.replace(k_map=None, v_map=None),
                        *(y.replace(k_map=None, v_map=None) for y in ys))
    return rows.replace(k_map=x.k_map, v_map=x.v_map)

  return cache.replace(layers=tuple(map(layer, cache.layers, *(o.layers for o in others))),
                       lengths=fn(cache.lengths, *(o.lengths for o in others)))


def zeros_rows(template: KVCache, rows: int) -> KVCache:
  """A cache of `rows` rows of zeros shaped as `template`'s, its channel maps
  kept: the buffer a prefill in chunks of rows writes into."""
  return _map_rows(lambda x: jnp.zeros((rows, *x.shape[1:]), x.dtype), template)


def write_rows(cache: KVCache, part: KVCache, start, shards: int = 1) -> KVCache:
  """`cache` with its rows `start ..` replaced by `part`'s (in place inside a
  loop or under donation); with `shards`, the rows of both in that many equal
  blocks (a mesh's data shards), block i's rows `start ..` by part's block i."""
  return _map_rows(lambda x, y: jax.lax.dynamic_update_slice_in_dim(
      by_shard(x, shards), by_shard(y, shards), start, 1).reshape(x.shape), cache, part)


def by_shard(x: Array, shards: int) -> Array:
  """`x` `[B, ...]` as `[shards, B / shards, ...]`: the rows of each data shard
  of a mesh (`kivi_jax.sharding`: rows split in equal blocks) on their own."""
  return x.reshape(shards, x.shape[0] // shards, *x.shape[1:])
