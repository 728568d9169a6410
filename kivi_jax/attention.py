"""Attention of new tokens over one layer of the cache.

`cache_attention` is the reference the decode kernels must match: scores
against the quantized block (dequantized here; a kernel never materializes
it), the full-precision ring and the new tokens, under one softmax (SPEC.md,
"Attention in a decode step"). `decode_attention` is what a decode step runs:
the same attention read after the new token's append, the block by a Pallas
kernel (by cuDNN where it is 16-bit, on a GPU), the ring and the flushed group
by another on a GPU (`_ring_kernel_reads`), the rest in jnp.
`prompt_attention` is a prompt's attention over itself (a prefill).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import Array

from kivi_jax.cache import (LayerKV, append_flushing, dequantize_block, kernel_backend,
                            kernel_interpret, n_quantized, pair_kernel_reads, ring_positions)
from kivi_jax.config import KIVIConfig
from kivi_jax.pallas_kernels import decode_attention as gpu_decode
from kivi_jax.pallas_kernels import decode_attention_dense as gpu_dense
from kivi_jax.pallas_kernels import decode_attention_hidden as gpu_hidden
from kivi_jax.pallas_kernels import decode_attention_mha as gpu_mha
from kivi_jax.pallas_kernels import decode_attention_pairs as gpu_pairs
from kivi_jax.pallas_kernels import decode_attention_ring as gpu_ring
from kivi_jax.pallas_kernels import decode_attention_tpu as tpu_decode
from kivi_jax.pallas_kernels import prompt_attention_tpu as tpu_prompt
from kivi_jax.pallas_kernels.common import MASK_VALUE as _NEG

# The longest block `decode_attention_dense` reads where cuDNN would too, and
# the share of the GPU's SMs its programs (one per row and kv head) may fill.
_DENSE_MAX_TOKENS = 2048
_DENSE_MAX_SM_SHARE = 1 / 4

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
  if q.shape[1] == 1:
    layer, flushed = append_flushing(layer, k_new, v_new, lengths, n_new, config, impl)
    return decode_attention(q, layer, flushed, lengths, n_new, config, sliding_window, impl,
                            rope_inv_freq)
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


def prompt_attention(q: Array, k: Array, v: Array, n_valid: Array,
                     sliding_window: int | None = None, impl: str = "reference",
                     query_chunk: int = 512) -> Array:
  """Causal attention of a prompt over itself (a prefill into an empty cache).

  Args:
    q: `[B, T, Hq, D]` (RoPE applied); k, v: `[B, T, Hkv, D]` (keys rotated).
    n_valid: int32 `[B]`: row `b`'s real tokens are its first `n_valid[b]`.
    sliding_window: if set, a query at position `i` sees keys at `p > i - W`.
    impl: `KVCache.impl`. On a GPU, bf16 and fp16 go to cuDNN's flash
      attention, on a TPU to a Pallas flash kernel (`prompt_attention_tpu`);
      elsewhere scores are formed `query_chunk` queries at a time, so a long
      prompt never holds `[B, H, T, T]` scores.

  Returns:
    `[B, T, Hq, D]` in `q.dtype`; rows past `n_valid` are meaningless.
  """
  b, t, hq, d = q.shape
  if (kernel_backend(impl) == "gpu" and jax.default_backend() == "gpu"
      and q.dtype in (jnp.bfloat16, jnp.float16)):
    window = None if sliding_window is None else (sliding_window - 1, 0)
    return jax.nn.dot_product_attention(
        q, k, v, is_causal=True, query_seq_lengths=n_valid, key_value_seq_lengths=n_valid,
        local_window_size=window, implementation="cudnn")
  if kernel_backend(impl) == "tpu" and jax.default_backend() == "tpu":
    return tpu_prompt.prompt_attention(q, k, v, n_valid, sliding_window=sliding_window)
  hkv = k.shape[2]
  acc = jnp.promote_types(q.dtype, jnp.float32)
  n_chunks = -(-t // query_chunk)
  chunk = -(-t // n_chunks)
  # [n, B, c, Hkv, rep, D]: query chunks, padded at the end.
  qc = jnp.pad(q, ((0, 0), (0, n_chunks * chunk - t), (0, 0), (0, 0)))
  qc = qc.reshape(b, n_chunks, chunk, hkv, hq // hkv, d).swapaxes(0, 1)
  key_pos = jnp.arange(t)

  def one(args):
    i, qi = args
    q_pos = i * chunk + jnp.arange(chunk)
    # [B, c, S]
    visible = ((key_pos[None, :] <= q_pos[:, None])[None]
               & (key_pos[None, None, :] < n_valid[:, None, None]))
    if sliding_window is not None:
      visible &= (key_pos[None, :] > q_pos[:, None] - sliding_window)[None]
    # [B, Hkv, rep, c, S]
    s = jnp.einsum("BCKGD,BSKD->BKGCS", qi, k,
                   preferred_element_type=acc) / jnp.sqrt(jnp.float32(d))
    s = jnp.where(visible[:, None, None], s, _MASKED)
    p = jnp.exp(s - s.max(-1, keepdims=True))
    p = p / p.sum(-1, keepdims=True)
    return jnp.einsum("BKGCS,BSKD->BCKGD", p.astype(v.dtype), v,
                      preferred_element_type=acc).astype(q.dtype)

  out = jax.lax.map(one, (jnp.arange(n_chunks), qc))  # [n, B, c, Hkv, rep, D]
  return out.swapaxes(0, 1).reshape(b, n_chunks * chunk, hq, d)[:, :t]


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
    parts.insert(0, _sink_part(layer, lengths, config))
  return parts


def _sink_part(layer: LayerKV, lengths, config: KIVIConfig):
  b = lengths.shape[0]
  sink_pos = jnp.broadcast_to(jnp.arange(config.sinks)[None, :], (b, config.sinks))
  return layer.sink_k, layer.sink_v, sink_pos, sink_pos < lengths[:, None]


def _concat(parts, dtype) -> tuple[Array, Array, Array, Array]:
  """`parts` joined along the key axis, keys and values in `dtype`."""
  keys, values, pos, live = zip(*parts)
  return (jnp.concatenate([x.astype(dtype) for x in keys], 2),
          jnp.concatenate([x.astype(dtype) for x in values], 2),
          jnp.concatenate(pos, 1), jnp.concatenate(live, 1))


def decode_attention(q: Array, layer: LayerKV, flushed, lengths: Array, n_new: Array,
                     config: KIVIConfig, sliding_window: int | None = None,
                     impl: str = "reference", rope_inv_freq: Array | None = None) -> Array:
  """Attention of one new token per row, read after the token is appended.

  Args:
    q: `[B, 1, Hq, D]`, as `cache_attention`'s.
    layer, flushed: `append_flushing`'s results for the new token.
    lengths: int32 `[B]`, tokens cached per row before the token; n_new:
      int32 `[B]`, 1 for a real token, 0 for padding (a finished row).
    sliding_window, impl, rope_inv_freq: as `cache_attention`'s.

  The block below `n_quantized(lengths)` is read by a kernel (where it is
  16-bit, on a GPU, by `decode_attention_dense`'s where `_dense_reads_block`,
  else by cuDNN; by jnp where none applies); the sinks,
  `flushed` and the ring (the new token is in one of them) by jnp, or
  `flushed` and the ring by `decode_attention_ring`'s kernel where
  `_ring_kernel_reads`. The parts are merged by their log-sum-exps. No key
  or value is concatenated: each part is read where it lies. Where the
  block holds every token (`holds_every_token`: the `fp16` preset), the
  block alone is read, through the new token.

  Returns:
    `[B, 1, Hq, D]` in `q.dtype`.
  """
  b, _, hq, d = q.shape
  hkv = layer.ring_k.shape[1]
  rep = hq // hkv
  # [B, Hkv, rep, D]
  qg = q[:, 0].reshape(b, hkv, rep, d)
  lo = jnp.zeros_like(lengths) if sliding_window is None else jnp.maximum(
      lengths - sliding_window + 1, 0)
  if holds_every_token(config):
    # The append wrote the new token into the block as it is, and the ring and
    # the sinks hold nothing: the block alone, read through the new token.
    n_all = n_quantized(lengths + n_new, config)
    if _dense_reads_block(impl, config, layer, q.dtype, sliding_window, b * hkv):
      o_blk, _ = _dense_block_attention(qg, layer, n_all, lo, config)
    elif _cudnn_reads_block(impl, config, q.dtype, sliding_window):
      o_blk, _ = _cudnn_block_attention(q, layer, n_all, with_lse=False)
    else:
      o_blk, _ = _jnp_block_attention(qg, layer, n_all, lo, config, rope_inv_freq)
    return o_blk.reshape(b, 1, hq, d).astype(q.dtype)
  nq = n_quantized(lengths, config)
  which = resolve_impl(impl, config, d, hkv, 1)
  if layer.layout == "pairs":
    # The pair layout's kernels are Hopper's; elsewhere jnp reads it.
    which = ("pairs" if _pair_kernel_reads(impl, config, layer, q.dtype, rep, rope_inv_freq)
             else "reference")
  if which == "pairs":
    o_blk, lse_blk = _pair_block_attention(qg, layer, nq, lo, config)
  elif which != "reference":
    o_blk, lse_blk = _kernel_block_attention(which, q, layer, nq, lo, config, rope_inv_freq)
  elif _dense_reads_block(impl, config, layer, q.dtype, sliding_window, b * hkv):
    o_blk, lse_blk = _dense_block_attention(qg, layer, nq, lo, config)
  elif _cudnn_reads_block(impl, config, q.dtype, sliding_window):
    o_blk, lse_blk = _cudnn_block_attention(q, layer, nq)
  else:
    o_blk, lse_blk = _jnp_block_attention(qg, layer, nq, lo, config, rope_inv_freq)

  if which == "gpu" and config.channel_group is not None:
    # SKVQ's query rows for the block's kernels (`_hidden_block_attention`) and
    # the ring's scores below both read `q`: XLA fused them as siblings into one
    # slow fusion, 6.2 ms of a 53-ms Llama-2-7B step at batch 32 on an H100.
    # With the ring's scores after the kernels the step took 47 ms
    # (benchmarks/NOTES.md, "SKVQ at serving shapes").
    o_blk, lse_blk, qg = jax.lax.optimization_barrier((o_blk, lse_blk, qg))

  new_lengths = lengths + n_new
  ring_pos, ring_live = ring_positions(new_lengths, config)
  if _ring_kernel_reads(impl, config, layer, flushed, rope_inv_freq):
    acc, m, l = _ring_kernel_partial(qg, layer, flushed, ring_pos, ring_live, lo)
  else:
    # A row that flushes nothing has an undefined window (`ring_update`'s kernel
    # leaves it unwritten): its values are masked here, not multiplied by zero.
    fk, fv, f_pos, f_live = flushed
    flushed = (fk, jnp.where(f_live[:, None, :, None], fv, 0), f_pos, f_live)
    parts = [flushed, (layer.ring_k, layer.ring_v, ring_pos, ring_live)]
    if config.sinks:
      parts.insert(0, _sink_part(layer, new_lengths, config))
    acc, m, l = (x[:, :, None] for x in _jnp_partial(qg, parts, lo, rope_inv_freq))
  # The block's normalized (o, lse) is the partial (acc = o, m = lse, l = 1).
  out, _ = gpu_decode.merge_partials(
      jnp.concatenate([o_blk[:, :, None], acc], 2),
      jnp.concatenate([lse_blk[:, :, None], m], 2),
      jnp.concatenate([jnp.ones_like(l[:, :, :1]), l], 2))
  return out.reshape(b, 1, hq, d).astype(q.dtype)


def holds_every_token(config: KIVIConfig) -> bool:
  """Whether the block holds a row's every token unquantized, the new one
  included once it is appended: 16 bits, groups of one, no ring, no sinks
  (the `fp16` preset)."""
  return (config.k_bits == 16 and config.v_bits == 16 and config.group_size == 1
          and not config.residual_length and not config.sinks)


def _jnp_partial(qg, parts, lo, rope_inv_freq):
  """The unnormalized partial `(acc [B, Hkv, rep, D], m, l [B, Hkv, rep])` of
  queries `qg` over full-precision `parts` (`_full_precision_parts`' form), in
  jnp."""
  d = qg.shape[-1]
  # Each part's scores kept apart, never concatenated: XLA fused the flushed
  # part's channel sum into a concatenation's elementwise loop (12 us a layer
  # at batch 1 on an H200, benchmarks/NOTES.md "Fused projections").
  scores = []
  for keys, values, pos, live in parts:
    if rope_inv_freq is not None:
      keys = _rotate_keys(keys, pos, rope_inv_freq)
    s = jnp.einsum("BKGD,BKSD->BKGS", qg, keys.astype(qg.dtype),
                   preferred_element_type=jnp.float32) / jnp.sqrt(jnp.float32(d))
    live = (live & (pos >= lo[:, None]))[:, None, None]
    scores.append((jnp.where(live, s, _MASKED), live, values))
  m = functools.reduce(jnp.maximum, [jnp.max(s, -1) for s, _, _ in scores])
  l = acc = 0.0
  for s, live, values in scores:
    p = jnp.where(live, jnp.exp(s - m[..., None]), 0.0)
    l = l + jnp.sum(p, -1)
    acc = acc + jnp.einsum("BKGS,BKSD->BKGD", p.astype(values.dtype), values,
                           preferred_element_type=jnp.float32)
  return acc, m, l


def _ring_kernel_reads(impl: str, config: KIVIConfig, layer: LayerKV, flushed,
                       rope_inv_freq) -> bool:
  """Whether `decode_attention_ring`'s kernel reads the ring and the flushed
  group: with a GPU's kernels, keys cached after RoPE, no sinks, both parts a
  power of two of at least 16 tokens."""
  pow2 = lambda t: t >= 16 and not t & (t - 1)  # noqa: E731
  return (kernel_backend(impl) == "gpu" and rope_inv_freq is None and not config.sinks
          and pow2(layer.ring_k.shape[2]) and pow2(flushed[0].shape[2]))


def _tile_kernel_rows(qg):
  """`qg` `[B, Hkv, rep, D]` with its rows as `decode_attention_ring`'s and
  `decode_attention_dense`'s kernels take them: one row as it is (CUDA
  cores), several padded to a power of two of at least 16 (their dots)."""
  rep = qg.shape[2]
  m_rows = 1 if rep == 1 else _kernel_rows(rep, 16)
  return jnp.pad(qg, ((0, 0), (0, 0), (0, m_rows - rep), (0, 0)))


def _ring_kernel_partial(qg, layer: LayerKV, flushed, ring_pos, ring_live, lo):
  """The ring's and the flushed group's partials `(acc [B, Hkv, N, rep, D], m,
  l [B, Hkv, N, rep])`, one per tile of `decode_attention_ring`'s kernel."""
  rep = qg.shape[2]
  fk, fv, f_pos, f_live = flushed
  acc, m, l = gpu_ring.ring_partials(
      _tile_kernel_rows(qg), layer.ring_k, layer.ring_v, fk.astype(layer.ring_k.dtype),
      fv.astype(layer.ring_v.dtype), ring_live & (ring_pos >= lo[:, None]),
      f_live & (f_pos >= lo[:, None]), interpret=kernel_interpret("gpu"))
  return acc[:, :, :, :rep], m[..., :rep], l[..., :rep]


