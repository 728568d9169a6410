"""Past one device: the model and the cache over a `jax.sharding.Mesh`.

A mesh has two axes. `data` splits the rows of a batch; `model` splits the
attention heads and the MLP's columns (Megatron-style tensor parallelism:
q, k, v, gate and up by columns, o and down by rows, so a layer needs two
all-reduces and nothing else). The cache is split like the keys and values it
holds: a row's packed codes, scales, zeros, ring and sinks live on the devices
of that row's data shard, each kv head on the model shard computing its query
heads, so a decode step moves no cache bytes between devices.

Everything between a layer's projections (the cache's write and the attention,
Pallas kernels included) runs per shard under `jax.shard_map`; the projections
and the rest of the step are ordinary jitted code that XLA partitions from the
shardings of the parameters, the cache and the prompts.

SKVQ's channel reordering mixes the kv heads' channels in one hidden dim, so an
SKVQ cache splits over `data` only (a mesh with `model=1`).
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from kivi_jax.checks import positive_int

DATA, MODEL = "data", "model"

# Parameter name -> how its axes split (module docstring): q, k, v `[D, Hkv, ., Dh]`
# by kv heads, o `[Hq, Dh, D]` by its rows' heads, gate and up `[D, 2, F]` by
# columns and down `[F, D]` by rows; everything else (embeddings, norms) whole
# on every device.
_PARAM_SPECS = {
    "wqkv": P(None, MODEL, None, None), "wo": P(MODEL, None, None),
    "w_gate_up": P(None, None, MODEL), "w_down": P(MODEL, None),
}
LAYER_PARAMS = ("attn_norm", "mlp_norm", *_PARAM_SPECS)
"""The names of a layer's parameters (`kivi_jax.models.llama`)."""


def layer_param_spec(name: str) -> P:
  """The `PartitionSpec` of a layer's parameter `name` (`LAYER_PARAMS`)."""
  return _PARAM_SPECS.get(name, P())


def make_mesh(data: int = 1, model: int = 1, devices=None) -> Mesh:
  """A `data x model` mesh over the first `data * model` of `devices`
  (`jax.devices()` by default)."""
  data, model = positive_int("data", data), positive_int("model", model)
  devices = list(jax.devices() if devices is None else devices)
  if data * model > len(devices):
    raise ValueError(f"a mesh of data={data} x model={model} needs {data * model} devices; "
                     f"{len(devices)} are available")
  return Mesh(np.array(devices[:data * model]).reshape(data, model), (DATA, MODEL))


def check_mesh(mesh, model_config, kv_config=None, batch: int | None = None) -> None:
  """Raises `ValueError` naming what does not split over `mesh`."""
  if not isinstance(mesh, Mesh) or tuple(mesh.axis_names) != (DATA, MODEL):
    raise ValueError(f"mesh must be a jax.sharding.Mesh with axes ('data', 'model') "
                     f"(kivi_jax.make_mesh), got {mesh!r}")
  data, model = mesh.shape[DATA], mesh.shape[MODEL]
  for name in ("num_kv_heads", "num_heads", "intermediate_size"):
    value = getattr(model_config, name)
    if value % model:
      raise ValueError(f"the model's {name}={value} does not split over the mesh's "
                       f"model axis of {model} devices: pick a model axis dividing it")
  if kv_config is not None and kv_config.channel_group is not None and model > 1:
    raise ValueError(
        f"an SKVQ cache (channel_group={kv_config.channel_group}) orders the channels of "
        f"all kv heads together, so it cannot split heads over the model axis of {model} "
        f"devices: use a mesh with model=1 (rows over data only)")
  if batch is not None and batch % data:
    raise ValueError(f"the batch of {batch} rows does not split over the mesh's data axis "
                     f"of {data} devices: pad it to a multiple of {data} rows")


def param_specs(params):
  """The `PartitionSpec` of every parameter (module docstring)."""
  return {
      name: (tuple({k: layer_param_spec(k) for k in layer} for layer in value)
             if name == "layers" else P())
      for name, value in params.items()}


def shard_params(params, mesh: Mesh):
  """`params` placed on `mesh` as `param_specs` says (no copy where they already are)."""
  specs = param_specs(params)
  return jax.device_put(params, jax.tree.map(lambda s: NamedSharding(mesh, s), specs))


def layer_specs(layer):
  """The `PartitionSpec` of every array of one layer's cache (a `LayerKV`):
  per-row arrays `[B, Hkv, ...]` by rows and heads, SKVQ's channel maps whole."""
  rows = lambda tree: jax.tree.map(lambda _: P(DATA, MODEL), tree)  # noqa: E731
  whole = lambda tree: jax.tree.map(lambda _: P(), tree)  # noqa: E731
  return layer.replace(k=rows(layer.k), v=rows(layer.v), ring_k=P(DATA, MODEL),
                       ring_v=P(DATA, MODEL), sink_k=rows(layer.sink_k),
                       sink_v=rows(layer.sink_v), k_map=whole(layer.k_map),
                       v_map=whole(layer.v_map))


def cache_specs(cache):
  """The `PartitionSpec` of every array of a `KVCache` (or of its abstract
  shapes): each layer's as `layer_specs`, the lengths by rows."""
  return cache.replace(layers=tuple(map(layer_specs, cache.layers)), lengths=P(DATA))


def shard_layer_attention(fn, mesh: Mesh, layer):
  """`fn(q, k_cache, v_cache, k_rot, v, layer, lengths, n_new, rope_inv_freq) ->
  (attn, layer)` (`kivi_jax.models.llama`) run per shard of `mesh`: queries
  `[B, T, Hq, Dh]`, new keys and values `[B, Hkv, T, Dh]` and `[B, T, Hkv, Dh]`,
  the layer's cache and the lengths each by rows and heads, as they lie."""
  specs = layer_specs(layer)
  heads = P(DATA, None, MODEL, None)
  cache_heads = P(DATA, MODEL, None, None)
  return jax.shard_map(
      fn, mesh=mesh,
      in_specs=(heads, cache_heads, cache_heads, heads, heads, specs, P(DATA), P(DATA), P()),
      out_specs=(heads, specs),
      # Pallas calls carry no varying-axes types to check.
      check_vma=False)


def shard_model(model, mesh: Mesh):
  """A `kivi_jax.Model` whose parameters are split over `mesh` (`param_specs`).
  Do it once: `generate(..., mesh=mesh)` then finds them in place."""
  check_mesh(mesh, model.config)
  return dataclasses.replace(model, params=shard_params(model.params, mesh))
