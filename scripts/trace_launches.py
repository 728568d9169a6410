"""Per-launch device time (us) of chosen kernels in `kivi-jax bench generate`'s
step rows: the traces their `profile_dir` names (on the machine that ran them),
each kernel's launches' count, min, median, max and sum, and its four longest.
What a per-step total hides, for instance a writer that does nothing at most
steps and all its work at the steps that flush a group.

  python scripts/trace_launches.py ROWS.json 'kivi_ring_update|kivi_quantize'
"""

import json
import re
import statistics
import sys

from kivi_jax.bench_generate import device_kernels


def main(rows_json: str, pattern: str) -> None:
  for row in json.load(open(rows_json))["rows"]:
    if not row.get("profile_dir"):
      continue
    if "error" in row:  # e.g. timed out: no step time, maybe no trace
      print(row["method"], row["batch"], row.get("commit"), row["error"])
      continue
    print(row["method"], row["batch"], row.get("commit"), row["step_ms"])
    found: dict[str, list[float]] = {}
    for e in device_kernels(row["profile_dir"]):
      if re.search(pattern, e["name"]):
        found.setdefault(e["name"], []).append(e.get("dur", 0))
    for name, us in sorted(found.items()):
      us = sorted(us)
      print(f"  {name[:40]:40s} n={len(us)} min={us[0]:.1f} med={statistics.median(us):.1f} "
            f"max={us[-1]:.1f} sum={sum(us) / 1e3:.2f}ms top={us[-4:]}")


if __name__ == "__main__":
  main(*sys.argv[1:3])
