"""Functional Llama and Mistral (GQA, RoPE, RMSNorm, SwiGLU) over a KV cache.

Parameters are a pytree of arrays, each layer's its own (a tuple of `Ly`
dicts), and the forward pass is a Python loop over layers:

  embed        [V, D]
  layers[i]/
    attn_norm  [D]                    mlp_norm [D]
    wqkv       [D, Hkv, Hq/Hkv + 2, Dh]   wo   [Hq, Dh, D]
    w_gate_up  [D, 2, F]                  w_down [F, D]
  final_norm   [D]
  lm_head      [D, V]       (absent when embeddings are tied)

`wqkv` holds each kv head's query heads, then its key, then its value
(`fuse_layer` builds it from the q, k, v projections); `w_gate_up` the gate,
then the up projection. One matmul where there were three, and one where
there were two: a decode step reads the same bytes in fewer, larger kernels
(measured on an H200: `benchmarks/NOTES.md`, "Fused projections").

Why not layers stacked on a leading axis and a `lax.scan`: XLA materializes
each layer's slice of a stacked array before a matmul or a kernel reads it,
so a decode step would copy all the weights and the whole cache every step
(measured: 7.5 of 13.3 ms of a Llama-2-7B step on an H200). Separate arrays
are read where they lie, and the cache's are updated in place.

Mistral is Llama with a sliding attention window; one forward serves both.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import Array

from kivi_jax import sharding
from kivi_jax.attention import apply_rope, cache_attention, decode_attention, prompt_attention
from kivi_jax.cache import KVCache, append, append_flushing
from kivi_jax.models.config import ModelConfig


def rms_norm(x: Array, weight: Array, eps: float) -> Array:
  # As transformers: normalize in float32, cast back, then scale.
  x32 = x.astype(jnp.float32)
  x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
  return weight * x32.astype(x.dtype)


def rope_inv_freq(config: ModelConfig) -> Array:
  """`[Dh/2]` inverse frequencies, with the `rope_scaling` variant applied."""
  dh = config.head_dim
  inv_freq = 1.0 / (config.rope_theta ** (jnp.arange(0, dh, 2, dtype=jnp.float32) / dh))
  scaling = config.rope_scaling_dict
  kind = scaling.get("rope_type", "default")
  if kind == "linear":
    inv_freq = inv_freq / scaling["factor"]
  elif kind == "llama3":
    # Llama 3.1: stretch low frequencies by `factor`, keep high ones, and blend
    # the band between (transformers' `_compute_llama3_parameters`).
    factor = scaling["factor"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_len = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = jnp.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    inv_freq = jnp.where(medium, smoothed, scaled)
  return inv_freq


def fuse_layer(layer: dict) -> dict:
  """A layer's parameters with separate `wq [D, Hq, Dh]`, `wk`, `wv`
  `[D, Hkv, Dh]`, `w_gate`, `w_up` `[D, F]` in the fused layout (module
  docstring); numpy or jax arrays, the others passed through."""
  xp = np if isinstance(layer["wq"], np.ndarray) else jnp
  wq, wk, wv = layer["wq"], layer["wk"], layer["wv"]
  d, hkv, dh = wk.shape
  wq = wq.reshape(d, hkv, wq.shape[1] // hkv, dh)
  rest = {k: v for k, v in layer.items()
          if k not in ("wq", "wk", "wv", "w_gate", "w_up")}
  return {**rest, "wqkv": xp.concatenate([wq, wk[:, :, None], wv[:, :, None]], axis=2),
          "w_gate_up": xp.stack([layer["w_gate"], layer["w_up"]], axis=1)}


def _project(h: Array, w: Array) -> Array:
  """`[B, T, D] @ [D, N, H] -> [B, T, N, H]` as a matmul over flat heads (see
  the output projection in `_forward`)."""
  return jnp.einsum("BTD,DE->BTE", h, w.reshape(w.shape[0], -1)).reshape(
      *h.shape[:2], *w.shape[1:])


def _compact(input_ids: Array, attention_mask: Array) -> tuple[Array, Array, Array]:
  """Moves each row's real tokens to the front, keeping their order.

  Returns the compacted ids, the permutation used and the real-token counts.
  """
  order = jnp.argsort(attention_mask == 0, axis=1, stable=True)
  ids = jnp.take_along_axis(input_ids, order, axis=1)
  return ids, order, attention_mask.astype(jnp.int32).sum(axis=1)


def forward(params, input_ids: Array, cache: KVCache, attention_mask: Array | None = None,
            *, config: ModelConfig, last_only: bool = False) -> tuple[Array, KVCache]:
  """Runs `T` new tokens per row through the model, reading and extending `cache`.

  Serves decode (`T = 1`) and any continuation of a cache; `prefill` is the
  faster path for a prompt into an empty cache.

  Args:
    params: the parameter pytree (module docstring).
    input_ids: int `[B, T]`.
    cache: the cache before these tokens; row `b`'s new tokens get positions
      `cache.lengths[b], cache.lengths[b] + 1, ...`.
    attention_mask: `[B, T]`, 1 for real tokens, 0 for padding on either side
      (or anywhere); None means all real.
    last_only: form the logits of each row's last real token only, `[B, V]`.

  Returns:
    `(logits, new_cache)`: float32 logits `[B, T, V]` (meaningless at padding
    positions; NaN for a row whose tokens exceed `cache.capacity`) and the cache
    with each row's real tokens appended.
  """
  return _forward(params, input_ids, cache, attention_mask, config=config, prompt=False,
                  last_only=last_only)


def prefill(params, input_ids: Array, cache: KVCache, attention_mask: Array | None = None,
            *, config: ModelConfig) -> tuple[Array, KVCache]:
  """A prompt into an empty cache: `forward`'s cache, and logits `[B, V]` of
  each row's last real token only.

  The prompt attends to itself alone (flash attention on a GPU, query chunks
  elsewhere: never `[B, H, T, T]` scores), and only `B` rows of logits are
  formed rather than `B x T`. A row whose cache is not empty gets NaN logits
  (`forward` serves such a cache).
  """
  return _forward(params, input_ids, cache, attention_mask, config=config, prompt=True,
                  last_only=True)


def _attend(q, k_cache, v_cache, k_rot, v, layer_cache, lengths, n_new, rope_freq, *,
            kv, config: ModelConfig, impl: str, prompt: bool):
  """One layer's attention of the new tokens and its cache's update: queries
  `[B, T, Hq, Dh]`, the new keys and values as the cache stores them
  (`[B, Hkv, T, Dh]`) and as attention reads them (`[B, T, Hkv, Dh]`, keys
  rotated). Returns `(attn [B, T, Hq, Dh], new layer cache)`. Rows and heads are
  independent here, so under a mesh each shard runs this on its own."""
  t = q.shape[1]
  if prompt:
    attn = prompt_attention(q, k_rot, v, n_new, config.sliding_window, impl)
    return attn, append(layer_cache, k_cache, v_cache, lengths, n_new, kv, impl)
  if t == 1:
    # A decode step attends to the cache as its append leaves it, so the
    # buffers are written in place before they are read (`append_flushing`).
    layer_cache, flushed = append_flushing(layer_cache, k_cache, v_cache, lengths, n_new,
                                           kv, impl)
    return decode_attention(q, layer_cache, flushed, lengths, n_new, kv,
                            config.sliding_window, impl, rope_freq), layer_cache
  attn = cache_attention(q, layer_cache, k_cache, v_cache, lengths, n_new, kv,
                         config.sliding_window, impl, rope_freq)
  return attn, append(layer_cache, k_cache, v_cache, lengths, n_new, kv, impl)


MLP_TOKENS = 8192
"""The most tokens (rows x tokens) a layer's MLP block takes at once: a longer
prompt runs it over chunks of its tokens. Its gate and up projections and their
product are the largest of a layer's activations; in chunks they are a chunk's.
A one-row prefill, compiled for sm_90 (jax 0.11.2), held 66.1 KB a token of
temporaries at Llama-2-7B's shapes against 90.8 with the MLP whole, 36.9 against
110.6 at Llama-3-8B's, and 32,768 tokens took 1.248 s against 1.246 on an H100
(benchmarks/NOTES.md, "A long prompt's MLP over chunks of its tokens"). A
batch's prefill chunks take at most as many tokens (`memory.PREFILL_TOKENS`)."""


