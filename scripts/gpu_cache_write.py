"""On the GPU: a cache write (decode-step flush, prefill) with the quantize-and-pack
kernel against the jnp reference's scatter, in the same run.

P1's shapes (B=8, Hkv=8, d=128, bf16). The flush: one decode step whose new token
makes every row quantize one group (the layer donated, as `generate` donates
it); the step: one whose new token completes no group (31 of 32 steps). The
prefill: `append` of L tokens into an empty layer. Each call takes the previous
call's layer, so the donated buffers are reused in place. Writes JSON with
device, jax version, date and commit.
"""

import argparse
import datetime
import json
import os
import statistics
import time

import jax
import jax.numpy as jnp

from kivi_jax import bench
from kivi_jax.cache import append
from kivi_jax.config import PRESETS

B, HKV, D = 8, 8, 128


def chained_ms(fn, layer, args, calls=20, repeats=15):
  """Median ms per call of `layer = fn(layer, *args)`, after warm-up."""
  for _ in range(3):
    layer = fn(layer, *args)
  jax.block_until_ready(layer)
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    for _ in range(calls):
      layer = fn(layer, *args)
    jax.block_until_ready(layer)
    times.append((time.perf_counter() - t0) / calls * 1e3)
  return statistics.median(times)


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--out", required=True)
  args = parser.parse_args()
  rows = []
  write = jax.jit(append, static_argnames=("config", "impl"), donate_argnums=0)
  key = jax.random.key(0)
  for method in ("kivi2", "kivi4"):
    config = PRESETS[method]
    for length in (32768, 131072):
      # (length - R) a multiple of G: the next token makes each row flush a group.
      layer, lens = bench._kivi_layer(key, config, B, HKV, length, D, jnp.bfloat16,
                                      "reference")
      new = jax.random.normal(key, (B, HKV, 1, D), jnp.bfloat16)
      # One more cached token: the next one completes no group (no flush).
      for op, at in (("flush", lens), ("step", lens + 1)):
        for impl in ("gpu", "reference"):
          ms = chained_ms(lambda lay, *a, impl=impl: write(lay, *a, config, impl),
                          jax.tree.map(jnp.copy, layer), (new, new, at, jnp.ones_like(at)))
          rows.append(dict(op=op, method=method, L=length, impl=impl, ms=ms))
          print(rows[-1], flush=True)
      del layer
    for length in (4096, 32768):
      # A layer of the right capacity; writing over its tokens costs the same.
      layer, _ = bench._kivi_layer(key, config, B, HKV, length, D, jnp.bfloat16,
                                   "reference")
      x = jax.random.normal(key, (B, HKV, length, D), jnp.bfloat16)
      zeros = jnp.zeros((B,), jnp.int32)
      for impl in ("gpu", "reference"):
        ms = chained_ms(lambda lay, *a, impl=impl: write(lay, *a, config, impl),
                        jax.tree.map(jnp.copy, layer),
                        (x, x, zeros, jnp.full((B,), length, jnp.int32)), calls=5)
        rows.append(dict(op="prefill", method=method, L=length, impl=impl, ms=ms))
        print(rows[-1], flush=True)
  out = dict(device=jax.devices()[0].device_kind, jax=jax.__version__,
             date=datetime.date.today().isoformat(),
             commit=os.environ.get("KIVI_JAX_COMMIT", "unknown"), B=B, Hkv=HKV, d=D,
             dtype="bfloat16", rows=rows)
  with open(args.out, "w") as f:
    json.dump(out, f, indent=1)


if __name__ == "__main__":
  main()
