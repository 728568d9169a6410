"""The prototype on a GPU: compiled checks, then times beside main's kernel and cuDNN.

  python benchmarks/int8_prototype/bench.py               # checks, then every config
  python benchmarks/int8_prototype/bench.py ncu MODE S W   # three launches at 32k, for ncu
  python benchmarks/int8_prototype/bench.py warps          # checks with 8 warps

(from the repository root, PYTHONPATH=$PWD, KIVI_JAX_COMMIT=<commit> on the GPU
machine).

JSON to $OUT/int8_decode.json. P1's shape: B=8, Hq=32, Hkv=8, d=128, bf16, KIVI-2 with
group 32, 128 tokens in the ring (not read here), random codes. Times are the block
kernel alone (per-split partials, no merge; main's kernel with its 16 padded query
rows), `kivi_jax.bench._time` (median of 30 batches of 10 calls after warm-up);
cuDNN is the whole bf16 attention over L tokens, in the same run.
"""
import itertools
import json
import os
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import kernel  # noqa: E402
import prototype_inputs  # noqa: E402
import reference  # noqa: E402
from kivi_jax.bench import _time  # noqa: E402
from kivi_jax.cli import run_metadata  # noqa: E402
from kivi_jax.pallas_kernels import decode_attention as da  # noqa: E402

B, K, HQ = 8, 8, 32
CAPACITY = {32768: 33280, 131072: 131584}  # bench._kivi_layer's block capacity
CONFIGS = {"splits": (16, 32, 64), "num_warps": (4, 8), "num_stages": (2, 3)}


def main():
  if sys.argv[1:2] == ["ncu"]:
    mode, splits, warps = sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    pargs = reference.prototype_args(reference.make(B, K, CAPACITY[32768]), [32640] * B, mode)
    for _ in range(3):
      jax.block_until_ready(kernel.partials(*pargs, splits=splits, mode=mode, num_warps=warps))
    return
  if sys.argv[1:2] == ["warps"]:
    for mode, asm in itertools.product(("int8", "bf16"), (True, False)):
      print(mode, asm, reference.check(mode, asm, False, num_warps=8), flush=True)
    return
  res = {**run_metadata(), "checks": {},
         "cudnn_ms": {}, "main_ms": {}, "runs": []}
  for mode, asm in itertools.product(("int8", "bf16"), (True, False)):
    res["checks"][f"{mode}_asm{int(asm)}"] = c = reference.check(mode, asm, False)
    print(mode, asm, c, flush=True)
  for L, C in CAPACITY.items():
    x = reference.make(B, K, C)
    n_valid = [L - 128] * B
    res["cudnn_ms"][L], res["main_ms"][L], want = prototype_inputs.baselines(
        x, n_valid, L, HQ)
    print(L, "cudnn", res["cudnn_ms"][L], "main", res["main_ms"][L], flush=True)
    for mode in ("int8", "bf16"):
      pargs = reference.prototype_args(x, n_valid, mode)
      for asm, *cfg in [(False, 32, 4, 2), *itertools.product((True,), *CONFIGS.values())]:
        opts = dict(zip(CONFIGS, cfg), mode=mode, asm=asm)
        f = jax.jit(lambda *a, opts=opts: kernel.partials(*a, **opts))
        got = da.merge_partials(*f(*pargs))[0]
        row = {"L": L, **opts, "ms": _time(f, [pargs], 30),
               "err_vs_main": float(jnp.max(jnp.abs(got - want)) / jnp.max(jnp.abs(want)))}
        res["runs"].append(row)
        print(row, flush=True)
      del pargs
  out = os.path.join(os.environ.get("OUT", "/tmp"), "int8_decode.json")
  json.dump(res, open(out, "w"), indent=1)


if __name__ == "__main__":
  main()