def _jnp_block_attention(qg, layer: LayerKV, nq, lo, config: KIVIConfig, rope_inv_freq):
  """`(o [B, Hkv, rep, D], lse [B, Hkv, rep])` of queries `qg` over the block,
  in jnp: a 16-bit block is read as it lies, a quantized one dequantized
  whole (the reference's shortcut)."""
  b, hkv, rep, d = qg.shape
  dtype = qg.dtype
  k_block = dequantize_block(layer.k, config.k_bits, config.key_axis, config, dtype,
                             layer.k_map, d)
  v_block = dequantize_block(layer.v, config.v_bits, config.value_axis, config, dtype,
                             layer.v_map, d)
  c = k_block.shape[2]
  pos = config.sinks + jnp.arange(c)
  live = (jnp.arange(c)[None, :] < nq[:, None]) & (pos[None, :] >= lo[:, None])  # [B, C]
  if rope_inv_freq is not None:
    k_block = _rotate_keys(k_block, jnp.broadcast_to(pos, (b, c)), rope_inv_freq)
  acc = jnp.promote_types(dtype, jnp.float32)
  s = jnp.einsum("BKGD,BKCD->BKGC", qg, k_block,
                 preferred_element_type=acc) / jnp.sqrt(jnp.float32(d))
  s = jnp.where(live[:, None, None], s, _MASKED)
  m = jnp.max(s, -1)
  p = jnp.where(live[:, None, None], jnp.exp(s - m[..., None]), 0.0)
  l = jnp.sum(p, -1)
  o = jnp.einsum("BKGC,BKCD->BKGD", p.astype(v_block.dtype), v_block,
                 preferred_element_type=acc)
  # As the kernels' merge_partials: no live token gives o = 0 and a very
  # negative lse.
  return gpu_decode.merge_partials(o[:, :, None], m[:, :, None], l[:, :, None])


