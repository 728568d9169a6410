"""Plot of the committed end-to-end results (PROTOCOLS.md P2): for each request
(prompt + new tokens), tokens/s against batch for each cache method and HF
transformers, and peak memory beside it. Where a method ran a batch more than
once (at several commits), the file's last row is plotted, and of its largest
batches (each plan's) only the last; rows of the pair layout (Hopper's default
since 2026-12-03) are a series of their own.

  pip install -e ".[plot]"
  python scripts/plot_generate.py   # reads generate_h200.json, writes generate_h200.png
                                    # (Llama-2-7B), generate_h200_llama3-8b.png and
                                    # generate_h200_longest.png

The last: P2's longest context a batch of one decoded, each method's longest
row of each shape (kind `longest`), with its peak and the commit that planned
and ran it, and as an outline the prompt `kivi_jax.max_context` plans today
where no row ran it (`bench_generate.longest_plan` at the file's allocator limit).
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from kivi_jax.bench_generate import longest_plan  # noqa: E402

RESULTS = Path(__file__).resolve().parent.parent / "benchmarks" / "results"


def main(name: str = "generate_h200", shape: str = "llama2-7b",
         requests: tuple[tuple[int, int], ...] = ((1024, 512), (4096, 512))) -> None:
  data = json.loads((RESULTS / f"{name}.json").read_text())
  fig, axes = plt.subplots(len(requests), 2, figsize=(10, 3.8 * len(requests)), squeeze=False)
  limit = data["bytes_limit"] / 2**30
  dates = set()
  colors = {}  # one color per system across the requests
  for request, (ax, mem) in zip(requests, axes):
    series = defaultdict(dict)
    largest = {}  # label -> the batch of its last largest-batch row
    for row in data["rows"]:
      if (row.get("shape") != shape or row["kind"] not in ("generate", "hf")
          or (row["prompt"], row["new"]) != request or "error" in row):
        continue
      label = ("HF transformers eager, bf16" if row["kind"] == "hf"
               else f"kivi-jax {row['method']}"
               + (" (pair layout)" if row.get("layout") == "pairs" else ""))
      series[label][row["batch"]] = (row["tokens_per_s"], row["peak_bytes"] / 2**30,
                                     row["date"], bool(row.get("predicted_largest")))
      if row.get("predicted_largest"):
        largest[label] = row["batch"]
    for label, points in series.items():
      # The largest batch as the last plan ran it: an earlier plan's largest
      # batch, run with the kernels of its day, is not a point of today's curve.
      for batch in [b for b, p in points.items() if p[3] and b != largest[label]]:
        del points[batch]
      dates.update(p[2] for p in points.values())
    for i, (label, points) in enumerate(sorted(series.items())):
      batch = sorted(points)
      tps, gib, *_ = zip(*(points[b] for b in batch))
      color = colors.setdefault(label, f"C{len(colors)}")
      ax.plot(batch, tps, "o-", label=label, color=color)
      mem.plot(batch, gib, "o-", label=label, color=color)
      best = batch[tps.index(max(tps))]
      for b, t in zip(batch, tps):
        # Labelled: the best, the largest batch, and points with no other of
        # the series within 15% of their batch (the rest would overlap).
        if b not in (best, batch[-1]) and any(o != b and 1 / 1.15 < o / b < 1.15 for o in batch):
          continue
        # Staggered by series: systems of similar tokens/s sit close; a largest
        # batch near its series' best goes below it.
        below = b == batch[-1] != best and batch[-1] / best < 1.15
        ax.annotate(f"{t:.0f} ({b})", (b, t), textcoords="offset points",
                    xytext=(4, (4, -8, -20, 16)[i % 4] - 10 * below), fontsize=7,
                    color=color)
    ax.set_title(f"prompt {request[0]} + {request[1]} new tokens", fontsize=9)
    ax.set_xlabel("batch (rows)")
    ax.set_ylabel("tokens/s (prefill included)")
    ax.set_ylim(0, 1.15 * ax.get_ylim()[1])
    mem.set_xlabel("batch (rows)")
    mem.set_ylabel("peak device memory (GiB)")
    mem.axhline(limit, color="gray", ls=":", lw=1)
    mem.text(0.02, limit, "allocator limit", transform=mem.get_yaxis_transform(), fontsize=7,
             color="gray", va="bottom")
    mem.set_ylim(0, 1.1 * limit)
    for a in (ax, mem):
      a.set_xscale("log", base=2)
      a.margins(x=0.2)
      a.grid(alpha=0.3)
    ax.legend(fontsize=8)
  fig.suptitle(f"{shape} shapes (random bf16 weights), {data['device']}, jax {data['jax']}, "
               f"{min(dates)} to {max(dates)}", fontsize=9)
  fig.tight_layout()
  out = RESULTS / (f"{name}.png" if shape == "llama2-7b" else f"{name}_{shape}.png")
  fig.savefig(out, dpi=130)
  print(f"wrote {out}")


def longest(name: str = "generate_h200") -> None:
  data = json.loads((RESULTS / f"{name}.json").read_text())
  best = {}  # (shape, method) -> the longest row
  for row in data["rows"]:
    if row["kind"] == "longest" and "peak_bytes" in row and not row.get("mesh"):
      key = row["shape"], row["method"]
      if key not in best or row["prompt"] > best[key]["prompt"]:
        best[key] = row
  shapes = sorted({shape for shape, _ in best})
  methods = ["fp16", "kivi4", "kivi2"]
  fig, axes = plt.subplots(1, len(shapes), figsize=(5 * len(shapes), 3.8), squeeze=False)
  for ax, shape in zip(axes[0], shapes):
    for i, method in enumerate(methods):
      row = best.get((shape, method))
      plan = longest_plan(shape, method, 512, data["bytes_limit"],
                          "slots" if method == "fp16" else "pairs")
      if row is None or plan > row["prompt"]:  # today's plan, as an outline
        ax.bar(i, plan / 1e3, fill=False, edgecolor=f"C{i}", linestyle="--")
        ax.annotate(f"planned today\n{plan:,}, not run", (i, plan / 1e3),
                    textcoords="offset points", xytext=(0, 3), ha="center", fontsize=7,
                    color="gray")
      if row is None:
        continue
      ax.bar(i, row["prompt"] / 1e3, color=f"C{i}")
      # Inside the bar, below its top: a plan's outline may end just above it.
      ax.annotate(f"{row['prompt']:,} tokens\npeak {row['peak_bytes'] / 2**30:.1f} GiB\n"
                  f"{row['commit']}", (i, row["prompt"] / 1e3), textcoords="offset points",
                  xytext=(0, -3), ha="center", va="top", fontsize=7, color="white")
    ax.set_xticks(range(len(methods)), [f"kivi-jax {m}" for m in methods], fontsize=8)
    ax.set_ylabel("longest prompt (thousand tokens)")
    ax.set_title(f"{shape} shapes, 512 new tokens, batch 1", fontsize=9)
    ax.set_ylim(0, 1.3 * ax.get_ylim()[1])
    ax.grid(axis="y", alpha=0.3)
  dates = sorted({row["date"] for row in best.values()})
  when = dates[0] if len(dates) == 1 else f"{dates[0]} to {dates[-1]}"
  fig.suptitle(f"the longest context generate decoded (random bf16 weights), {data['device']}, "
               f"jax {data['jax']}, {when}; "
               f"allocator limit {data['bytes_limit'] / 2**30:.1f} GiB", fontsize=9)
  fig.tight_layout()
  out = RESULTS / f"{name}_longest.png"
  fig.savefig(out, dpi=130)
  print(f"wrote {out}")


if __name__ == "__main__":
  main()
  main(shape="llama3-8b", requests=((1024, 512),))
  longest()
