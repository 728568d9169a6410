"""A cache saved with orbax and restored in another process.

Prefill a long document once, `save_cache`, and answer questions about it
later: `restore_cache` returns the cache as it was saved, every array as
stored (packed codes, scales and zeros, the full-precision ring, sinks, SKVQ's
channel maps, lengths); nothing is dequantized or quantized again.

A checkpoint is a directory: `kivi_jax.json` says what the cache is for (the
model's fingerprint, the `KIVIConfig`, rows, capacity, dtype) and `arrays/`
holds orbax's `StandardCheckpointer` output.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from kivi_jax import sharding
from kivi_jax.cache import IMPLS, LAYOUTS, KVCache, init_cache, ring_keeps
from kivi_jax.calibration import model_fingerprint
from kivi_jax.config import KIVIConfig

FORMAT = 3
"""Format 3 (2026-12-07) holds SKVQ's per-token scales and zeros tokens last
(`[B, 1, n, C]`, `kivi_jax.cache`); formats 1 and 2 held them `[B, 1, C, n]`,
and are read into the new layout. Format 2 (2026-12-05) records a row's
capacity with the ring's tokens beside a full block (`KVCache.capacity`);
format 1 recorded the block's and the sinks' only, and is read as the
capacity the same arrays give now."""
META = "kivi_jax.json"


def _names(tree) -> tuple[list[str], jax.tree_util.PyTreeDef]:
  """Each leaf's path as a name orbax can store (`layers_3__k__codes`)."""
  paths, treedef = jax.tree_util.tree_flatten_with_path(tree)

  def part(key):
    for attr in ("name", "key", "idx"):
      if hasattr(key, attr):
        return str(getattr(key, attr))
    raise TypeError(f"unexpected pytree key {key!r}")

  return ["__".join(part(k) for k in path) for path, _ in paths], treedef


def _describe(cache: KVCache, model, metadata) -> dict:
  return {"format": FORMAT, "model": model_fingerprint(model),
          "kv_config": dataclasses.asdict(cache.config), "batch": int(cache.lengths.shape[0]),
          "capacity": cache.capacity, "dtype": np.dtype(cache.layers[0].ring_k.dtype).name,
          "impl": cache.impl, "layout": cache.layout,
          "lengths": np.asarray(cache.lengths).tolist(),
          "metadata": metadata}


def save_cache(path, cache: KVCache, model, *, metadata: dict | None = None,
               overwrite: bool = False) -> Path:
  """Writes `cache` (made for `model`) to the directory `path`.

  The checkpoint is written beside `path` and moved into place once complete:
  a save that fails leaves whatever `path` held untouched. An existing `path`
  is replaced only with `overwrite=True`.

  Args:
    metadata: anything JSON can hold, kept beside the arrays for the caller
      (what the cache holds, how its text was formatted); `cache_info` reads it.

  Returns:
    `path`, absolute.
  """
  if not isinstance(cache, KVCache):
    raise TypeError(f"cache must be a KVCache, got {type(cache).__name__}")
  path = Path(path).expanduser().absolute()
  if path.exists() and not overwrite:
    raise FileExistsError(f"{path} exists: pass overwrite=True to replace it")
  meta = _describe(cache, model, metadata)
  try:
    text = json.dumps(meta, indent=1) + "\n"
  except TypeError as e:
    raise ValueError(f"metadata must be JSON-serializable: {e}") from e
  names, _ = _names(cache)
  tmp = path.with_name(f".{path.name}.saving-{os.getpid()}")
  shutil.rmtree(tmp, ignore_errors=True)
  try:
    tmp.mkdir(parents=True)
    with ocp.StandardCheckpointer() as ckpt:
      ckpt.save(tmp / "arrays", dict(zip(names, jax.tree.leaves(cache))))
    (tmp / META).write_text(text)
    old = path.with_name(f".{path.name}.replaced-{os.getpid()}")
    if path.exists():
      path.rename(old)
    tmp.rename(path)
    shutil.rmtree(old, ignore_errors=True)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return path