def _cudnn_reads_block(impl: str, config: KIVIConfig, dtype, sliding_window) -> bool:
  """Whether cuDNN's flash attention reads a 16-bit block: on a GPU, in bf16
  or fp16, for a plain KIVI layout (no sinks, keys after RoPE) and no
  sliding window (cuDNN's window is relative to the query's own row)."""
  return (kernel_backend(impl) == "gpu" and jax.default_backend() == "gpu"
          and config.k_bits == 16 and config.v_bits == 16 and not config.sinks
          and not config.pre_rope and config.channel_group is None
          and sliding_window is None and dtype in (jnp.bfloat16, jnp.float16))


def _dense_reads_block(impl: str, config: KIVIConfig, layer: LayerKV, dtype, sliding_window,
                       programs: int) -> bool:
  """Whether `decode_attention_dense`'s kernel reads a 16-bit block (keys after
  RoPE, KIVI's layout, at least `MIN_CAPACITY` tokens): with a GPU's kernels,
  where cuDNN does not read it (a sliding window, or off a GPU: tests in
  interpret mode) or would run `programs`, one per (row, kv head), on at most
  a quarter of the GPU's SMs over at most `_DENSE_MAX_TOKENS`. That is where
  it was measured faster than cuDNN in the decode step on an H200 (132 SMs):
  batch 1 of Llama-2-7B (32 kv heads) and of Llama-3-8B (8), 1360 tokens
  (benchmarks/NOTES.md, "A kernel for the 16-bit block"); cuDNN elsewhere."""
  capacity = layer.k.codes.shape[2]
  if not (kernel_backend(impl) == "gpu" and config.k_bits == 16 and config.v_bits == 16
          and not config.pre_rope and config.channel_group is None
          and capacity >= gpu_dense.MIN_CAPACITY):
    return False
  if not _cudnn_reads_block(impl, config, dtype, sliding_window):
    return True
  return (programs <= _DENSE_MAX_SM_SHARE * (jax.devices()[0].core_count or 0)
          and capacity <= _DENSE_MAX_TOKENS)


