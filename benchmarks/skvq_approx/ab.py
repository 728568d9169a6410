"""exp/skvq-approx on the GPU: SKVQ's hidden-layout kernels alone (the call's
median ms, device us by kernel over 10 traced calls) at Llama-2-7B's width
(Hq = Hkv = 32, d = 128), skvq-k2v2-g16-fp8's block (random arrays, channels in
order), B=32 at 1408 tokens and B=1 at 32768, with KIVI_EXP_APPROX as the
process has it. Writes JSON to argv[1]."""

import functools
import json
import os
import sys
import tempfile

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "scripts"))
from gpu_skvq_decode import SKVQ, random_layer  # noqa: E402

from kivi_jax import bench  # noqa: E402
from kivi_jax.bench_generate import device_kernels  # noqa: E402
from kivi_jax.cache import n_quantized  # noqa: E402
from kivi_jax.pallas_kernels import decode_attention_hidden as hid  # noqa: E402


def main(out_path: str):
  knob = os.environ.get("KIVI_EXP_APPROX", "0")
  rows = {}
  for b, length in ((32, 1408), (1, 32768)):
    key = jax.random.key(0)
    layer, lens = random_layer(key, SKVQ, b, 32, length, 128, jnp.bfloat16)
    ks = jax.random.split(key, 2)
    q, q_rot = (jax.random.normal(k, (b, 1, 32, 4096), jnp.bfloat16) for k in ks)
    theta = 1.0 / 10000.0 ** (jnp.arange(4096, dtype=jnp.float32) % 64 / 64)
    blocks = (layer.k.codes, layer.k.scale, layer.k.zero, layer.v.codes, layer.v.scale,
              layer.v.zero)
    nq = n_quantized(lens, SKVQ)
    fn = jax.jit(functools.partial(hid.hidden_decode_attention, k_bits=2, v_bits=2,
                                   group_size=32, head_dim=128, rep=1, sm_scale=0.1,
                                   pos_offset=SKVQ.sinks))
    args = (q, *blocks, nq, jnp.zeros_like(nq), layer.k_map.groups, layer.v_map.groups,
            layer.v_map.perm, q_rot, theta)
    o = fn(*args)[0]
    ms = bench._time(fn, [args], repeats=20)
    with tempfile.TemporaryDirectory() as d:
      with jax.profiler.trace(d, create_perfetto_trace=True):
        for _ in range(10):
          jax.block_until_ready(fn(*args))
      by = {}
      for e in device_kernels(d):
        name = e["name"].split("_triton")[0][:40]
        by[name] = by.get(name, 0.0) + e.get("dur", 0) / 10
    top = dict(sorted(by.items(), key=lambda kv: -kv[1])[:4])
    rows[f"B={b} L={length}"] = dict(ms=ms, device_us=top,
                                     out_sum=float(jnp.sum(o.astype(jnp.float32))))
    print(f"KIVI_EXP_APPROX={knob} B={b} L={length}: {ms:.3f} ms",
          {k: round(v, 1) for k, v in top.items()}, flush=True)
  with open(out_path, "w") as f:
    json.dump(dict(device=jax.devices()[0].device_kind, jax=jax.__version__, knob=knob,
                   rows=rows), f, indent=1)


if __name__ == "__main__":
  main(sys.argv[1])
