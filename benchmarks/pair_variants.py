"""Experiment (branch exp/pair-regs): the pair kernel with fewer registers and less
shared memory a block, for a third block an SM.

Variants: `step` (tokens a TMA stage brings: 512, or 256 for half the shared
memory), `v_halves` (V^T P^T in two products of 64 channels, so that half the
dequantized V^T tile is live at once) and `per_update` (tokens a softmax update
takes: 256, or 128 for half the live scores). Each variant's partials are checked
against the default's on one input, then the whole decode attention is timed
by `kivi_jax.bench.attention_benchmark` (cuDNN bf16 in the same run).

  python benchmarks/pair_variants.py OUT.json            # check and time
  python benchmarks/pair_variants.py --ring OUT.json     # the ring kernel's tilings
  ncu --metrics launch__registers_per_thread,launch__occupancy_limit_registers,\
launch__occupancy_limit_shared_mem -k regex:mosaic python benchmarks/pair_variants.py --once

The device plan for this branch (two calls; SmolLM2's first 10 layers carried as
`.devrun/model/SmolLM2-135M-Instruct.Q4_1.gguf` by `scripts/gguf_first_layers.py`,
54 MB, with `KIVI_JAX_CACHE=.devrun/model`):
  1. compiled checks: `pytest -n 4 tests/test_decode_pairs.py tests/test_quantize_pack.py
     -k "pair or float64 or decode_step"` (the 64-wide cases among them), then
     `pytest tests/test_smollm2.py -k pair_kernel`; ncu's registers as above.
  2. `python benchmarks/pair_variants.py OUT.json`, then `--ring OUT2.json`.
"""

import functools
import json
import sys

import jax
import jax.numpy as jnp
import numpy as np

from kivi_jax import bench
from kivi_jax.cli import run_metadata
from kivi_jax.pallas_kernels import decode_attention as da
from kivi_jax.pallas_kernels import decode_attention_pairs as dp
from kivi_jax.pallas_kernels import decode_attention_ring as ring

VARIANTS = [dict(step=None, v_halves=False, per_update=256),  # the default
            dict(step=None, v_halves=True, per_update=256),  # step None: 512 (256 at 8 bits)
            dict(step=256, v_halves=False, per_update=256),
            dict(step=256, v_halves=True, per_update=256),
            dict(step=256, v_halves=True, per_update=128)]
DEFAULT = dp.pair_decode_partials


def _inputs(b, kh, rows, cap, kb, vb, g, d=dp.HEAD_DIM, seed=0):
  """Random words, scales and zeros (any bits are codes), one live length a row."""
  rng = np.random.default_rng(seed)
  cg = min(g, d)
  words = lambda *s: jnp.asarray(rng.integers(0, 2**32, s, dtype=np.uint64), jnp.uint32)  # noqa: E731
  bf = lambda x: jnp.asarray(x, jnp.bfloat16)  # noqa: E731
  return (bf(rng.standard_normal((b, kh, rows, d))),
          words(b, kh, cap, d * kb // 32), bf(rng.uniform(0.01, 0.1, (b, kh, cap // g, d))),
          bf(rng.standard_normal((b, kh, cap // g, d))),
          words(b, kh, d, cap * vb // 32), bf(rng.uniform(0.01, 0.1, (b, kh, d // cg, cap))),
          bf(rng.standard_normal((b, kh, d // cg, cap))),
          jnp.asarray(rng.integers(cap // 2, cap + 1, b), jnp.int32), jnp.zeros(b, jnp.int32))


def check(variant) -> float:
  """Largest difference of the merged output from the default's, over its largest value."""
  worst = 0.0
  for b, kh, rows, cap, kb, vb, g, d in [
      (3, 2, 4, 4096, 2, 2, 32, 128), (3, 2, 1, 2048, 4, 4, 32, 128),
      (2, 2, 16, 2048, 2, 4, 128, 128), (2, 2, 8, 2048, 8, 8, 16, 128),
      (3, 2, 3, 2048, 2, 2, 16, 64)]:
    x = _inputs(b, kh, rows, cap, kb, vb, g, d)
    kw = dict(k_bits=kb, v_bits=vb, group_size=g)
    want = np.asarray(da.merge_partials(*DEFAULT(*x, **kw))[0])
    got = np.asarray(da.merge_partials(*DEFAULT(*x, **kw, **variant))[0])
    worst = max(worst, float(np.abs(got - want).max() / np.abs(want).max()))
  return worst


def main(out: str) -> None:
  result = {**run_metadata(), "runs": []}
  for variant in VARIANTS:
    err = check(variant)
    dp.pair_decode_partials = functools.partial(DEFAULT, **variant)
    rows = bench.attention_benchmark(lengths=(32768, 131072), methods=("kivi2", "kivi4"),
                                     repeats=20)["rows"]
    rows += bench.attention_benchmark(lengths=(1536,), batch=32, q_heads=32, kv_heads=32,
                                      methods=("kivi2",), repeats=20)["rows"]
    rows += bench.attention_benchmark(lengths=(1536,), batch=256, q_heads=32, kv_heads=32,
                                      methods=("kivi2",), repeats=20)["rows"]
    dp.pair_decode_partials = DEFAULT
    result["runs"].append({**variant, "max_rel_diff_from_default": err, "rows": rows})
    with open(out, "w") as f:
      json.dump(result, f, indent=1)


def ring_tilings(out: str) -> None:
  """The whole decode attention at Llama-3-8B's serving shapes (GQA 4, 1280
  tokens) with the ring kernel's tilings for several query rows: (tokens,
  warps) a program. At batch 128 the ring's 128 bf16 tokens are a third of
  the bytes and its kernel took 1.09 ms of a 10.13 ms step (2026-12-04)."""
  result = {**run_metadata(), "runs": []}
  default = ring.ROWS_TILING
  for tiling in [(32, 4), (64, 4), (128, 4), (128, 8), (16, 2)]:
    ring.ROWS_TILING = tiling
    jax.clear_caches()  # ring_partials reads the tiling when traced
    rows = []
    for batch in (32, 128):
      rows += bench.attention_benchmark(lengths=(1280,), batch=batch, methods=("kivi2",),
                                        repeats=20)["rows"]
    result["runs"].append({"rows_tiling": tiling, "rows": rows})
    with open(out, "w") as f:
      json.dump(result, f, indent=1)
  ring.ROWS_TILING = default


def once() -> None:
  """Each variant's kernel launched once at P1's 32k shape (for ncu)."""
  x = _inputs(8, 8, 4, 32768, 2, 2, 32)
  for variant in VARIANTS:
    jax.block_until_ready(DEFAULT(*x, k_bits=2, v_bits=2, group_size=32, **variant))


if __name__ == "__main__":
  if sys.argv[1] == "--once":
    once()
  elif sys.argv[1] == "--ring":
    ring_tilings(sys.argv[2])
  else:
    main(sys.argv[1])
