"""Summaries of Nsight Compute SASS dumps (`ncu --page source --print-source sass --csv`,
gzipped): executed warp instructions by opcode, the loop body's length, stall reasons.

  python benchmarks/sass_summary.py benchmarks/results/sass/*.csv.gz
"""
import collections
import csv
import gzip
import re
import sys


def summary(path, top=16):
  lines = gzip.open(path, "rt").readlines()
  start = next(i for i, line in enumerate(lines) if line.startswith('"Address"'))
  rows = list(csv.reader(lines[start:]))
  head = {h: i for i, h in enumerate(rows[0])}
  rows = [r for r in rows[1:] if len(r) == len(rows[0])]
  count = lambda r, col: float(r[head[col]].replace(",", "") or 0)  # noqa: E731
  ops, stalls = collections.Counter(), collections.Counter()
  stall_cols = [h for h in head if h.startswith("stall_") and "Not Issued" not in h]
  for r in rows:
    op = re.sub(r"^@!?U?P\w+\s+", "", r[head["Source"]].strip()).split(" ")[0]
    ops[op] += count(r, "Instructions Executed")
    for c in stall_cols:
      stalls[c] += count(r, c)
  total = sum(ops.values())
  per_line = collections.Counter(n for n in (count(r, "Instructions Executed") for r in rows)
                                 if n > 0)
  hot, body = per_line.most_common(1)[0]
  out = [f"== {path}", f"executed warp instructions: {total / 1e6:.1f} M; the hottest "
         f"{body} SASS lines run {hot:.0f} times each"]
  out += [f"  {op:28s} {n / 1e6:7.2f} M {100 * n / total:5.1f}%" for op, n in ops.most_common(top)]
  n_stall = sum(stalls.values())
  out.append("  stalls: " + ", ".join(f"{c[6:]} {100 * v / n_stall:.0f}%"
                                      for c, v in stalls.most_common(6)))
  return "\n".join(out)


if __name__ == "__main__":
  print("\n\n".join(summary(p) for p in sys.argv[1:]))
