"""PROTOCOLS.md P1: one decode step of attention, cache methods against cuDNN bf16.

Each method runs the attention of a decode step as `generate` runs it, after the
new token's append (for KIVI: the kernel over the packed block, the ring, the
flushed group and the new token, the merge);
the baseline is `jax.nn.dot_product_attention(implementation="cudnn")` on a bf16
cache of the same shape with distinct K and V arrays, in the same run. Times
are medians over `repeats` timed batches of calls after warm-up; inputs rotate
over enough copies that a batch never fits in L2.
"""

from __future__ import annotations

import functools
import statistics
import time
import types

import jax
import jax.numpy as jnp

from kivi_jax.attention import decode_attention
from kivi_jax.cache import (LAYOUTS, LayerKV, append, append_flushing, init_cache,
                            n_quantized)
from kivi_jax.checks import positive_int
from kivi_jax.config import KIVIConfig, get_preset

_L2_DODGE_BYTES = 512 * 2**20
_CALLS_PER_BATCH = 10


def _time(fn, inputs, repeats: int) -> float:
  """Median milliseconds per call of `fn` over rotating `inputs`."""
  for x in inputs:  # compile and warm up
    jax.block_until_ready(fn(*x))
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    out = None
    for i in range(_CALLS_PER_BATCH):
      out = fn(*inputs[i % len(inputs)])
    jax.block_until_ready(out)
    times.append((time.perf_counter() - t0) / _CALLS_PER_BATCH * 1e3)
  return statistics.median(times)


def copy_bandwidth_tbps(gib: float = 1.0, repeats: int = 30) -> float:
  """HBM bandwidth of an elementwise read + write over `gib` GiB, in TB/s."""
  n = int(gib * 2**30) // 4
  x = jax.random.normal(jax.random.key(0), (n,), jnp.float32)
  ms = _time(jax.jit(lambda a: a * 1.5 + 1.0), [(x,)], repeats)
  return 2 * n * 4 / (ms * 1e-3) / 1e12