# Every layer has the same shapes, so inside the model's `jit` this one is traced
# and lowered once and called per layer (XLA inlines the calls before it
# optimizes): 30 unrolled layers traced and lowered 30 times took most of a
# SmolLM2 `generate`'s time before compiling (benchmarks/NOTES.md, "What running
# the CLI again costs").
@functools.partial(jax.jit, static_argnames=("kv", "config", "impl", "prompt", "mesh",
                                             "mlp_tokens"))
def _layer(p, layer_cache, x, positions, inv_freq, rope_freq, lengths, n_new, *, kv,
           config: ModelConfig, impl: str, prompt: bool, mesh, mlp_tokens: int):
  """One decoder layer: `(x, new layer cache)` for the residual stream `x`
  `[B, T, D]` and the layer's parameters `p` and cache; the MLP block over
  chunks of at most `mlp_tokens` tokens (`MLP_TOKENS`)."""
  b, t = x.shape[:2]
  h = rms_norm(x, p["attn_norm"], config.rms_norm_eps)
  # [B, T, Hkv, Hq/Hkv + 2, Dh] -> q [B, T, Hq, Dh], k, v [B, T, Hkv, Dh]
  qkv = _project(h, p["wqkv"])
  rep = qkv.shape[3] - 2
  q = apply_rope(qkv[:, :, :, :rep].reshape(b, t, -1, qkv.shape[-1]), positions, inv_freq)
  k, v = qkv[:, :, :, rep], qkv[:, :, :, rep + 1]
  k_rot = apply_rope(k, positions, inv_freq)
  # [B, Hkv, T, Dh]: what the cache stores.
  k_cache, v_cache = (k if kv.pre_rope else k_rot).swapaxes(1, 2), v.swapaxes(1, 2)
  attend = functools.partial(_attend, kv=kv, config=config, impl=impl, prompt=prompt)
  if mesh is not None:
    attend = sharding.shard_layer_attention(attend, mesh, layer_cache)
  attn, layer_cache = attend(q, k_cache, v_cache, k_rot, v, layer_cache, lengths, n_new,
                             rope_freq)
  # [B, T, Hq * Dh] @ [Hq * Dh, D]: flat operands, so XLA has no axis order
  # to choose and never transposes the weight to suit the activation.
  wo = p["wo"].reshape(-1, p["wo"].shape[-1])
  x = x + jnp.einsum("BTE,ED->BTD", attn.reshape(b, t, -1), wo)
  mlp = functools.partial(_mlp_block, p=p, eps=config.rms_norm_eps)
  return _by_token_chunks(mlp, x, max(1, mlp_tokens // b)), layer_cache


def _mlp_block(x: Array, *, p, eps: float) -> Array:
  """The residual stream `x` `[B, T, D]` through a layer's MLP block."""
  h = rms_norm(x, p["mlp_norm"], eps)
  gate_up = jnp.einsum("BTD,DCF->BTCF", h, p["w_gate_up"])
  gate, up = jax.nn.silu(gate_up[:, :, 0]), gate_up[:, :, 1]
  return x + jnp.einsum("BTF,FD->BTD", gate * up, p["w_down"])


def _by_token_chunks(f, x: Array, size: int) -> Array:
  """`f(x)` for an `f` that maps each token of `x` `[B, T, ...]` alone, run over
  chunks of `size` tokens when `T` is longer, so that only a chunk's
  temporaries are live. The last chunk ends at `T`, overlapping the one before
  it where `size` does not divide `T`: its first tokens are computed twice, from
  the same inputs, and written twice with the same values. The result starts
  as `x`, not as zeros: zeros need nothing of the layer, and XLA formed every
  layer's at the program's start (`tests/test_llama.py`)."""
  t = x.shape[1]
  if t <= size:
    return f(x)

  def chunk(i, out):
    start = jnp.minimum(i * size, t - size)
    y = f(jax.lax.dynamic_slice_in_dim(x, start, size, axis=1))
    return jax.lax.dynamic_update_slice_in_dim(out, y, start, axis=1)
  return jax.lax.fori_loop(0, -(-t // size), chunk, x)


def _forward(params, input_ids, cache: KVCache, attention_mask, *, config: ModelConfig,
             prompt: bool, last_only: bool):
  if input_ids.ndim != 2:
    raise ValueError(f"input_ids must be [batch, tokens], got shape {input_ids.shape}")
  b, t = input_ids.shape
  if b != cache.lengths.shape[0]:
    raise ValueError(f"input_ids has {b} rows, the cache {cache.lengths.shape[0]}")
  if attention_mask is not None and attention_mask.shape != input_ids.shape:
    raise ValueError(f"attention_mask has shape {attention_mask.shape}, input_ids "
                     f"{input_ids.shape}")
  if t > cache.capacity:
    raise ValueError(f"{t} new tokens exceed the cache capacity ({cache.capacity})")
  if len(params["layers"]) != len(cache.layers):
    raise ValueError(f"the model has {len(params['layers'])} layers, the cache "
                     f"{len(cache.layers)}")
  if attention_mask is None:
    attention_mask = jnp.ones((b, t), jnp.int32)
  ids, order, n_new = _compact(input_ids, attention_mask)
  kv = cache.config
  dtype = jnp.dtype(config.dtype)
  # [B, T]
  positions = cache.lengths[:, None] + jnp.arange(t)[None, :]
  inv_freq = rope_inv_freq(config)
  rope_freq = inv_freq if kv.pre_rope else None
  # [B, T, D]
  x = params["embed"][ids].astype(dtype)

  new_layers = []
  for p, layer_cache in zip(params["layers"], cache.layers):
    x, layer_cache = _layer(p, layer_cache, x, positions, inv_freq, rope_freq, cache.lengths,
                            n_new, kv=kv, config=config, impl=cache.impl, prompt=prompt,
                            mesh=cache.mesh, mlp_tokens=MLP_TOKENS)
    if t > 1:
      # The layer's cache formed before the next layer runs: otherwise XLA may
      # leave each layer's cache writes (fused with their reads of the layer's
      # q, k, v projection) until the program's end, keeping every layer's
      # projection alive at once (seen in a prefill: benchmarks/NOTES.md, "The
      # prefill's memory a row"). A decode step's one token needs none.
      x, layer_cache = jax.lax.optimization_barrier((x, layer_cache))
    new_layers.append(layer_cache)

  head = params["embed"].T if config.tie_word_embeddings else params["lm_head"]
  new_cache = cache.replace(layers=tuple(new_layers), lengths=cache.lengths + n_new)
  # A row pushed past the cache's capacity loses tokens; lengths are traced, so
  # instead of raising, its logits become NaN rather than a silent wrong answer.
  bad = cache.lengths + n_new > cache.capacity
  if prompt:
    bad |= cache.lengths > 0
  if last_only:
    # [B, D]: each row's last real token (compacted to the front).
    x = jnp.take_along_axis(x, jnp.maximum(n_new - 1, 0)[:, None, None], axis=1)[:, 0]
    x = rms_norm(x, params["final_norm"], config.rms_norm_eps)
    logits = jnp.einsum("BD,DV->BV", x, head, preferred_element_type=jnp.float32)
    return jnp.where(bad[:, None], jnp.nan, logits), new_cache
  x = rms_norm(x, params["final_norm"], config.rms_norm_eps)
  logits = jnp.einsum("BTD,DV->BTV", x, head, preferred_element_type=jnp.float32)
  # Back to the caller's token order.
  logits = jax.vmap(lambda lg, o: jnp.zeros_like(lg).at[o].set(lg))(logits, order)
  return jnp.where(bad[:, None, None], jnp.nan, logits), new_cache
