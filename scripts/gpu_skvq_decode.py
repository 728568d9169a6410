"""On the GPU: one SKVQ decode step with the hidden-layout kernels against the jnp
reference, beside KIVI-2's kernel and cuDNN bf16 on the same heads, in one run.

The step is `cache_attention` as `generate` runs it (the block, the sinks, the
ring and the new token). Shapes: SmolLM2-135M's heads (B=8, Hq=9, Hkv=3, d=64:
192 hidden channels), Mistral-7B's (B=4, Hq=32, Hkv=8, d=128: 1024) and
Llama-2-7B's (B=1, Hq=32, Hkv=32, d=128: 4096), bf16, random values. SKVQ is
skvq-k2v2-g16-fp8's layout with its channels in order and a fixed clip (no
calibration: speed depends on neither), its arrays random (`random_layer`).
Times are medians after warm-up (`kivi_jax.bench`). Writes JSON with device, jax
version, date and commit.
"""

import argparse
import dataclasses
import datetime
import functools
import json
import os
import types

import jax
import jax.numpy as jnp

from kivi_jax import bench
from kivi_jax.attention import cache_attention
from kivi_jax.cache import init_cache
from kivi_jax.config import PRESETS

SHAPES = {"smollm2-135m": (8, 9, 3, 64), "mistral-7b": (4, 32, 8, 128),
          "llama-2-7b": (1, 32, 32, 128)}
LENGTHS = (4096, 32768)
SKVQ = dataclasses.replace(PRESETS["skvq-k2v2-g16-fp8"], reorder=False, clip=0.9)


def random_layer(key, config, b, hkv, length, d, dtype):
  """A cache layer holding `length` tokens per row, every array random (codes,
  scales, zeros, ring, sinks) but the channel maps: speed does not depend on
  the values. (It was written when `append`'s quantization over hidden groups
  ran the H100 out of memory at Mistral-7B's width, fixed since: NOTES.md.)"""
  shape = types.SimpleNamespace(num_layers=1, num_kv_heads=hkv, head_dim=d, dtype=dtype)
  layer = init_cache(shape, config, b, length + 1).layers[0]
  leaves, tree = jax.tree.flatten(layer.replace(k_map=None, v_map=None))
  out = []
  for i, x in enumerate(leaves):
    k = jax.random.fold_in(key, i)
    if x.dtype == jnp.uint32:
      out.append(jax.random.bits(k, x.shape, jnp.uint32))
    else:
      out.append((jax.random.uniform(k, x.shape) * 0.1).astype(x.dtype))
  layer = jax.tree.unflatten(tree, out).replace(k_map=layer.k_map, v_map=layer.v_map)
  return layer, jnp.full((b,), length, jnp.int32)


def step_ms(config, impl, b, hq, hkv, d, length, key):
  """Median ms of one decode step over a layer holding `length` tokens per row."""
  dtype = jnp.bfloat16
  layer, lens = random_layer(key, config, b, hkv, length - 1, d, dtype)
  inv_freq = (1.0 / 10000.0 ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d)
              if config.pre_rope else None)
  step = jax.jit(lambda q, lay, kn, vn, ln: cache_attention(
      q, lay, kn, vn, ln, jnp.ones_like(ln), config, None, impl, inv_freq))
  inputs = []
  for c in range(4):
    ks = jax.random.split(jax.random.fold_in(key, c), 3)
    inputs.append((jax.random.normal(ks[0], (b, 1, hq, d), dtype),
                   jax.tree.map(lambda x, c=c: x if c == 0 else x + 0, layer),
                   jax.random.normal(ks[1], (b, hkv, 1, d), dtype),
                   jax.random.normal(ks[2], (b, hkv, 1, d), dtype), lens))
  return bench._time(step, inputs, repeats=20)


def cudnn_ms(b, hq, hkv, d, length, key):
  ks = jax.random.split(key, 3)
  inputs = [(jax.random.normal(ks[0], (b, 1, hq, d), jnp.bfloat16),
             jax.random.normal(ks[1], (b, length, hkv, d), jnp.bfloat16),
             jax.random.normal(ks[2], (b, length, hkv, d), jnp.bfloat16))]
  fn = jax.jit(functools.partial(jax.nn.dot_product_attention, implementation="cudnn"))
  return bench._time(fn, inputs, repeats=20)


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--out", required=True)
  args = parser.parse_args()
  key = jax.random.key(0)
  rows = []
  for shape, (b, hq, hkv, d) in SHAPES.items():
    for length in LENGTHS:
      dims = dict(shape=shape, B=b, Hq=hq, Hkv=hkv, d=d, L=length)
      runs = [("bf16", "cudnn", lambda: cudnn_ms(b, hq, hkv, d, length, key))]
      runs += [(name, impl, functools.partial(step_ms, config, impl, b, hq, hkv, d, length,
                                              key))
               for name, config, impl in (("skvq-k2v2-g16-fp8", SKVQ, "gpu"),
                                          ("skvq-k2v2-g16-fp8", SKVQ, "reference"),
                                          ("kivi2", PRESETS["kivi2"], "gpu"))]
      for method, impl, run in runs:
        ms = run()
        rows.append(dict(method=method, impl=impl, **dims, ms=ms))
        print(f"{shape} L={length} {method} {impl}: {ms:.3f} ms", flush=True)
  result = dict(device=jax.devices()[0].device_kind, jax=jax.__version__,
                date=datetime.date.today().isoformat(),
                commit=os.environ.get("KIVI_JAX_COMMIT", "unknown"),
                skvq_config=dataclasses.asdict(SKVQ), rows=rows)
  with open(args.out, "w") as f:
    json.dump(result, f, indent=1)


if __name__ == "__main__":
  main()
