"""The prototype on a GPU: compiled checks, then times beside main's kernel and cuDNN.

  python benchmarks/magic_prototype/bench.py             # checks, then every config
  python benchmarks/magic_prototype/bench.py ncu S W G   # three launches at 32k, for ncu

(from the repository root, PYTHONPATH=$PWD, KIVI_JAX_COMMIT=<commit> on the GPU
machine; JSON to $OUT/magic_decode.json). P1's shape: B=8, Hq=32, Hkv=8, d=128, bf16,
KIVI-2 with group 32, 128 tokens in the ring (not read here), random codes, main's
cache layout. Times are the block kernel alone
(per-split partials, no merge; main's kernel with its 16 padded query rows),
`kivi_jax.bench._time` (median of 30 batches of 10 calls after warm-up); cuDNN is the
whole bf16 attention over L tokens, in the same run.
"""
import itertools
import json
import os
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import check  # noqa: E402
import kernel  # noqa: E402
import prototype_inputs  # noqa: E402
from kivi_jax.bench import _time  # noqa: E402
from kivi_jax.cli import run_metadata  # noqa: E402
from kivi_jax.pallas_kernels import decode_attention as da  # noqa: E402

B, K, HQ = 8, 8, 32
CAPACITY = {32768: 33280, 131072: 131584}  # bench._kivi_layer's block capacity
CONFIGS = {"splits": (32, 64), "num_warps": (2, 4), "num_stages": (2, 3)}


def main():
  if sys.argv[1:2] == ["ncu"]:
    splits, warps, stages = map(int, sys.argv[2:5])
    args = check.prototype_args(check.make(B, K, CAPACITY[32768]), [32640] * B)
    for _ in range(3):
      jax.block_until_ready(kernel.partials(*args, splits=splits, num_warps=warps,
                                            num_stages=stages))
    return
  res = {**run_metadata(), "checks": {},
         "cudnn_ms": {}, "main_ms": {}, "runs": []}
  for asm, warps in itertools.product((True, False), (4, 8)):
    res["checks"][f"asm{int(asm)}_w{warps}"] = c = check.check(asm, False, num_warps=warps)
    print(asm, warps, c, flush=True)
  for L, C in CAPACITY.items():
    x = check.make(B, K, C)
    n_valid = [L - 128] * B
    res["cudnn_ms"][L], res["main_ms"][L], want = prototype_inputs.baselines(
        x, n_valid, L, HQ)
    print(L, "cudnn", res["cudnn_ms"][L], "main", res["main_ms"][L], flush=True)
    pargs = check.prototype_args(x, n_valid)
    for asm, *cfg in [(False, 32, 2, 3), *itertools.product((True,), *CONFIGS.values())]:
      opts = dict(zip(CONFIGS, cfg), asm=asm)
      f = jax.jit(lambda *a, opts=opts: kernel.partials(*a, **opts))
      got = da.merge_partials(*f(*pargs))[0]
      row = {"L": L, **opts, "ms": _time(f, [pargs], 30),
             "err_vs_main": float(jnp.max(jnp.abs(got - want)) / jnp.max(jnp.abs(want)))}
      res["runs"].append(row)
      print(row, flush=True)
    del pargs
  out = os.path.join(os.environ.get("OUT", "/tmp"), "magic_decode.json")
  json.dump(res, open(out, "w"), indent=1)


if __name__ == "__main__":
  main()
