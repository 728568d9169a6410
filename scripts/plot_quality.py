"""Plots of the committed quality results: KV-perplexity against bits per element
(the PROTOCOLS.md Q1 anchors beside ours, SKVQ's presets from the quick-setting
ablation and preset runs) and passkey accuracy against length.

  pip install -e ".[plot]"
  python scripts/plot_quality.py   # reads and writes benchmarks/results/
"""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

RESULTS = Path(__file__).resolve().parent.parent / "benchmarks" / "results"

# PROTOCOLS.md Q1 anchors (HF transformers 5.23 on CPU, quick setting), with
# bits per element counted like ours: 16-bit scale and zero per group of 64.
ANCHORS = [
    ("HF DynamicCache", 16.0, 16.82),
    ("quanto 4-bit, KIVI axes", 4.5, 17.05),
    ("quanto 4-bit, default axes", 4.5, 17.34),
    ("quanto 2-bit, KIVI axes", 2.5, 25.25),
    ("quanto 2-bit, default axes", 2.5, 147.17),
]


def _label(ax, text, x, y, placed, color="black", left=False):
  """Annotates (x, y) beside the point; labels of points at the same x, taken in
  increasing y, are pushed up to stay 6% apart (the y axis is logarithmic)."""
  y_text = max([y] + [py * 1.06 for px, py in placed if abs(px - x) < 1e-9])
  placed.append((x, y_text))
  ax.annotate(text, (x, y), xytext=(x / 1.05 if left else x * 1.05, y_text), fontsize=7,
              color=color, va="center", ha="right" if left else "left")


def skvq_quick_rows() -> list[dict]:
  """SKVQ presets in the quick setting: the last ablation step of each group
  size (every component on: the `skvq-k2v2` preset, or `-g32`) and the runs of
  the other presets."""
  rows = []
  for g, suffix in ((128, ""), (32, "-g32")):
    path = RESULTS / f"skvq_ablation_g{g}_smollm2.json"
    if path.exists():
      rows.append({**json.loads(path.read_text())["rows"][-1],
                   "method": f"skvq-k2v2{suffix}"})
  for path in sorted(RESULTS.glob("kv_ppl_quick_skvq_*_smollm2.json")):
    rows += json.loads(path.read_text())["rows"]
  return rows


def plot_kv_ppl(ax):
  placed, placed_left = [], []
  for setting, marker in (("quick", "o"), ("full", "s")):
    path = RESULTS / f"kv_ppl_{setting}_smollm2.json"
    if not path.exists():
      continue
    rows = json.loads(path.read_text())["rows"]
    x = [16.0 if r["k_bits"] == 16 else r["bits_per_element"] for r in rows]
    y = [r["kv_ppl"] for r in rows]
    ax.scatter(x, y, marker=marker, label=f"kivi-jax, {setting} setting", zorder=3)
    if setting == "quick":
      for r, xi, yi in sorted(zip(rows, x, y), key=lambda t: t[2]):
        _label(ax, r["method"], xi, yi, placed)
  # SKVQ's points crowd 2-3 bits: a legend entry each instead of labels.
  markers = "DPX*v^<>"
  for i, r in enumerate(sorted(skvq_quick_rows(), key=lambda r: r["kv_ppl"])):
    ax.scatter([r["bits_per_element"]], [r["kv_ppl"]], marker=markers[i % len(markers)],
               s=50, color=plt.cm.Greens(0.9 - 0.08 * i), edgecolors="black", linewidths=0.4,
               label=f"{r['method']} (quick)", zorder=4)
  ax.scatter([a[1] for a in ANCHORS], [a[2] for a in ANCHORS], marker="x", color="gray",
             label="HF anchors (quick)", zorder=2)
  for name, xi, yi in sorted(ANCHORS, key=lambda a: a[2]):
    _label(ax, name, xi, yi, placed_left, color="gray", left=True)
  ax.set_xscale("log", base=2)
  ax.set_yscale("log")
  ax.set_xticks([2, 3, 4, 5, 8, 16], labels=["2", "3", "4", "5", "8", "16"])
  ax.set_yticks([15, 20, 30, 50, 100, 150], labels=["15", "20", "30", "50", "100", "150"])
  ax.minorticks_off()
  ax.set_xlim(1.3, 24)
  ax.set_xlabel("bits per cached element (scales and zeros at their stored width)")
  ax.set_ylabel("KV-perplexity (WikiText-2)")
  ax.set_title("SmolLM2-135M-Instruct: KV-perplexity against cache bits")
  ax.grid(True, which="both", alpha=0.3)
  ax.legend(fontsize=7, ncol=2)


def plot_passkey(ax):
  for method in ("fp16", "kivi4", "kivi2", "skvq-k2v2-g32", "skvq-k2v1.5-g32",
                 "skvq-k2v2-g16-fp8", "skvq-k2v1.5-g16-fp8"):
    path = RESULTS / f"passkey_smollm2_{method}.json"
    if not path.exists():
      continue
    rows = json.loads(path.read_text())["rows"]
    lengths = sorted({r["length"] for r in rows})
    acc = [sum(r["accuracy"] for r in rows if r["length"] == n)
           / sum(1 for r in rows if r["length"] == n) for n in lengths]
    ax.plot(lengths, acc, marker="o", label="fp (unquantized)" if method == "fp16" else method)
  ax.set_xscale("log", base=2)
  ax.set_xticks(lengths, labels=[str(n) for n in lengths])
  ax.minorticks_off()
  ax.set_ylim(0, 1.05)
  ax.set_xlabel("context length (tokens)")
  ax.set_ylabel("passkey accuracy (all depths)")
  ax.set_title("SmolLM2-135M-Instruct: passkey retrieval")
  ax.grid(True, alpha=0.3)
  ax.legend(fontsize=8)


def main():
  for name, plot in (("kv_ppl_vs_bits_smollm2.png", plot_kv_ppl),
                     ("passkey_smollm2.png", plot_passkey)):
    fig, ax = plt.subplots(figsize=(8, 5))
    plot(ax)
    fig.tight_layout()
    fig.savefig(RESULTS / name, dpi=120)
    plt.close(fig)
    print(f"wrote {RESULTS / name}")


if __name__ == "__main__":
  main()