def _dense_block_attention(qg, layer: LayerKV, nq, lo, config: KIVIConfig):
  """`(o, lse)` as `_jnp_block_attention`, by `decode_attention_dense`'s
  kernel over each row's first `nq[b]` block tokens from the window's `lo`."""
  rep = qg.shape[2]
  # The block holds body tokens: token S + i at index i.
  o, lse = gpu_dense.dense_decode_attention(
      _tile_kernel_rows(qg), layer.k.codes, layer.v.codes, nq, jnp.maximum(lo - config.sinks, 0),
      interpret=kernel_interpret("gpu"))
  return o[:, :, :rep], lse[:, :, :rep]


def _cudnn_block_attention(q, layer: LayerKV, nq, with_lse: bool = True):
  """`(o, lse)` as `_jnp_block_attention`, by cuDNN's flash attention over the
  16-bit block in its own `[B, Hkv, C, D]` layout (cuDNN's "BNTH": no
  transpose of the cache), each row's first `nq[b]` tokens. Without
  `with_lse`, cuDNN skips its softmax statistics and `lse` is None."""
  from jax._src.cudnn import fused_attention_stablehlo as cudnn
  b, _, hq, d = q.shape
  hkv = layer.ring_k.shape[1]
  out = cudnn.dot_product_attention(
      q.reshape(b, hq, 1, d), layer.k.codes, layer.v.codes,
      q_seqlen=jnp.ones((b,), jnp.int32), kv_seqlen=nq.astype(jnp.int32),
      scale=1.0 / math.sqrt(d), mask_type=cudnn.MaskType.PADDING, qkv_layout="BNTH",
      return_residual=with_lse)
  o, lse = out if with_lse else (out, None)
  # A row with no block token has nothing to merge: o = 0, lse very negative.
  some = (nq > 0)[:, None, None]
  o = jnp.where(some[..., None], o.reshape(b, hkv, hq // hkv, d).astype(jnp.float32), 0.0)
  if with_lse:
    lse = jnp.where(some, lse.reshape(b, hkv, hq // hkv).astype(jnp.float32), _NEG)
  return o, lse


def _pair_kernel_reads(impl: str, config: KIVIConfig, layer: LayerKV, dtype, rep: int,
                       rope_inv_freq) -> bool:
  """Whether `decode_attention_pairs`' kernel reads this layer's block: both
  tensors in the pair layout, keys after RoPE, and `pair_kernel_reads`."""
  return (layer.k.layout == layer.v.layout == "pairs" and rope_inv_freq is None
          and pair_kernel_reads(impl, config, layer.ring_k.shape[-1], rep, dtype,
                                layer.k.scale.dtype))


def _pair_block_attention(qg, layer: LayerKV, nq, lo, config: KIVIConfig):
  """`(o, lse)` as `_jnp_block_attention`, by `decode_attention_pairs`' kernel
  over each row's block tokens below `nq[b]` from the window's `lo`."""
  # The block holds body tokens: token S + i at index i.
  partials = gpu_pairs.pair_decode_partials(
      qg, layer.k.codes, layer.k.scale, layer.k.zero, layer.v.codes, layer.v.scale,
      layer.v.zero, nq, jnp.maximum(lo - config.sinks, 0), k_bits=config.k_bits,
      v_bits=config.v_bits, group_size=config.group_size)
  return gpu_decode.merge_partials(*partials)


def _kernel_block_attention(which: str, q, layer: LayerKV, nq, lo, config: KIVIConfig,
                            rope_inv_freq):
  """`(o [B, Hkv, rep, D], lse [B, Hkv, rep])` of the `which` kernel over the
  packed block."""
  b, _, hq, d = q.shape
  hkv = layer.ring_k.shape[1]
  rep = hq // hkv
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
  if config.channel_group is not None:
    return _hidden_block_attention(which, q[:, 0], layer, blocks, rows, rope, kw)
  if which == "gpu" and not rope and gpu_mha.applies(config.k_bits, config.v_bits, rep):
    # One query row per kv head: the two CUDA-core kernels (no rows padded to 16).
    return gpu_mha.mha_decode_attention(q[:, 0].reshape(b, hkv, 1, d), *blocks, *rows, **kw,
                                        interpret=kernel_interpret(which))
  # [B, Hkv, M, D]: a kv head's query rows, padded with zeros to what the
  # kernel's dot wants: 16 rows on GPUs, 8 sublanes on TPUs.
  m_rows = _kernel_rows(rep, 16 if which == "gpu" else tpu_decode.MIN_ROWS)
  pad = lambda x: jnp.pad(x.reshape(b, hkv, rep, d),  # noqa: E731
                          ((0, 0), (0, 0), (0, m_rows - rep), (0, 0)))
  if rope:
    rope["q_rot"] = pad(rope["q_rot"])
  o, lse = _block_kernel(which, pad(q[:, 0]), *blocks, *rows, **rope, **kw)
  return o[:, :, :rep], lse[:, :, :rep]


def _kernel_rows(rows: int, min_rows: int) -> int:
  """The query rows a kernel's dots take for `rows` real ones: a power of two
  of at least `min_rows` (16 on GPUs, `tpu_decode.MIN_ROWS` sublanes on TPUs)."""
  return max(min_rows, 1 << (rows - 1).bit_length())


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
  m_rows = _kernel_rows(hq, 16 if which == "gpu" else tpu_decode.MIN_ROWS)

  def spread(x):  # [B, Hq, D] -> [B, 1, M, H] in the keys' channel order
    x = jax.nn.one_hot(kv_of, hkv, dtype=x.dtype)[None, :, :, None] * x[:, :, None, :]
    x = jnp.take(x.reshape(b, hq, hkv * d), layer.k_map.perm, axis=-1)
    return jnp.pad(x, ((0, 0), (0, m_rows - hq), (0, 0)))[:, None]

  if rope:
    rope = dict(q_rot=spread(rope["q_rot"]),
                rope_theta=jnp.tile(rope["rope_theta"], hkv)[layer.k_map.perm])
  args = (spread(q), *blocks, *rows, layer.k_map.groups, layer.v_map.groups)
  kw = dict(**kw, sm_scale=1.0 / math.sqrt(d), hidden=True)
  if which == "gpu":
    # The kernel keeps each row's own kv head's channels, in their natural places.
    o, lse = _block_kernel(which, *args, layer.v_map.perm, **rope, **kw, head_dim=d, rep=rep)
    o = o.reshape(b, rep, hkv, d).transpose(0, 2, 1, 3)
  else:
    o, lse = _block_kernel(which, *args, **rope, **kw)
    # Each query row keeps its own kv head's D value channels of the H.
    cols = layer.v_map.positions().reshape(hkv, d)
    o = jnp.take_along_axis(o[:, 0, :hq], cols[kv_of][None], axis=-1).reshape(b, hkv, rep, d)
  return o, lse[:, 0, :hq].reshape(b, hkv, rep)
