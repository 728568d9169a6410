"""What each new question costs `generate` in one process: SmolLM2 (the default
model), questions of different lengths one after another, each call timed whole
(compiling included). Before prompts were padded to `memory.BUCKET` tokens a
new prompt length compiled the prefill again (and, for the fp16 cache, the
decode loop).

  python scripts/question_compile_time.py --out benchmarks/results/question_compile_cpu.json
"""

from __future__ import annotations

import argparse
import time

import numpy as np

import kivi_jax
from kivi_jax.cli import _write_json, run_metadata
from kivi_jax.default_model import default_model_path

QUESTIONS = ("What is the capital of France?",
             "Which planet in our solar system is known as the red planet?",
             "In one short sentence: what does a kilogram measure, and what is the metric "
             "unit of length?")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--methods", default="fp16,kivi2")
  parser.add_argument("--new-tokens", type=int, default=16)
  parser.add_argument("--out", help="write the rows as JSON here")
  args = parser.parse_args()
  path = default_model_path()
  model, tokenizer = kivi_jax.load_model(path), kivi_jax.load_tokenizer(path)
  rows = []
  for method in args.methods.split(","):
    kv = kivi_jax.get_preset(method)
    for question in QUESTIONS:
      ids = np.asarray([tokenizer.encode(question)])
      start = time.perf_counter()
      np.asarray(kivi_jax.generate(model, ids, kv_config=kv, max_new_tokens=args.new_tokens))
      rows.append({"method": method, "prompt_tokens": int(ids.shape[1]),
                   "seconds": time.perf_counter() - start})
      print(rows[-1], flush=True)
  if args.out:
    _write_json(args.out, {**run_metadata(), "model": "SmolLM2-135M-Instruct",
                           "new_tokens": args.new_tokens, "rows": rows})


if __name__ == "__main__":
  main()
