"""Where `generate`'s prefill spends its time: `_prefill` of `batch` random
prompts (random bf16 weights as shapes, `generate`'s chunks of rows), timed
(median of three after the compiling call) and traced once with
`jax.profiler`, its device time summed by kind of kernel (`kivi-jax bench
generate`'s kinds) with the costliest kernels and their JAX operations. The
model's work per prompt token (`prefill_flops`) over the time gives TFLOPS.
Writes JSON with device, jax version, date and commit
(`benchmarks/results/prefill_profile_h200.json`). `--mlp-tokens` sets
`llama.MLP_TOKENS`, the tokens a layer's MLP block takes at once.

  python scripts/profile_prefill.py --out F --shape llama2-7b --batch 64 fp16 kivi2
"""

import argparse
import datetime
import json
import os
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp

from kivi_jax.bench_generate import (SHAPES, _calibration, _prompt, fit_window, random_model,
                                     summarize_trace)
from kivi_jax.cache import init_cache
from kivi_jax.config import get_preset
from kivi_jax.generate import _prefill, prefill_chunk_rows
from kivi_jax.models import llama
from kivi_jax.models.config import ModelConfig


def prefill_flops(config: ModelConfig, prompt: int) -> float:
  """Multiply-adds x 2 of a causal prefill a prompt token, on average over a
  `prompt`-token prompt: the layers' projections and MLP, and the scores and
  the values' sum over the token's (prompt + 1) / 2 positions. The embedding is
  a lookup and the logits are the last position's only: neither counted."""
  h, d = config.hidden_size, config.head_dim
  qkvo = h * d * (2 * config.num_heads + 2 * config.num_kv_heads)
  mlp = 3 * h * config.intermediate_size
  attention = 2 * config.num_heads * d * (prompt + 1) / 2
  return 2 * config.num_layers * (qkvo + mlp + attention)


def measure(model, method: str, batch: int, prompt: int, new: int) -> dict:
  kv = get_preset(method)
  length = prompt + new
  ids = jnp.asarray(_prompt(batch, prompt, model.config.vocab_size))
  rows = prefill_chunk_rows(model, kv, batch, prompt, length, "auto")
  empty = init_cache(model.config, kv, rows, length, calibration=_calibration(model, kv))
  args = (model.params, ids, jnp.ones_like(ids), empty)
  times = []
  for _ in range(4):  # the first compiles
    t0 = time.perf_counter()
    jax.block_until_ready(_prefill(*args, config=model.config)[0])
    times.append(time.perf_counter() - t0)
  seconds = statistics.median(times[1:])
  hlo = _prefill.lower(*args, config=model.config).compile().as_text()
  trace_dir = tempfile.mkdtemp()
  with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
    jax.block_until_ready(_prefill(*args, config=model.config)[0])
  profile = summarize_trace(trace_dir, 1, hlo)
  flops = batch * prompt * prefill_flops(model.config, prompt)
  return {"method": method, "batch": batch, "prompt": prompt, "prefill_rows": rows,
          "prefill_s": seconds, "tflops": flops / seconds / 1e12,
          "device_ms": profile.pop("device_ms_per_step"),
          "by_kind_ms": profile["by_kind_ms"], "top_kernels": profile["top_kernels"]}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("methods", nargs="+")
  parser.add_argument("--shape", default="llama2-7b", choices=sorted(SHAPES))
  parser.add_argument("--batch", type=int, default=64)
  parser.add_argument("--prompt", type=int, default=1024)
  parser.add_argument("--new", type=int, default=512)
  parser.add_argument("--mlp-tokens", type=int, default=llama.MLP_TOKENS)
  parser.add_argument("--out", required=True)
  args = parser.parse_args()
  llama.MLP_TOKENS = args.mlp_tokens
  config, widened = fit_window(SHAPES[args.shape], args.prompt + args.new)
  model = random_model(config)
  rows = []
  for method in args.methods:
    rows.append(measure(model, method, args.batch, args.prompt, args.new))
    row = rows[-1]
    print(f"{method}: {row['prefill_s']:.3f} s, {row['tflops']:.0f} TFLOPS, "
          f"{row['prefill_rows']} rows a chunk; device ms by kind "
          f"{json.dumps({k: round(v, 1) for k, v in row['by_kind_ms'].items()})}", flush=True)
  with open(args.out, "w") as f:
    json.dump({"device": jax.devices()[0].device_kind, "jax": jax.__version__,
               "date": datetime.date.today().isoformat(), "shape": args.shape, **widened,
               "mlp_tokens": args.mlp_tokens,
               "commit": os.environ.get("KIVI_JAX_COMMIT", "unknown"), "rows": rows}, f, indent=1)


if __name__ == "__main__":
  main()
