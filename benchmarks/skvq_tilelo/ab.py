"""exp/skvq-tilelo: SKVQ's hidden-layout kernels alone (`hidden_decode_attention`) at
Llama-2-7B's heads, skvq-k2v2-g16-fp8's block with RoPE (random arrays): main's module
(a copy of its file, loaded beside the branch's) and the branch's, whose scores kernel
loads each tile's first near group (`_tile_near`, computed in jnp) where main's reduces
the tile's channel map at every group of tokens, alternately in one process; each
output against main's first (the same to the bit expected).

python benchmarks/skvq_tilelo/ab.py MAIN_FILE OUT.json
"""
import datetime
import importlib.util
import json
import sys

import jax
import jax.numpy as jnp

from kivi_jax import bench
from kivi_jax.pallas_kernels import decode_attention_hidden as branch

G, NG, BITS, D, HKV = 16, 256, 2, 128, 32
H = HKV * D


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
              v_perm=jax.random.permutation(ks[8], H).astype(jnp.int32), q_rot=qr,
              rope_theta=theta)


def main():
  spec = importlib.util.spec_from_file_location("dh_main", sys.argv[1])
  trunk = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(trunk)
  out = sys.argv[2]
  kw = dict(k_bits=BITS, v_bits=BITS, group_size=G, head_dim=D, rep=1, sm_scale=D ** -0.5)
  fns = {name: jax.jit(lambda x, m=m: m.hidden_decode_attention.__wrapped__(**x, **kw))
         for name, m in (("main", trunk), ("tilelo", branch))}
  rows = []
  for b, length in ((32, 1408), (64, 1408), (512, 1408), (1, 32768)):
    x = inputs(b, length, jax.random.key(b))
    first = None
    for name in ("main", "tilelo", "main", "tilelo"):
      o, _ = fns[name](x)
      ms = bench._time(fns[name], [(x,)], repeats=20)
      if first is None:
        first = o
      diff = float(jnp.max(jnp.abs(o - first)) / jnp.max(jnp.abs(first)))
      print(f"{b} x {length} {name:6s} {ms:.3f} ms  rel diff {diff:.2e}", flush=True)
      rows.append(dict(batch=b, length=length, setting=name, ms=ms, rel_diff=diff))
    del x
    json.dump(dict(device=jax.devices()[0].device_kind, jax=jax.__version__,
                   date=datetime.date.today().isoformat(), rows=rows), open(out, "w"), indent=1)


if __name__ == "__main__":
  main()
