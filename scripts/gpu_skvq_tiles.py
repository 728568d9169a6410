"""On the GPU: the SKVQ hidden-layout kernels alone over their tile settings.

Times `decode_attention_hidden.hidden_decode_attention` (scores kernel, jnp
softmax, values kernel) for channels per tile (`tile`), tiles per values
program (`value_tiles`) and warps, on the block of skvq-k2v2-g16-fp8's layout
(2-bit keys and values, fp8 scales, groups of 16 channels, keys before RoPE) at
32k tokens: Mistral-7B's width (B=4, Hq=32, 1024 channels) and Llama-2-7B's
(B=1, Hq=32, 4096 channels), bf16, random values (`gpu_skvq_decode.random_layer`).
Medians after warm-up (`kivi_jax.bench`). Writes JSON with device, jax version,
date and commit.
"""

import argparse
import datetime
import functools
import json
import os
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(__file__))
from gpu_skvq_decode import SKVQ, random_layer  # noqa: E402

from kivi_jax import bench  # noqa: E402
from kivi_jax.cache import n_quantized  # noqa: E402
from kivi_jax.pallas_kernels import decode_attention_hidden as gpu_hidden  # noqa: E402

SHAPES = {"mistral-7b": (4, 32, 8, 128), "llama-2-7b": (1, 32, 32, 128)}
LENGTH = 32768
TILES = (16, 32, 64)
VALUE_TILES = (1, 2, 4, 8)
WARPS = (2, 4)


def kernels_ms(layer, lens, b, hq, hidden, key, **settings):
  """Median ms of the two kernels over the block for `hq` query rows."""
  m_rows = max(16, 1 << (hq - 1).bit_length())
  ks = jax.random.split(key, 2)
  q, q_rot = (jax.random.normal(k, (b, 1, m_rows, hidden), jnp.bfloat16) for k in ks)
  theta = jnp.linspace(1e-4, 1.0, hidden, dtype=jnp.float32)
  blocks = (layer.k.codes, layer.k.scale, layer.k.zero, layer.v.codes, layer.v.scale,
            layer.v.zero)
  nq = n_quantized(lens, SKVQ)
  fn = jax.jit(functools.partial(
      gpu_hidden.hidden_decode_attention, k_bits=SKVQ.k_bits, v_bits=SKVQ.v_bits,
      group_size=SKVQ.group_size, sm_scale=0.1, pos_offset=SKVQ.sinks, **settings))
  args = (q, *blocks, nq, jnp.zeros_like(nq), layer.k_map.groups, layer.v_map.groups, q_rot,
          theta)
  return bench._time(fn, [args], repeats=20)


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--out", required=True)
  args = parser.parse_args()
  key = jax.random.key(0)
  rows = []
  for shape, (b, hq, hkv, d) in SHAPES.items():
    layer, lens = random_layer(key, SKVQ, b, hkv, LENGTH, d, jnp.bfloat16)
    n_tiles = {t: hkv * d // t for t in TILES}
    for tile in TILES:
      for value_tiles in (v for v in VALUE_TILES if n_tiles[tile] % v == 0):
        for warps in WARPS:
          ms = kernels_ms(layer, lens, b, hq, hkv * d, key, tile=tile,
                          value_tiles=value_tiles, num_warps=warps)
          rows.append(dict(shape=shape, B=b, Hq=hq, hidden=hkv * d, L=LENGTH, tile=tile,
                           value_tiles=value_tiles, num_warps=warps, ms=ms))
          print(f"{shape} tile={tile} value_tiles={value_tiles} warps={warps}: "
                f"{ms:.3f} ms", flush=True)
  result = dict(device=jax.devices()[0].device_kind, jax=jax.__version__,
                date=datetime.date.today().isoformat(),
                commit=os.environ.get("KIVI_JAX_COMMIT", "unknown"), rows=rows)
  with open(args.out, "w") as f:
    json.dump(result, f, indent=1)


if __name__ == "__main__":
  main()
