"""Plot of committed decode-attention results (PROTOCOLS.md P1): the whole decode
attention's time against the cache's length at P1's shape (B=8, 32 query heads over
8 kv heads, d=128), and each method's speed-up over cuDNN's bf16 attention in the
same process at every shape run, the serving shapes (B=32 and B=256, 32 heads over
32, 1536 tokens) beside P1's, one GPU a series. Reads files laid out as
`attention_twokernels_h200.json` (a `p1` run and a list of `serving` runs, each with
its device, date and commit).

  pip install -e ".[plot]"
  python scripts/plot_attention.py   # reads attention_twokernels_h200.json and
                                     # attention_twokernels_h100.json, writes attention.png
"""

from __future__ import annotations

import itertools
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import FormatStrFormatter  # noqa: E402

RESULTS = Path(__file__).resolve().parent.parent / "benchmarks" / "results"
METHODS = {"bf16": "cuDNN bf16", "kivi4": "KIVI-4", "kivi2": "KIVI-2"}
# Issue 17's targets at P1 on an H200: KIVI-2 3x cuDNN bf16, KIVI-4 2x.
TARGETS = {"kivi2": 3.0, "kivi4": 2.0}


def runs(name: str) -> list[dict]:
  data = json.loads((RESULTS / f"{name}.json").read_text())
  return [data["p1"], *data["serving"]]


def shape_label(row: dict) -> str:
  length = f"{row['L'] // 1024}k" if row["L"] % 1024 == 0 and row["L"] >= 4096 else row["L"]
  return f"B={row['B']} {row['Hq']}/{row['Hkv']}\nL={length}"


def main(names: list[str]) -> None:
  fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.2),
                                    gridspec_kw={"width_ratios": [1, 1.6]})
  shapes: list[str] = []
  bars = {}  # (device, method) -> {shape: speed-up}, in the files' order
  titles = []
  for style, name in zip(itertools.cycle(("-", "--", ":", "-.")), names):
    for run in runs(name):
      device = run["device"].replace("NVIDIA ", "").split()[0]
      if (device, run["date"], run["commit"]) not in titles:
        titles.append((device, run["date"], run["commit"]))
      p1 = [r for r in run["rows"] if (r["B"], r["Hq"], r["Hkv"]) == (8, 32, 8)]
      for i, (method, label) in enumerate(METHODS.items()):
        points = sorted((r["L"], r["ms"]) for r in p1 if r["method"] == method)
        if points:
          x, y = zip(*points)
          left.plot(x, y, style, marker="o", color=f"C{i}", label=f"{label}, {device}")
      for r in run["rows"]:
        if r["method"] == "bf16":
          continue
        shape = shape_label(r)
        if shape not in shapes:
          shapes.append(shape)
        bars.setdefault((device, r["method"]), {})[shape] = r["speedup"]
  left.set_xscale("log", base=2)
  left.set_yscale("log")
  ticks = sorted({line_x for line in left.get_lines() for line_x in line.get_xdata()})
  left.set_xticks(ticks, [f"{t // 1024}k" for t in ticks])
  for axis in (left.yaxis.set_major_formatter, left.yaxis.set_minor_formatter):
    axis(FormatStrFormatter("%.1f"))
  left.set_xlabel("cached tokens L (B=8, 32 query heads over 8 kv heads, d=128)")
  left.set_ylabel("decode attention, median ms")
  left.grid(alpha=0.3, which="both")
  left.legend(fontsize=7)

  width = 0.8 / len(bars)
  devices = list(dict.fromkeys(device for device, _ in bars))
  order = sorted(bars, key=lambda k: (devices.index(k[0]), -list(METHODS).index(k[1])))
  for j, (device, method) in enumerate(order):
    speedups = bars[device, method]
    xs = [k + (j - (len(bars) - 1) / 2) * width for k, s in enumerate(shapes) if s in speedups]
    ys = [speedups[s] for s in shapes if s in speedups]
    color = f"C{list(METHODS).index(method)}"
    hatch = "//" * devices.index(device)  # the first file's GPU solid
    right.bar(xs, ys, width, color=color, hatch=hatch, edgecolor="white",
              label=f"{METHODS[method]}, {device}")
    for x, y in zip(xs, ys):
      right.annotate(f"{y:.2f}", (x, y), textcoords="offset points", xytext=(0, 2),
                     ha="center", fontsize=6)
  right.axhline(1.0, color="gray", lw=1)
  for method, target in TARGETS.items():
    right.axhline(target, color=f"C{list(METHODS).index(method)}", ls=":", lw=1)
    right.text(len(shapes) - 0.5, target, f"issue 17: {METHODS[method]} {target:g}x at P1",
               ha="right", va="bottom", fontsize=7, color=f"C{list(METHODS).index(method)}")
  right.set_xticks(range(len(shapes)), shapes, fontsize=7)
  right.set_ylabel("speed-up over cuDNN bf16 (same process)")
  right.set_ylim(0, 1.25 * right.get_ylim()[1])
  right.grid(alpha=0.3, axis="y")
  right.legend(fontsize=7, loc="upper left", ncol=len(devices))
  fig.suptitle("KIVI decode attention (pair layout, Mosaic GPU) against cuDNN bf16; "
               + "; ".join(f"{d} {date} {c}" for d, date, c in titles), fontsize=9)
  fig.tight_layout()
  out = RESULTS / "attention.png"
  fig.savefig(out, dpi=130)
  print(f"wrote {out}")


if __name__ == "__main__":
  main(sys.argv[1:] or ["attention_twokernels_h200", "attention_twokernels_h100"])
