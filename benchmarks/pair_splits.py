"""Whole decode attention at P1's shape with default_splits' target at 256 / 384 / 512 programs."""
import json, sys
import jax
from kivi_jax import bench
from kivi_jax.cli import run_metadata
from pallas_kernels import decode_attention_pairs as dp
out = {**run_metadata(), "runs": []}
for target in (256, 384, 512, 256):
  dp.default_splits.__defaults__ = (target,)
  jax.clear_caches()
  rows = bench.attention_benchmark(lengths=(32768, 131072), methods=("kivi2", "kivi4"), repeats=20,
                                   progress=lambda *a: None)["rows"]
  out["runs"].append({"target_programs": target, "rows": rows})
  print(target, [(r["method"], r["L"], round(r["ms"], 4), round(r["speedup"], 2)) for r in rows], flush=True)
  json.dump(out, open(sys.argv[1], "w"), indent=1)
