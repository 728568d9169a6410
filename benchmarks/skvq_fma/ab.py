"""exp/skvq-fma: SKVQ's hidden-layout kernels alone (`hidden_decode_attention`) at
Llama-2-7B's heads, skvq-k2v2-g16-fp8's block with RoPE (random arrays), under the
branch's knobs and a few tile and warp settings, alternately in one process; each
output against the first setting's.

python benchmarks/skvq_fma/ab.py OUT.json [lower]   ("lower": CUDA lowering on a CPU)
"""
import datetime
import json
import sys

import jax
import jax.numpy as jnp

from kivi_jax import bench
from kivi_jax.pallas_kernels import decode_attention_hidden as dh

G, NG, BITS, D, HKV = 16, 256, 2, 128, 32
H = HKV * D
# (name, fma, sdot, kwargs)
SETTINGS = [("main", False, False, {}), ("fma", True, False, {}), ("sdot", False, True, {}),
            ("fma+sdot", True, True, {}), ("main", False, False, {}),
            ("fma+sdot", True, True, {}), ("tile16", False, False, dict(tile=16)),
            ("warps8", False, False, dict(num_warps=8)),
            ("fma+sdot warps8", True, True, dict(num_warps=8))]


def inputs(b, length, key):
  ks = jax.random.split(key, 9)
  cap = -(-length // 512) * 512
  q = jax.random.normal(ks[0], (b, 1, 32, H), jnp.bfloat16)
  qr = jax.random.normal(ks[1], (b, 1, 32, H), jnp.bfloat16)
  words = lambda k: jax.random.bits(k, (b, 1, cap // 16, H), jnp.uint32)  # noqa: E731
  fp8 = lambda k: (jax.random.uniform(k, (b, 1, NG, cap)) * 0.1).astype(  # noqa: E731
      jnp.float8_e4m3fn)
  groups = jnp.arange(H, dtype=jnp.int32) // (H // NG)
  theta = 1.0 / 10000.0 ** (jnp.arange(H, dtype=jnp.float32) % D / D)
  n_valid = jnp.full((b,), length, jnp.int32)
  return dict(q=q, k_codes=words(ks[2]), k_scale=fp8(ks[3]), k_zero=fp8(ks[4]),
              v_codes=words(ks[5]), v_scale=fp8(ks[6]), v_zero=fp8(ks[7]), n_valid=n_valid,
              lo=jnp.zeros_like(n_valid), k_groups=groups, v_groups=groups,
              v_perm=jnp.arange(H, dtype=jnp.int32), q_rot=qr, rope_theta=theta)


def call(fma, sdot, kwargs):
  """A new jit each time: the knobs are read while tracing."""
  dh._EXP_FMA, dh._EXP_SDOT = fma, sdot
  kw = dict(k_bits=BITS, v_bits=BITS, group_size=G, head_dim=D, rep=1, sm_scale=D ** -0.5,
            **kwargs)
  return jax.jit(lambda x: dh.hidden_decode_attention.__wrapped__(**x, **kw))


def main():
  out = sys.argv[1]
  if len(sys.argv) > 2 and sys.argv[2] == "lower":
    x = jax.eval_shape(lambda: inputs(2, 1408, jax.random.key(0)))
    for name, fma, sdot, kwargs in SETTINGS[:4]:
      text = call(fma, sdot, kwargs).trace(x).lower(lowering_platforms=("cuda",)).as_text()
      print("lowered", name, "skvq_decode_scores" in text, "fma.rn.f32" in text)
    return
  rows = []
  for b, length in ((64, 1408), (512, 1408), (1, 32768)):
    x = inputs(b, length, jax.random.key(b))
    first = None
    for name, fma, sdot, kwargs in SETTINGS:
      fn = call(fma, sdot, kwargs)
      o, lse = fn(x)
      ms = bench._time(fn, [(x,)], repeats=20)
      if first is None:
        first = o
      diff = float(jnp.max(jnp.abs(o - first)) / jnp.max(jnp.abs(first)))
      print(f"{b} x {length} {name:18s} {ms:.3f} ms  rel diff {diff:.2e}", flush=True)
      rows.append(dict(batch=b, length=length, setting=name, ms=ms, rel_diff=diff))
    del x
    json.dump(dict(device=jax.devices()[0].device_kind, jax=jax.__version__,
                   date=datetime.date.today().isoformat(), rows=rows), open(out, "w"), indent=1)


if __name__ == "__main__":
  main()
