"""SKVQ one component at a time: KV-perplexity as each is added.

Starting from plain per-token 2-bit quantization of keys and values over the
hidden dim (groups of about `--channel-group` channels, the full-precision
window W = 128), adds in turn: channel reordering, calibrated clipping,
5 attention sinks, keys quantized before RoPE (the last is the `skvq-k2v2`
preset, or `skvq-k2v2-g32`). Calibration: the last 8192 tokens of WikiText-2,
disjoint from the evaluated windows (cut from the start). KIVI-2 alongside.

  python scripts/skvq_ablation.py --channel-group 128 \
      --out benchmarks/results/skvq_ablation_g128_smollm2.json
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import jax

import kivi_jax
from kivi_jax import eval as kv_eval
from kivi_jax.cli import _calibration_row, _calibrations, _write_json, run_metadata
from kivi_jax.default_model import default_model_path


def steps(channel_group: int) -> dict[str, kivi_jax.KIVIConfig]:
  """The cumulative ablation: each config adds one component to the previous."""
  plain = kivi_jax.KIVIConfig(k_bits=2, v_bits=2, group_size=32, residual_length=128,
                              key_axis="token", value_axis="token",
                              channel_group=channel_group)
  out = {"plain": plain}
  out["+reorder"] = dataclasses.replace(out["plain"], reorder=True)
  out["+clip"] = dataclasses.replace(out["+reorder"], clip="calibrated")
  out["+sinks"] = dataclasses.replace(out["+clip"], sinks=5)
  out["+pre_rope"] = dataclasses.replace(out["+sinks"], pre_rope=True)
  return out


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--model")
  parser.add_argument("--data", default="../shared/data/wikitext-2-raw/wiki.test.raw")
  parser.add_argument("--channel-group", type=int, default=128)
  parser.add_argument("--out")
  args = parser.parse_args(argv)

  path = args.model or default_model_path()
  model = kivi_jax.load_model(path)
  tokens = kv_eval.wikitext_tokens(kivi_jax.load_tokenizer(path), args.data)
  configs = {"kivi2": kivi_jax.get_preset("kivi2"), **steps(args.channel_group)}
  rows = []
  with jax.default_matmul_precision("highest"):
    for name, config in configs.items():
      calib = _calibrations(model, {name: config}, tokens, Path(args.data).name).get(name)
      result = kv_eval.kv_perplexity(model, tokens, config, **kv_eval.QUICK,
                                     calibration=calib)
      k_bpe, v_bpe = config.bits_per_element(16, model.config.head_dim,
                                             model.config.num_kv_heads)
      rows.append({"step": name, "kv_ppl": result.kv_ppl, **dataclasses.asdict(config),
                   "bits_per_element": (k_bpe + v_bpe) / 2, **_calibration_row(calib)})
      print(f"{name:>10}  KV-ppl {result.kv_ppl:8.3f}", flush=True)
  if args.out:
    _write_json(args.out, {**run_metadata(), "protocol": "Q1 KV-perplexity",
                           "setting": "quick", **kv_eval.QUICK, "model": Path(path).name,
                           "dtype": "float32", "channel_group": args.channel_group,
                           "rows": rows})


if __name__ == "__main__":
  main()
