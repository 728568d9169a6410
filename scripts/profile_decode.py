"""One decode-kernel launch over a KIVI block at P1's shape (B=8, Hq=32, Hkv=8,
d=128), for `ncu` (benchmarks/NOTES.md): run as `ncu --launch-skip 2 --launch-count 1
python scripts/profile_decode.py --length 32768` (the slot layout's Triton kernel), or
with `--layout pairs -k regex:mosaic` for the Hopper kernel (a Hopper GPU only).
`--rows` is the query rows a kv head (4 at P1's GQA). With one row (`folds`) each
call launches two kernels, the scores then the values: `--launch-skip 4` and `5`."""

import argparse

import jax
import jax.numpy as jnp

from kivi_jax import bench
from kivi_jax.config import PRESETS
from kivi_jax.pallas_kernels import decode_attention as da
from kivi_jax.pallas_kernels import decode_attention_pairs as dp

parser = argparse.ArgumentParser()
parser.add_argument("--length", type=int, default=32768)
parser.add_argument("--method", default="kivi2")
parser.add_argument("--layout", choices=("slots", "pairs"), default="slots")
parser.add_argument("--rows", type=int, default=16)
args = parser.parse_args()
config = PRESETS[args.method]
layer, lens = bench._kivi_layer(jax.random.key(0), config, 8, 8, args.length, 128,
                                jnp.bfloat16, layout=args.layout)
q = jax.random.normal(jax.random.key(1), (8, 8, args.rows, 128), jnp.bfloat16)
nq = lens - config.residual_length
kernel = dp.pair_decode_partials if args.layout == "pairs" else da.quantized_decode_partials
for _ in range(3):  # compile and warm up; ncu skips these launches
  jax.block_until_ready(kernel(
      q, layer.k.codes, layer.k.scale, layer.k.zero, layer.v.codes, layer.v.scale,
      layer.v.zero, nq, jnp.zeros_like(nq), k_bits=config.k_bits, v_bits=config.v_bits,
      group_size=config.group_size))