def cache_info(path) -> dict:
  """What the checkpoint at `path` holds, without reading its arrays.

  Returns:
    A dict: `model` (the fingerprint of the model it was made for),
    `kv_config` (a `KIVIConfig`), `batch`, `capacity`, `lengths` (tokens held
    per row), `dtype`, `impl`, `layout` ("slots" for a checkpoint written
    before layouts), and the `metadata` given to `save_cache`.

  Raises:
    ValueError: `path` is not a checkpoint, or its description is damaged or of
      another format.
  """
  path = Path(path).expanduser().absolute()
  meta_path = path / META
  if not meta_path.is_file():
    raise ValueError(f"{path} is not a kivi-jax cache checkpoint (no {META})")
  try:
    meta = json.loads(meta_path.read_text())
    version = meta.get("format")
  except (ValueError, AttributeError) as e:
    raise ValueError(f"{meta_path} is damaged: {e}") from e
  if version not in (1, 2, FORMAT):
    raise ValueError(f"{path} has checkpoint format {version!r}; this kivi-jax reads "
                     f"formats 1 to {FORMAT}")
  try:
    meta["kv_config"] = KIVIConfig(**meta["kv_config"])
    meta["batch"], meta["capacity"] = int(meta["batch"]), int(meta["capacity"])
    if version == 1:
      meta["capacity"] += ring_keeps(meta["kv_config"])
    meta["lengths"] = [int(n) for n in meta["lengths"]]
    meta["dtype"] = np.dtype(meta["dtype"]).name
    meta["layout"] = meta.get("layout", "slots")
    if meta["layout"] not in LAYOUTS:
      raise ValueError(f"layout {meta['layout']!r} is none of {LAYOUTS}")
  except (ValueError, KeyError, TypeError) as e:
    raise ValueError(f"{meta_path} is damaged: {e}") from e
  return meta


def restore_cache(path, model, *, kv_config: KIVIConfig | None = None,
                  impl: str | None = None, device=None, mesh=None) -> KVCache:
  """The cache `save_cache` wrote to `path`, on `device` (the first by default)
  or split over `mesh`.

  Args:
    path: a checkpoint directory.
    model: the model the cache was made for; another model is refused.
    kv_config: if given, the config the caller expects; another is refused.
    impl: `KVCache.impl` of the result; the saved cache's by default.
    device: where the arrays go.
    mesh: a `kivi_jax.make_mesh` mesh instead: each device reads its own shard
      (`kivi_jax.sharding.cache_specs`), whatever mesh, if any, the cache was
      saved from.

  Raises:
    ValueError: `path` is not a checkpoint, was made for another model or
      config, or its arrays cannot be read. Nothing on disk is changed.
  """
  path = Path(path).expanduser().absolute()
  meta = cache_info(path)
  meta_path = path / META
  saved = meta["kv_config"]
  batch, capacity, dtype = meta["batch"], meta["capacity"], meta["dtype"]
  fingerprint = model_fingerprint(model)
  if meta.get("model") != fingerprint:
    raise ValueError(f"{path} holds a cache of model {meta.get('model')}, not of this one "
                     f"({fingerprint})")
  if kv_config is not None and kv_config != saved:
    field = next(f.name for f in dataclasses.fields(KIVIConfig)
                 if getattr(kv_config, f.name) != getattr(saved, f.name))
    raise ValueError(f"{path} holds a cache with {field}={getattr(saved, field)!r}, not "
                     f"{field}={getattr(kv_config, field)!r}")
  impl = meta.get("impl", "auto") if impl is None else impl
  if impl not in IMPLS:
    raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
  # A calibration changes the channel maps' values, not their shapes: the
  # target is built without one and the saved maps fill it.
  plain = dataclasses.replace(saved, reorder=False, clip=1.0) if saved.needs_calibration \
      else saved
  layout = meta["layout"]
  shapes = jax.eval_shape(lambda: init_cache(model.config, plain, batch,
                                             capacity - saved.sinks, dtype=dtype, impl=impl,
                                             layout=layout))
  if shapes.capacity != capacity:
    raise ValueError(f"{meta_path} is damaged: capacity {capacity} is no cache's capacity "
                     f"for this config")
  names, treedef = _names(shapes)
  if mesh is None:
    place = [jax.sharding.SingleDeviceSharding(device or jax.devices()[0])] * len(names)
  else:
    if device is not None:
      raise ValueError("pass device= or mesh=, not both")
    sharding.check_mesh(mesh, model.config, saved, batch)
    place = [jax.sharding.NamedSharding(mesh, spec)
             for spec in jax.tree.leaves(sharding.cache_specs(shapes))]
  # SKVQ's scales and zeros, tokens first before format 3: read as they lie,
  # then turned.
  turned = {n for n in names if meta["format"] < 3 and saved.channel_group is not None
            and n.endswith(("__scale", "__zero"))}

  def stored(n, shape):
    return (*shape[:-2], shape[-1], shape[-2]) if n in turned else shape

  target = {n: jax.ShapeDtypeStruct(stored(n, s.shape), s.dtype, sharding=p)
            for n, s, p in zip(names, jax.tree.leaves(shapes), place)}
  try:
    with ocp.StandardCheckpointer() as ckpt:
      arrays = ckpt.restore(path / "arrays", target)
  except Exception as e:  # orbax and tensorstore raise many kinds
    raise ValueError(f"{path}: the cache's arrays cannot be read: {e}") from e
  cache = jax.tree_util.tree_unflatten(
      treedef, [jnp.swapaxes(arrays[n], -1, -2) if n in turned else arrays[n] for n in names])
  return cache.replace(config=saved, mesh=mesh)
