"""SKVQ's calibration: channel order, groups and clip factors from real activations.

`calibrate` runs the full-precision model over calibration text, collects each
layer's keys and values over the KV hidden dim (all heads' channels side by
side; keys before RoPE with `pre_rope`), and per layer and tensor:

- reorder: clusters the channels by their `(min, max)` over the calibration
  tokens with k-means (`hidden_groups(H)` clusters, k-means++ seeded by
  `seed`), orders the clusters by range and stores the channels cluster by
  cluster: the clusters become the quantization groups, of unequal sizes
  (SPEC.md, "SKVQ"). Without reorder: the hidden order in equal groups.
- clip="calibrated": the factor in `clip_grid` whose clipped quantization of
  the calibration activations (in those groups) has the least squared error.

The result is small (two permutations, two group maps and two factors per
layer), is saved as JSON, and is keyed to the model's weights and to the
configuration fields it depends on, so it cannot be used with another model
or config by mistake.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from kivi_jax import quantization
from kivi_jax.cache import ChannelMap, equal_groups, init_cache
from kivi_jax.checks import nonnegative_int
from kivi_jax.config import KIVIConfig

CALIBRATED_FIELDS = ("k_bits", "v_bits", "channel_group", "reorder", "clip", "pre_rope",
                     "scale_dtype")
"""The `KIVIConfig` fields a calibration depends on."""

DEFAULT_CLIP_GRID = tuple(np.round(np.arange(0.50, 1.0001, 0.01), 2).tolist())
"""Candidate clip factors: 2-bit groups of SmolLM2's keys chose 0.8 at the
bottom of a 0.8 to 1 grid, so the search starts lower."""


def model_fingerprint(model) -> str:
  """A hash of the model's shape and its key and value projection weights."""
  h = hashlib.sha256()
  cfg = model.config
  h.update(repr((cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, cfg.hidden_size)).encode())
  for i in (-2, -1):  # keys, values: the bytes of the unfused wk, wv
    h.update(np.stack([np.asarray(layer["wqkv"][:, :, i], np.float32)
                       for layer in model.params["layers"]]).tobytes())
  return h.hexdigest()[:16]


@dataclasses.dataclass(frozen=True, eq=False)
class Calibration:
  """Per-layer channel maps of keys and values (`Ly` layers, `H` hidden channels).

  perm_k, perm_v: int32 `[Ly, H]`, groups_k, groups_v: int32 `[Ly, H]`, clip_k,
  clip_v: float32 `[Ly]` (one `kivi_jax.cache.ChannelMap` per layer and tensor).
  model: `model_fingerprint` of the model calibrated.
  config: the values of `CALIBRATED_FIELDS` it was calibrated for.
  source: free-form description of the calibration data.
  """

  model: str
  config: dict
  perm_k: np.ndarray
  groups_k: np.ndarray
  clip_k: np.ndarray
  perm_v: np.ndarray
  groups_v: np.ndarray
  clip_v: np.ndarray
  source: str = ""

  def check(self, kv_config: KIVIConfig) -> None:
    """Raises unless made for `kv_config`."""
    want = {f: getattr(kv_config, f) for f in CALIBRATED_FIELDS}
    for field, value in want.items():
      if self.config.get(field) != value:
        raise ValueError(
            f"calibration was made for {field}={self.config.get(field)!r}, the cache "
            f"config has {field}={value!r}: calibrate again for this config")

  def channel_maps(self, model_config, kv_config: KIVIConfig
                   ) -> list[tuple[ChannelMap, ChannelMap]]:
    """Each layer's `ChannelMap`s of keys and values, for `init_cache`."""
    self.check(kv_config)
    shape = (model_config.num_layers, model_config.num_kv_heads * model_config.head_dim)
    if self.perm_k.shape != shape:
      raise ValueError(f"calibration has [layers, hidden] = {self.perm_k.shape}, the "
                       f"model {shape}")
    return [(ChannelMap(jnp.asarray(self.perm_k[i]), jnp.asarray(self.groups_k[i]),
                        jnp.asarray(self.clip_k[i])),
             ChannelMap(jnp.asarray(self.perm_v[i]), jnp.asarray(self.groups_v[i]),
                        jnp.asarray(self.clip_v[i])))
            for i in range(shape[0])]

  def save(self, path) -> None:
    """Writes the calibration as JSON, creating `path`'s directory."""
    out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
    for name, value in out.items():
      if isinstance(value, np.ndarray):
        out[name] = value.tolist()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(out) + "\n")

  @classmethod
  def load(cls, path, model=None) -> Calibration:
    """Reads a saved calibration; with `model`, checks it was made for it."""
    raw = json.loads(Path(path).read_text())
    missing = {f.name for f in dataclasses.fields(cls)} - set(raw) - {"source"}
    if missing:
      raise ValueError(f"{path} is not a kivi-jax calibration: missing {sorted(missing)}")
    for name in ("perm_k", "groups_k", "perm_v", "groups_v"):
      raw[name] = np.asarray(raw[name], np.int32)
    for name in ("clip_k", "clip_v"):
      raw[name] = np.asarray(raw[name], np.float32)
    calib = cls(**raw)
    if model is not None and model_fingerprint(model) != calib.model:
      raise ValueError(f"{path} was calibrated for model {calib.model}, not this one "
                       f"({model_fingerprint(model)})")
    return calib


