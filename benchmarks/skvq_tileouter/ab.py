"""exp/skvq-tileouter, from the repository root: python benchmarks/skvq_tileouter/ab.py B L VARIANTS.
A/B: SKVQ hidden kernels' num_stages / num_warps (monkeypatched), the step at
Llama-2-7B heads, B rows, L tokens: `cache_attention` over one layer, as `generate` runs it
(median ms), each output checked against the first variant's."""
import json, sys, os, time, statistics, types
import jax
import jax.numpy as jnp
import numpy as np
sys.path.insert(0, "scripts")
from gpu_skvq_decode import SKVQ, random_layer
from kivi_jax import bench
from kivi_jax.attention import cache_attention
from kivi_jax.pallas_kernels import decode_attention_hidden as dh

b, length = int(sys.argv[1]), int(sys.argv[2])
# stages/warps/chunks/splits/module (0 = the default; module 1 = benchmarks/skvq_tileouter/hidden_tileouter.py)
variants = [tuple(map(int, (v + "/0/0/0/0").split("/")[:5])) for v in sys.argv[3].split(",")]
sys.path.insert(0, "benchmarks/skvq_tileouter")
import hidden_tileouter
from kivi_jax import attention
modules = {0: dh, 1: hidden_tileouter}
hq = hkv = 32; d = 128
key = jax.random.key(0)
layer, lens = random_layer(key, SKVQ, b, hkv, length - 1, d, jnp.bfloat16)
inv_freq = 1.0 / 10000.0 ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d)
ks = jax.random.split(key, 3)
args = (jax.random.normal(ks[0], (b, 1, hq, d), jnp.bfloat16), layer,
        jax.random.normal(ks[1], (b, hkv, 1, d), jnp.bfloat16),
        jax.random.normal(ks[2], (b, hkv, 1, d), jnp.bfloat16), lens)
rows, ref = [], None
for stages, warps, chunks, splits, mod in variants:
  m = modules[mod]
  orig, orig_hidden = m.pallas_call, m.hidden_decode_attention
  def patched(*a, orig=orig, stages=stages, warps=warps, **kw):
    if stages: kw["num_stages"] = stages
    if warps: kw["num_warps"] = warps
    return orig(*a, **kw)
  m.pallas_call = patched
  extra = {k: v for k, v in (("chunks", chunks), ("splits", splits)) if v}
  attention.gpu_hidden = types.SimpleNamespace(
      hidden_decode_attention=lambda *a, extra=extra, oh=orig_hidden, **kw: oh(*a, **{**kw, **extra}))
  jax.clear_caches()
  step = jax.jit(lambda q, lay, kn, vn, ln: cache_attention(
      q, lay, kn, vn, ln, jnp.ones_like(ln), SKVQ, None, "gpu", inv_freq))
  t0 = time.perf_counter()
  try:
    out = jax.block_until_ready(step(*args))
  except Exception as e:  # a variant Triton refuses
    print(f"stages={stages} warps={warps} chunks={chunks} splits={splits} mod={mod}: {type(e).__name__}: {str(e)[:300]}", flush=True)
    rows.append(dict(stages=stages, warps=warps, chunks=chunks, splits=splits, mod=mod, error=str(e)[:500]))
    m.pallas_call = orig
    continue
  compile_s = time.perf_counter() - t0
  o = np.asarray(jax.tree.leaves(out)[0], np.float32)
  ref = o if ref is None else ref
  ms = bench._time(step, [args], repeats=20)
  diff = float(np.max(np.abs(o - ref)))
  m.pallas_call = orig
  rows.append(dict(stages=stages, warps=warps, chunks=chunks, splits=splits, mod=mod, ms=ms, compile_s=compile_s, max_diff=diff))
  print(f"stages={stages} warps={warps} chunks={chunks} splits={splits} mod={mod}: {ms:.3f} ms (compile {compile_s:.1f} s), max diff {diff:.3g}", flush=True)
attention.gpu_hidden = dh
json.dump(dict(device=jax.devices()[0].device_kind, jax=jax.__version__, B=b, L=length,
               commit=os.environ.get("KIVI_JAX_COMMIT"), rows=rows),
          open(os.path.join(os.environ.get("OUT", "/tmp"), f"skvq_stages_b{b}.json"), "w"), indent=1)
