"""Functional Llama and Mistral (GQA, RoPE, RMSNorm, SwiGLU) over a KV cache.

Parameters are a pytree of arrays with the layers stacked on a leading axis, so
the forward pass is one `lax.scan` over layers (fast to compile at any depth):

  embed        [V, D]
  layers/
    attn_norm  [Ly, D]          mlp_norm [Ly, D]
    wq         [Ly, D, Hq, Dh]  wk, wv   [Ly, D, Hkv, Dh]   wo [Ly, Hq, Dh, D]
    w_gate     [Ly, D, F]       w_up     [Ly, D, F]         w_down [Ly, F, D]
  final_norm   [D]
  lm_head      [D, V]           (absent when embeddings are tied)

Mistral is Llama with a sliding attention window; one forward serves both.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import Array

from kivi_jax.attention import apply_rope, cache_attention
from kivi_jax.cache import KVCache, append
from models.config import ModelConfig


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


def _compact(input_ids: Array, attention_mask: Array) -> tuple[Array, Array, Array]:
  """Moves each row's real tokens to the front, keeping their order.

  Returns the compacted ids, the permutation used and the real-token counts.
  """
  order = jnp.argsort(attention_mask == 0, axis=1, stable=True)
  ids = jnp.take_along_axis(input_ids, order, axis=1)
  return ids, order, attention_mask.astype(jnp.int32).sum(axis=1)


def forward(params, input_ids: Array, cache: KVCache, attention_mask: Array | None = None,
            *, config: ModelConfig) -> tuple[Array, KVCache]:
  """Runs `T` new tokens per row through the model, reading and extending `cache`.

  Serves prefill (any `T`, fresh cache) and decode (`T = 1`) alike.

  Args:
    params: the parameter pytree (module docstring).
    input_ids: int `[B, T]`.
    cache: the cache before these tokens; row `b`'s new tokens get positions
      `cache.lengths[b], cache.lengths[b] + 1, ...`.
    attention_mask: `[B, T]`, 1 for real tokens, 0 for padding on either side
      (or anywhere); None means all real.

  Returns:
    `(logits, new_cache)`: float32 logits `[B, T, V]` (meaningless at padding
    positions; NaN for a row whose tokens exceed `cache.capacity`) and the cache
    with each row's real tokens appended.
  """
  b, t = input_ids.shape
  if t > cache.capacity:
    raise ValueError(f"{t} new tokens exceed the cache capacity ({cache.capacity})")
  if attention_mask is None:
    attention_mask = jnp.ones((b, t), jnp.int32)
  ids, order, n_new = _compact(input_ids, attention_mask)
  kv = cache.config
  dtype = jnp.dtype(config.dtype)
  # [B, T]
  positions = cache.lengths[:, None] + jnp.arange(t)[None, :]
  inv_freq = rope_inv_freq(config)
  # [B, T, D]
  x = params["embed"][ids].astype(dtype)

  def layer(x, layer_in):
    p, layer_cache = layer_in
    h = rms_norm(x, p["attn_norm"], config.rms_norm_eps)
    # [B, T, H, Dh]
    q = apply_rope(jnp.einsum("BTD,DNH->BTNH", h, p["wq"]), positions, inv_freq)
    k = jnp.einsum("BTD,DNH->BTNH", h, p["wk"])
    if not kv.pre_rope:
      k = apply_rope(k, positions, inv_freq)
    v = jnp.einsum("BTD,DNH->BTNH", h, p["wv"])
    # [B, Hkv, T, Dh]
    k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
    attn = cache_attention(q, layer_cache, k, v, cache.lengths, n_new, kv,
                           config.sliding_window, cache.impl,
                           inv_freq if kv.pre_rope else None)
    x = x + jnp.einsum("BTNH,NHD->BTD", attn, p["wo"])
    h = rms_norm(x, p["mlp_norm"], config.rms_norm_eps)
    gate = jax.nn.silu(jnp.einsum("BTD,DF->BTF", h, p["w_gate"]))
    up = jnp.einsum("BTD,DF->BTF", h, p["w_up"])
    x = x + jnp.einsum("BTF,FD->BTD", gate * up, p["w_down"])
    return x, append(layer_cache, k, v, cache.lengths, n_new, kv, cache.impl)

  x, new_layers = jax.lax.scan(layer, x, (params["layers"], cache.layers))
  x = rms_norm(x, params["final_norm"], config.rms_norm_eps)
  head = params["embed"].T if config.tie_word_embeddings else params["lm_head"]
  logits = jnp.einsum("BTD,DV->BTV", x, head, preferred_element_type=jnp.float32)
  # Back to the caller's token order.
  logits = jax.vmap(lambda lg, o: jnp.zeros_like(lg).at[o].set(lg))(logits, order)
  # A row pushed past the cache's capacity loses tokens; lengths are traced, so
  # instead of raising, its logits become NaN rather than a silent wrong answer.
  overflow = cache.lengths + n_new > cache.capacity
  logits = jnp.where(overflow[:, None, None], jnp.nan, logits)
  return logits, cache.replace(layers=new_layers, lengths=cache.lengths + n_new)