def _kmeans(points: np.ndarray, k: int, rng: np.random.Generator,
            iters: int = 100) -> np.ndarray:
  """Lloyd's k-means with k-means++ seeding in float64; labels `[N]`, none empty."""
  n = len(points)
  centers = [points[rng.integers(n)]]
  for _ in range(1, k):
    d2 = np.min(((points[:, None] - np.asarray(centers)[None]) ** 2).sum(-1), axis=1)
    total = d2.sum()
    pick = rng.choice(n, p=d2 / total) if total > 0 else rng.integers(n)
    centers.append(points[pick])
  centers = np.asarray(centers, np.float64)
  labels = np.zeros(n, np.int64)
  for step in range(iters):
    d2 = ((points[:, None] - centers[None]) ** 2).sum(-1)
    new = d2.argmin(1)
    for c in range(k):
      if not (new == c).any():
        # An empty cluster takes the point farthest from its own center, out of
        # a cluster that keeps another member.
        sizes = np.bincount(new, minlength=k)
        far = np.where(sizes[new] > 1, d2[np.arange(n), new], -1.0).argmax()
        new[far] = c
    if step and (new == labels).all():
      break
    labels = new
    centers = np.stack([points[labels == c].mean(0) for c in range(k)])
  return labels


def channel_order(x: np.ndarray, n_groups: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """SKVQ's reordering of `x` `[N, H]`: `(perm, groups)`, int32 `[H]` each.

  Channels are clustered by their `(min, max)`; clusters are laid out by
  increasing range (`max - min` of their center), channels of a cluster in
  their own order.
  """
  feats = np.stack([x.min(0), x.max(0)], 1).astype(np.float64)
  labels = _kmeans(feats, n_groups, np.random.default_rng(seed))
  centers = np.stack([feats[labels == c].mean(0) for c in range(n_groups)])
  rank = np.empty(n_groups, np.int64)
  rank[np.argsort(centers[:, 1] - centers[:, 0], kind="stable")] = np.arange(n_groups)
  perm = np.lexsort((np.arange(len(labels)), rank[labels])).astype(np.int32)
  return perm, rank[labels][perm].astype(np.int32)


@functools.partial(jax.jit, static_argnames=("bits", "n_groups", "scale_dtype"))
def _clip_errors(x, groups, alphas, *, bits, n_groups, scale_dtype):
  """Squared error of clipped quantization of `x` `[N, H]` for each alpha."""
  def one(alpha):
    codes, scale, zero = quantization.quantize(x, bits, 1, "token", scale_dtype, alpha,
                                               (groups, n_groups))
    deq = quantization.dequantize(codes, scale, zero, 1, "token", jnp.float32,
                                  (groups, n_groups))
    return jnp.sum((deq - x) ** 2)
  return jax.lax.map(one, alphas)


def best_clip(x: np.ndarray, groups: np.ndarray, bits: float, scale_dtype,
              grid=DEFAULT_CLIP_GRID) -> float:
  """The factor of `grid` with the least squared error quantizing `x` `[N, H]`
  (channels in cache order) in `groups`; the largest one on ties."""
  errors = np.asarray(_clip_errors(
      jnp.asarray(x, jnp.float32), jnp.asarray(groups), jnp.asarray(grid, jnp.float32),
      bits=bits, n_groups=int(groups.max()) + 1, scale_dtype=scale_dtype))
  best = np.flatnonzero(errors == errors.min())
  return float(np.asarray(grid)[best[-1]])


@functools.partial(jax.jit, static_argnames=("config",))
def _collect(params, tokens, cache, *, config):
  from kivi_jax.models import llama
  _, cache = llama.prefill(params, tokens, cache, config=config)
  return (jnp.stack([layer.k.codes for layer in cache.layers]),
          jnp.stack([layer.v.codes for layer in cache.layers]))


def collect_kv(model, token_batches, pre_rope: bool, progress: bool = True
               ) -> tuple[np.ndarray, np.ndarray]:
  """Keys and values of every calibration token: float32 `[Ly, N, Hkv * Dh]` each.

  Keys are taken before RoPE where `pre_rope`, as such a cache stores them.
  """
  cfg = model.config
  # Every token in the block, none quantized: a full-precision cache that
  # flushes each token as it comes (ring of one slot).
  fp = KIVIConfig(k_bits=16, v_bits=16, group_size=1, residual_length=0,
                  pre_rope=pre_rope)
  ks, vs = [], []
  for tokens in tqdm(token_batches, desc="calibration forward", disable=not progress,
                     leave=False):
    tokens = jnp.asarray(tokens, jnp.int32)
    if tokens.ndim != 2:
      raise ValueError(f"each calibration batch must be [batch, tokens], got shape "
                       f"{tokens.shape}")
    b, t = tokens.shape
    cache = init_cache(cfg, fp, b, t, dtype=jnp.float32)
    k, v = _collect(model.params, tokens, cache, config=cfg)
    for out, x in ((ks, k), (vs, v)):
      # [Ly, B, Hkv, C, Dh] -> [Ly, B * T, Hkv * Dh], heads side by side.
      x = np.asarray(x[:, :, :, :t], np.float32).transpose(0, 1, 3, 2, 4)
      out.append(x.reshape(cfg.num_layers, b * t, -1))
  if not ks:
    raise ValueError("token_batches is empty")
  return np.concatenate(ks, 1), np.concatenate(vs, 1)


def calibrate(model, token_batches, kv_config: KIVIConfig, *, seed: int = 0,
              clip_grid=DEFAULT_CLIP_GRID, source: str = "", progress: bool = True
              ) -> Calibration:
  """Calibrates `kv_config`'s channel order, groups and clip factors on `model`.

  Args:
    model: a `kivi_jax.Model`.
    token_batches: an iterable of int `[batch, tokens]` arrays of calibration
      text (keep it disjoint from evaluation text).
    kv_config: a config with `channel_group` (SKVQ).
    seed: seeds k-means; the result is a function of the data and the seed.
    clip_grid: candidate clip factors for clip="calibrated".
    source: a description of the data, stored with the result.
  """
  if kv_config.channel_group is None:
    raise ValueError("calibrate needs a kv_config with channel_group (SKVQ's groups over "
                     "the hidden dim)")
  seed = nonnegative_int("seed", seed)
  grid = np.asarray(clip_grid, np.float64)
  if grid.ndim != 1 or not grid.size or (grid <= 0).any() or (grid > 1).any():
    raise ValueError(f"clip_grid must be a non-empty list of numbers in (0, 1], got "
                     f"{clip_grid!r}")
  cfg = model.config
  keys, values = collect_kv(model, token_batches, kv_config.pre_rope, progress)
  hidden = keys.shape[-1]
  n_groups = kv_config.hidden_groups(hidden)
  out = {}
  for name, x_all, bits in (("k", keys, kv_config.k_bits), ("v", values, kv_config.v_bits)):
    perms, groups, clips = [], [], []
    for layer in tqdm(range(cfg.num_layers), desc=f"calibrating {name}",
                      disable=not progress, leave=False):
      x = x_all[layer]
      if kv_config.reorder:
        perm, grp = channel_order(x, n_groups, seed + layer)
      else:
        perm, grp = np.arange(hidden, dtype=np.int32), equal_groups(hidden, n_groups)
      clip = kv_config.clip
      if clip == "calibrated" and bits < 16:
        clip = best_clip(x[:, perm], grp, bits, kv_config.scale_dtype, tuple(grid))
      elif clip == "calibrated":
        clip = 1.0
      perms.append(perm)
      groups.append(grp)
      clips.append(clip)
    out[f"perm_{name}"] = np.stack(perms)
    out[f"groups_{name}"] = np.stack(groups)
    out[f"clip_{name}"] = np.asarray(clips, np.float32)
  return Calibration(model=model_fingerprint(model),
                     config={f: getattr(kv_config, f) for f in CALIBRATED_FIELDS},
                     source=source, **out)
