"""Where the whole decode attention's device time goes: `kivi-jax bench
attention`'s step (the block's kernel, the ring's, the merge and the glue
around them) at P1's shapes and the serving shapes, traced (`jax.profiler`, 20 calls
queued back to back), each kernel's device time a call
(`bench_generate.summarize_trace`); beside it the call's time as `bench
attention` measures it (calls queued, the median of 30 batches), so that the
gaps between the two show in one process (XLA_FLAGS set around the script
apply to both). A GPU only; the pair layout.

  python scripts/trace_attention.py OUT.json [--methods kivi2,kivi4] [--shapes 4]
"""

import argparse
import tempfile

import jax
import jax.numpy as jnp

from kivi_jax import bench
from kivi_jax.bench_generate import summarize_trace
from kivi_jax.cli import _write_json, run_metadata
from kivi_jax.config import get_preset

# (B, Hq, Hkv, L): P1 at 32k and 128k, Llama-2-7B serving at B=32 and 256.
SHAPES = ((8, 32, 8, 32768), (8, 32, 8, 131072), (32, 32, 32, 1536), (256, 32, 32, 1536))
CALLS = 20


def trace_shape(method: str, b: int, hq: int, hkv: int, length: int, d: int = 128) -> dict:
  """The trace's summary of `method`'s decode attention for `b` rows of
  `length` tokens, `hq` query heads over `hkv` kv heads."""
  config = get_preset(method)
  key = jax.random.key(0)
  layer, lens = bench._kivi_layer(key, config, b, hkv, length - 1, d, jnp.bfloat16, "gpu",
                                  "pairs")
  nbytes = bench._kivi_bytes(layer, config, length - 1, hkv, b, d)
  step, inputs = bench.attention_step(key, config, layer, lens, hq, "gpu",
                                      bench._copies(nbytes))
  queued_ms = bench._time(step, inputs, 30)
  args = inputs[0]
  log_dir = tempfile.mkdtemp()
  with jax.profiler.trace(log_dir, create_perfetto_trace=True):
    for _ in range(CALLS):
      out = step(*args)
    jax.block_until_ready(out)
  summary = summarize_trace(log_dir, CALLS, step.lower(*args).compile().as_text())
  return {"ms": queued_ms, **summary}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("out")
  parser.add_argument("--methods", default="kivi2,kivi4")
  parser.add_argument("--shapes", type=int, default=len(SHAPES),
                      help="the first N of P1 32k, P1 128k, B=32 and B=256 at 1536")
  args = parser.parse_args()
  if not 1 <= args.shapes <= len(SHAPES):
    parser.error(f"--shapes takes 1 to {len(SHAPES)}, got {args.shapes}")
  if jax.default_backend() != "gpu":
    parser.error(f"the trace is of the GPU kernels: jax's backend here is "
                 f"{jax.default_backend()!r}")
  result = {}
  for method in args.methods.split(","):
    for b, hq, hkv, length in SHAPES[:args.shapes]:
      name = f"{method} B={b} {hq}/{hkv} L={length}"
      row = result[name] = trace_shape(method, b, hq, hkv, length)
      print(f"== {name}: {row['ms']:.3f} ms a call queued, {row['device_ms_per_step']:.3f} "
            f"ms of device time")
      for k in row["top_kernels"]:
        print(f"  {1e3 * k['ms_per_step']:8.1f} us x{k['launches_per_step']:.0f}  "
              f"{k['name'][:60]}  {k['op'][:70]}", flush=True)
  _write_json(args.out, {**run_metadata(), "rows": result})


if __name__ == "__main__":
  main()
