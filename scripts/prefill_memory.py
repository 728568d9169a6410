"""On the GPU, compiled and not run: the temporaries of `generate`'s prefill
against `kivi_jax.memory`'s estimate of them.

Each spec `shape:method:prompt:batch:rows[:mlp_tokens]` compiles `generate`'s
prefill of `batch` prompts in chunks of `rows` (random bf16 weights as shapes,
512 new tokens, the default layout; one chunk with its empty cache donated, as
`generate` runs it), `llama.MLP_TOKENS` set to `mlp_tokens` if given, and
records XLA's one allocation of temporaries (`memory_analysis().temp_size_in_bytes`,
what a prefill that runs out of memory asks for), that plus the empty chunk
cache the prefill starts from, the estimate `rows x prefill_bytes_per_row +
FIXED_WORKSPACE` and its activations' term alone (`activation_bytes_per_row`). Writes
JSON with device, jax version, date and commit
(`benchmarks/results/prefill_memory_h200.json`).

  python scripts/prefill_memory.py --out F llama2-7b:kivi2:1024:562:8 ...
"""

import argparse
import datetime
import json
import os

import jax
import jax.numpy as jnp

from kivi_jax import memory
from kivi_jax.bench_generate import SHAPES, fit_window, random_model
from kivi_jax.cache import init_cache
from kivi_jax.config import get_preset
from kivi_jax.generate import _prefill, _prefill_over_empty
from kivi_jax.models import llama

NEW_TOKENS = 512
DEFAULT_MLP_TOKENS = llama.MLP_TOKENS


def measure(spec: str) -> dict:
  shape, method, prompt, batch, rows, *mlp_tokens = spec.split(":")
  prompt, batch, rows = int(prompt), int(batch), int(rows)
  llama.MLP_TOKENS = int(mlp_tokens[0]) if mlp_tokens else DEFAULT_MLP_TOKENS
  jax.clear_caches()  # the jitted functions read it when traced
  length, width = memory.generate_lengths(prompt, NEW_TOKENS, 1 << 30)
  config, _ = fit_window(SHAPES[shape], length)
  params = jax.eval_shape(lambda: random_model(config).params)
  kv = get_preset(method)
  empty = jax.eval_shape(lambda: init_cache(config, kv, rows, length))
  ids = jax.ShapeDtypeStruct((batch, width), jnp.int32)
  prefill = _prefill_over_empty if rows >= batch else _prefill
  temp = prefill.lower(params, ids, ids, empty, config=config).compile().memory_analysis(
  ).temp_size_in_bytes
  per_row = memory.prefill_bytes_per_row(config, kv, width, length, True)
  return {"shape": shape, "method": method, "prompt": prompt, "new": NEW_TOKENS,
          "batch": batch, "prefill_rows": rows, "mlp_tokens": llama.MLP_TOKENS,
          "temp_bytes": int(temp),
          "temp_and_input_cache_bytes": int(temp + memory._bytes(empty)),
          "estimate_bytes": int(rows * per_row + memory.FIXED_WORKSPACE),
          "activations_estimate_bytes": rows * memory.activation_bytes_per_row(
              config, width, True, memory.jnp_quantized_tensors(config, kv, True))}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("specs", nargs="+", help="shape:method:prompt:batch:rows[:mlp_tokens]")
  parser.add_argument("--out", required=True)
  args = parser.parse_args()
  rows = []
  for spec in args.specs:
    rows.append(measure(spec))
    print(json.dumps(rows[-1]), flush=True)
  with open(args.out, "w") as f:
    json.dump({"device": jax.devices()[0].device_kind, "jax": jax.__version__,
               "date": datetime.date.today().isoformat(),
               "commit": os.environ.get("KIVI_JAX_COMMIT", "unknown"), "rows": rows}, f, indent=1)


if __name__ == "__main__":
  main()
