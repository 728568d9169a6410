"""What running `kivi-jax generate` again costs: the README's first command on
the default model, run several times in fresh processes that share one
compilation cache, empty before the first. Each run timed whole (start-up,
loading the model and its tokenizer, compiling or reading back, generating).

  python scripts/cli_rerun_time.py --out benchmarks/results/cli_rerun_cpu.json
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

from kivi_jax.cli import _write_json, run_metadata
from kivi_jax.default_model import default_model_path

QUESTION = "What is the capital of France?"


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--runs", type=int, default=3)
  parser.add_argument("--new-tokens", type=int, default=32)
  parser.add_argument("--out", help="write the rows as JSON here")
  args = parser.parse_args()
  path = default_model_path()
  rows = []
  with tempfile.TemporaryDirectory() as cache:
    env = {**os.environ, "JAX_COMPILATION_CACHE_DIR": cache}
    for run in range(1, args.runs + 1):
      start = time.perf_counter()
      done = subprocess.run(
          [sys.executable, "-m", "kivi_jax.cli", "generate", QUESTION, "--model", str(path),
           "--max-new-tokens", str(args.new_tokens)],
          env=env, capture_output=True, text=True, check=True)
      rows.append({"run": run, "seconds": time.perf_counter() - start,
                   "answer": done.stdout.strip()})
      print(rows[-1], flush=True)
  if args.out:
    _write_json(args.out, {**run_metadata(), "model": "SmolLM2-135M-Instruct",
                           "question": QUESTION, "new_tokens": args.new_tokens,
                           "rows": rows})


if __name__ == "__main__":
  main()
