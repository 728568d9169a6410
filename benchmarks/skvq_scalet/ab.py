"""exp/skvq-scalet: SKVQ's hidden-layout kernels with the scales and zeros read
`[C, n]` (main's layout: a group's tokens 256 bytes apart at 4096 channels, one
byte used a 32-byte sector) against `[n, C]` (a group's tokens contiguous), the
kernels alone (`hidden_decode_attention`) at Llama-2-7B's heads, skvq-k2v2-g16-fp8's
block with RoPE, random arrays. The transposed copy is made before the timing.

python benchmarks/skvq_scalet/ab.py OUT.json [lower]   ("lower": CUDA lowering on a CPU)
"""
import datetime
import functools
import json
import sys

import jax
import jax.numpy as jnp
import numpy as np

from kivi_jax import bench
from kivi_jax.pallas_kernels import decode_attention_hidden as dh

G, NG, BITS, D, HKV = 16, 256, 2, 128, 32
H = HKV * D


def inputs(b, length, key):
  ks = jax.random.split(key, 9)
  cap = -(-length // 512) * 512
  q = jax.random.normal(ks[0], (b, 1, 32, H), jnp.bfloat16)
  qr = jax.random.normal(ks[1], (b, 1, 32, H), jnp.bfloat16)
  words = lambda k: jax.random.bits(k, (b, 1, cap // 16, H), jnp.uint32)  # noqa: E731
  fp8 = lambda k: (jax.random.uniform(k, (b, 1, cap, NG)) * 0.1).astype(  # noqa: E731
      jnp.float8_e4m3fn)
  groups = jnp.arange(H, dtype=jnp.int32) // (H // NG)
  theta = 1.0 / 10000.0 ** (jnp.arange(H, dtype=jnp.float32) % D / D)
  n_valid = jnp.full((b,), length, jnp.int32)
  return dict(q=q, k_codes=words(ks[2]), k_scale=fp8(ks[3]), k_zero=fp8(ks[4]),
              v_codes=words(ks[5]), v_scale=fp8(ks[6]), v_zero=fp8(ks[7]), n_valid=n_valid,
              lo=jnp.zeros_like(n_valid), k_groups=groups, v_groups=groups,
              v_perm=jnp.arange(H, dtype=jnp.int32), q_rot=qr, rope_theta=theta)


def call(transposed, lower=False):
  kw = dict(k_bits=BITS, v_bits=BITS, group_size=G, head_dim=D, rep=1, sm_scale=D ** -0.5,
            transposed=transposed)
  f = dh.hidden_decode_attention.__wrapped__ if lower else dh.hidden_decode_attention
  return jax.jit(lambda x: f(**x, **kw))


def swap(x):
  x = dict(x)
  for k in ("k_scale", "k_zero", "v_scale", "v_zero"):
    x[k] = jnp.swapaxes(x[k], 2, 3)
  return x


def main():
  out = sys.argv[1]
  if len(sys.argv) > 2 and sys.argv[2] == "lower":
    x = jax.eval_shape(lambda: inputs(2, 1408, jax.random.key(0)))
    for t in (False, True):
      text = call(t, True).trace(jax.eval_shape(swap, x) if t else x).lower(
          lowering_platforms=("cuda",)).as_text()
      print("lowered", t, "skvq_decode_scores" in text, "skvq_decode_values" in text)
    return
  rows = []
  for b, length in ((64, 1408), (512, 1408), (1, 32768)):
    x = inputs(b, length, jax.random.key(b))
    xt = swap(x)
    res = {}
    for t in (False, True, False, True):
      fn, arg = call(t), (xt if t else x)
      ms = bench._time(fn, [(arg,)], repeats=20)
      o, lse = fn(arg)
      res.setdefault(t, []).append(ms)
      res[f"sum{t}"] = float(jnp.sum(o))
      if t:
        o0, l0 = call(False)(x)
        res["max_diff"] = float(jnp.max(jnp.abs(o - o0)))
      print(b, length, "transposed" if t else "main", f"{ms:.3f} ms", flush=True)
    rows.append(dict(batch=b, length=length, main_ms=res[False], transposed_ms=res[True],
                     max_diff=res["max_diff"], sums=[res["sumFalse"], res["sumTrue"]]))
    del x, xt
  json.dump(dict(device=jax.devices()[0].device_kind, jax=jax.__version__,
                 date=datetime.date.today().isoformat(), rows=rows), open(out, "w"), indent=1)


if __name__ == "__main__":
  main()