def _copies(nbytes: int) -> int:
  return int(min(8, max(1, -(-_L2_DODGE_BYTES // max(nbytes, 1)))))


def _kivi_layer(rng, config: KIVIConfig, b, hkv, length, d, dtype, impl="gpu",
                layout="slots"):
  """A cache layer holding `length` random tokens per row, filled by one prefill
  `append` (as `generate` fills it), its blocks in `layout`."""
  shape = types.SimpleNamespace(num_layers=1, num_kv_heads=hkv, head_dim=d, dtype=dtype)
  layer = init_cache(shape, config, b, length + 1, impl=impl, layout=layout).layers[0]
  k = jax.random.normal(rng, (b, hkv, length, d), dtype)
  v = jax.random.normal(jax.random.fold_in(rng, 1), (b, hkv, length, d), dtype)
  lengths = jnp.full((b,), length, jnp.int32)
  fill = jax.jit(append, static_argnames=("config", "impl"), donate_argnums=0)
  return fill(layer, k, v, jnp.zeros_like(lengths), lengths, config, impl), lengths


def _kivi_bytes(layer: LayerKV, config: KIVIConfig, length: int, hkv: int, b: int,
                d: int) -> int:
  """Bytes a decode step must read: the live part of the block, the ring, q."""
  nq = int(n_quantized(jnp.array([length]), config)[0])
  per_token = (d * (config.k_bits + config.v_bits) / 8
               + 2 * layer.k.scale.dtype.itemsize * d / config.group_size * 2)
  ring = 2 * config.ring_size * d * layer.ring_k.dtype.itemsize
  return int(b * hkv * (nq * per_token + ring))


def attention_step(key, config: KIVIConfig, layer: LayerKV, lens, q_heads: int, impl: str,
                   copies: int = 1):
  """The decode attention `attention_benchmark` times, jitted, and `copies`
  inputs for it: each a query `[B, 1, q_heads, D]` and `layer` with a new
  token appended beforehand (the writes have their own benchmark,
  scripts/gpu_cache_write.py: the step's attention alone)."""
  b, kv_heads, _, d = layer.ring_k.shape
  dtype = layer.ring_k.dtype
  appended = jax.jit(append_flushing, static_argnames=("config", "impl"))
  inputs = []
  for c in range(copies):
    ks = jax.random.split(jax.random.fold_in(key, 100 + c), 3)
    new = [jax.random.normal(k, (b, kv_heads, 1, d), dtype) for k in ks[1:]]
    inputs.append((jax.random.normal(ks[0], (b, 1, q_heads, d), dtype),
                   *appended(layer, *new, lens, jnp.ones_like(lens), config, impl), lens))
  step = jax.jit(lambda q, lay, flushed, ln: decode_attention(
      q, lay, flushed, ln, jnp.ones_like(ln), config, None, impl))
  return step, inputs


def attention_benchmark(lengths=(4096, 16384, 32768, 65536, 131072), batch: int = 8,
                        q_heads: int = 32, kv_heads: int = 8, head_dim: int = 128,
                        methods=("kivi4", "kivi2"), repeats: int = 30, impl: str = "gpu",
                        layouts=("auto",), progress=print) -> dict:
  """Runs P1; returns `{"copy_tbps", "rows": [...]}` (rows as in the issue), each
  method once per cache `layout` (`init_cache`'s; a row names the one "auto" took)."""
  batch, q_heads, kv_heads, head_dim, repeats = (
      positive_int(name, value) for name, value in (
          ("batch", batch), ("q_heads", q_heads), ("kv_heads", kv_heads),
          ("head_dim", head_dim), ("repeats", repeats)))
  configs = {m: get_preset(m) for m in methods}  # an unknown name is refused by name
  if q_heads % kv_heads:
    raise ValueError(f"q_heads={q_heads} must be a multiple of kv_heads={kv_heads}")
  if not lengths or not all(isinstance(n, int) and n > 1 for n in lengths):
    raise ValueError(f"lengths must be integers above 1, got {tuple(lengths)}")
  for layout in layouts:
    if layout not in ("auto", *LAYOUTS):
      raise ValueError(f"layouts must be among {('auto', *LAYOUTS)}, got {layout!r}")
  if jax.default_backend() != "gpu":
    raise RuntimeError("the attention benchmark times the GPU kernels against cuDNN: jax's "
                       f"backend here is {jax.default_backend()!r}")
  dtype = jnp.bfloat16
  copy_tbps = copy_bandwidth_tbps()
  progress(f"copy bandwidth {copy_tbps:.2f} TB/s")
  rows = []
  key = jax.random.key(0)
  for length in lengths:
    kv_bytes = 2 * batch * length * kv_heads * head_dim * 2
    n = _copies(kv_bytes)
    base_inputs = []
    for c in range(n):
      ks = jax.random.split(jax.random.fold_in(key, c), 3)
      base_inputs.append((
          jax.random.normal(ks[0], (batch, 1, q_heads, head_dim), dtype),
          jax.random.normal(ks[1], (batch, length, kv_heads, head_dim), dtype),
          jax.random.normal(ks[2], (batch, length, kv_heads, head_dim), dtype)))
    cudnn = jax.jit(functools.partial(jax.nn.dot_product_attention, implementation="cudnn"))
    base_ms = _time(cudnn, base_inputs, repeats)
    del base_inputs
    rows.append(dict(method="bf16", B=batch, Hq=q_heads, Hkv=kv_heads, d=head_dim,
                     L=length, ms=base_ms, baseline_ms=base_ms, speedup=1.0,
                     tbps=kv_bytes / (base_ms * 1e-3) / 1e12))
    progress(f"L={length} bf16 cudnn {base_ms:.3f} ms")
    for method, layout in ((m, ly) for m in methods for ly in layouts):
      config = configs[method]
      layer, lens = _kivi_layer(key, config, batch, kv_heads, length - 1, head_dim, dtype,
                                impl, layout)
      nbytes = _kivi_bytes(layer, config, length - 1, kv_heads, batch, head_dim)
      step, inputs = attention_step(key, config, layer, lens, q_heads, impl, _copies(nbytes))
      ms = _time(step, inputs, repeats)
      rows.append(dict(method=method, layout=layer.layout, B=batch, Hq=q_heads, Hkv=kv_heads,
                       d=head_dim, L=length, ms=ms, baseline_ms=base_ms,
                       speedup=base_ms / ms, tbps=nbytes / (ms * 1e-3) / 1e12))
      progress(f"L={length} {method} {layer.layout} {ms:.3f} ms ({base_ms / ms:.2f}x, "
               f"{nbytes / (ms * 1e-3) / 1e12:.2f} TB/s)")
      del inputs, layer
  return {"copy_tbps": copy_tbps, "rows": rows}


def markdown_table(result: dict) -> str:
  lines = ["| method | layout | B | Hq/Hkv | L | ms | cuDNN bf16 ms | speed-up | TB/s "
           "| % of copy |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
  for r in result["rows"]:
    lines.append(f"| {r['method']} | {r.get('layout', '')} | {r['B']} | {r['Hq']}/{r['Hkv']} "
                 f"| {r['L']} | {r['ms']:.3f} | {r['baseline_ms']:.3f} | "
                 f"{r['speedup']:.2f}x | {r['tbps']:.2f} | "
                 f"{100 * r['tbps'] / result['copy_tbps']:.0f}% |")
  return "\n".join(lines)
