"""Where KIVI-2 loses quality on a model: per layer and KV head, and keys vs values.

Runs the model in float32 over the first KV-perplexity window of WikiText-2
(PROTOCOLS.md Q1 quick: 512 + 256 tokens), keeping each layer's queries, keys
and values. For each decode position `p` (the last 256) attention is evaluated
as a decode step would see it: keys and values of the `n_quantized(p)` oldest
tokens dequantized from the method's codes, the rest full precision. Reported
per layer and KV head: the attention output's error relative to full precision
for keys alone quantized, values alone, both (KIVI-2 and KIVI-4), and the
per-token-key ablation, and keys quantized before RoPE (dequantized, then
rotated: SKVQ's pre-RoPE option); and how outlying the keys' channels are (the
largest channel's absolute maximum over the median channel's). Then
KV-perplexity (quick) with only keys, or only values, at 2 bits.

  python scripts/kivi2_error_analysis.py --out benchmarks/results/kivi2_analysis_smollm2.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import kivi_jax
from kivi_jax import eval as kv_eval
from kivi_jax import quantization
from kivi_jax.cache import n_quantized
from kivi_jax.cli import run_metadata
from kivi_jax.default_model import default_model_path
from kivi_jax.models import llama

VARIANTS = {
    # name: (k_bits, v_bits, key axis, value axis)
    "keys2": (2, 16, "channel", "token"),
    "values2": (16, 2, "channel", "token"),
    "kivi2": (2, 2, "channel", "token"),
    "kivi4": (4, 4, "channel", "token"),
    "per-token-keys2": (2, 2, "token", "channel"),
    "keys2-pre-rope": (2, 16, "channel", "token"),
}


def layer_activations(model, tokens):
  """Per layer: q `[T, Hq, Dh]`; k, v and k before RoPE `[T, Hkv, Dh]`, float32."""
  cfg, params = model.config, model.params
  t = tokens.shape[0]
  pos = jnp.arange(t)[None]
  inv_freq = llama.rope_inv_freq(cfg)
  rep = cfg.num_heads // cfg.num_kv_heads
  causal = jnp.tril(jnp.ones((t, t), bool))

  def layer(x, p):
    h = llama.rms_norm(x, p["attn_norm"], cfg.rms_norm_eps)
    qkv = jnp.einsum("BTD,DKRH->BTKRH", h, p["wqkv"])
    q = llama.apply_rope(qkv[:, :, :, :rep].reshape(1, t, cfg.num_heads, cfg.head_dim), pos,
                         inv_freq)
    k_pre, v = qkv[:, :, :, rep], qkv[:, :, :, rep + 1]
    k = llama.apply_rope(k_pre, pos, inv_freq)
    kr, vr = jnp.repeat(k, rep, 2), jnp.repeat(v, rep, 2)
    s = jnp.einsum("BTNH,BSNH->BNTS", q, kr) / np.sqrt(cfg.head_dim)
    a = jax.nn.softmax(jnp.where(causal, s, -jnp.inf), -1)
    x = x + jnp.einsum("BNTH,NHD->BTD", jnp.einsum("BNTS,BSNH->BNTH", a, vr), p["wo"])
    h = llama.rms_norm(x, p["mlp_norm"], cfg.rms_norm_eps)
    gate_up = jnp.einsum("BTD,DCF->BTCF", h, p["w_gate_up"])
    up = jax.nn.silu(gate_up[:, :, 0]) * gate_up[:, :, 1]
    return x + jnp.einsum("BTF,FD->BTD", up, p["w_down"]), (q[0], k[0], v[0], k_pre[0])

  x = params["embed"][tokens[None]]
  acts = []
  for p in params["layers"]:
    x, a = layer(x, p)
    acts.append(a)
  return jax.tree.map(lambda *a: jnp.stack(a), *acts)


def _dequantized(x, bits, axis, group):
  """`x` `[T, H, Dh]` through quantize/dequantize along tokens, per head."""
  if bits == 16:
    return x
  xt = x.transpose(1, 0, 2)  # [H, T, Dh]
  codes, scale, zero = quantization.quantize(xt, bits, group, axis, jnp.float32)
  return quantization.dequantize(codes, scale, zero, group, axis,
                                 jnp.float32).transpose(1, 0, 2)


def attention_errors(q, k, v, decode_from, config, rope=None):
  """Relative output error `[Hkv]` of one layer's decode steps under `config`.

  With `rope = (k_pre, positions, inv_freq)` keys are quantized before RoPE.
  """
  t, hq, d = q.shape
  hkv = k.shape[1]
  rep = hq // hkv
  g = config.group_size
  whole = t // g * g  # quantize whole groups; later tokens are never in the block
  if rope is None:
    kq = k.at[:whole].set(_dequantized(k[:whole], config.k_bits, config.key_axis, g))
  else:
    k_pre, pos, inv_freq = rope
    rotated = llama.apply_rope(
        _dequantized(k_pre[:whole], config.k_bits, config.key_axis, g)[None],
        pos[:, :whole], inv_freq)[0]
    kq = k.at[:whole].set(rotated)
  vq = v.at[:whole].set(_dequantized(v[:whole], config.v_bits, config.value_axis, g))
  steps = jnp.arange(decode_from, t)
  # A decode step at position p reads n_quantized(p) block tokens, then full precision.
  in_block = jnp.arange(t)[None, :] < n_quantized(steps, config)[:, None]  # [P, S]
  visible = jnp.arange(t)[None, :] <= steps[:, None]
  qs = q[steps].reshape(-1, hkv, rep, d)

  def out(keys, values, block_keys, block_values):
    s_fp = jnp.einsum("PKGD,SKD->PKGS", qs, keys)
    s_q = jnp.einsum("PKGD,SKD->PKGS", qs, block_keys)
    s = jnp.where(in_block[:, None, None], s_q, s_fp) / np.sqrt(d)
    a = jax.nn.softmax(jnp.where(visible[:, None, None], s, -jnp.inf), -1)
    blk = in_block[:, None, None]
    return (jnp.einsum("PKGS,SKD->PKGD", jnp.where(blk, a, 0), block_values)
            + jnp.einsum("PKGS,SKD->PKGD", jnp.where(blk, 0, a), values))

  ref = out(k, v, k, v)
  got = out(k, v, kq, vq)
  num = jnp.sqrt(jnp.sum((got - ref) ** 2, (0, 2, 3)))
  return num / jnp.sqrt(jnp.sum(ref**2, (0, 2, 3)))


def key_outliers(k):
  """`[Hkv]`: largest channel absmax over the median channel absmax."""
  amax = jnp.max(jnp.abs(k), axis=0)  # [Hkv, Dh]
  return jnp.max(amax, -1) / jnp.median(amax, -1)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--model")
  parser.add_argument("--data", default="../shared/data/wikitext-2-raw/wiki.test.raw")
  parser.add_argument("--out")
  args = parser.parse_args(argv)
  jax.config.update("jax_default_matmul_precision", "highest")
  path = args.model or default_model_path()
  model = kivi_jax.load_model(path, dtype="float32")
  tokens = kv_eval.wikitext_tokens(kivi_jax.load_tokenizer(path), args.data)
  p, d = kv_eval.QUICK["prefill"], kv_eval.QUICK["decode"]
  q, k, v, k_pre = layer_activations(model, jnp.asarray(tokens[:p + d]))
  positions = jnp.arange(p + d)[None]
  inv_freq = llama.rope_inv_freq(model.config)
  base = kivi_jax.PRESETS["kivi2"]
  errors = {}
  for name, (kb, vb, ka, va) in VARIANTS.items():
    config = dataclasses.replace(base, k_bits=kb, v_bits=vb, key_axis=ka, value_axis=va)
    errors[name] = np.stack([np.asarray(attention_errors(
        q[i], k[i], v[i], p, config,
        (k_pre[i], positions, inv_freq) if name.endswith("pre-rope") else None))
                             for i in range(q.shape[0])])  # [Ly, Hkv]
  outliers = np.stack([np.asarray(key_outliers(k[i])) for i in range(k.shape[0])])

  print("attention output error relative to full precision, mean over KV heads")
  print("| layer | " + " | ".join(VARIANTS) + " | key outlier ratio |")
  print("| --- |" + " --- |" * (len(VARIANTS) + 1))
  for i in range(outliers.shape[0]):
    cells = [f"{errors[n][i].mean():.3f}" for n in VARIANTS]
    print(f"| {i} | " + " | ".join(cells) + f" | {outliers[i].max():.1f} |")
  print("| mean | " + " | ".join(f"{errors[n].mean():.3f}" for n in VARIANTS) + " | |")

  ppl = {}
  for name in ("kivi2", "keys2", "values2"):
    kb, vb, ka, va = VARIANTS[name]
    config = dataclasses.replace(base, k_bits=kb, v_bits=vb, key_axis=ka, value_axis=va)
    ppl[name] = kv_eval.kv_perplexity(model, tokens, config, **kv_eval.QUICK).kv_ppl
    print(f"KV-ppl quick, {name}: {ppl[name]:.3f}", flush=True)

  if args.out:
    out = {**run_metadata(), "model": Path(path).name, "window": [0, p + d],
           "decode_from": p, "group_size": base.group_size,
           "residual_length": base.residual_length,
           "attention_error": {n: e.tolist() for n, e in errors.items()},
           "key_outlier_ratio": outliers.tolist(), "kv_ppl_quick": ppl}
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
