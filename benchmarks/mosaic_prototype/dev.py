import json, os, sys, time, statistics
sys.path.insert(0, os.path.dirname(__file__))
import jax, jax.numpy as jnp
import k2, t2
from kivi_jax import bench
from kivi_jax.config import PRESETS
from pallas_kernels import decode_attention as da
print(jax.__version__, jax.devices()[0].device_kind, flush=True)
res = {"jax": jax.__version__, "device": jax.devices()[0].device_kind, "rows": []}

# 1. correctness, compiled
B, K, C, S = 2, 2, 2048, 2
q, kc, vc, kw, vw, ks, kz, vs, vz = t2.make(B, K, C)
n_valid = jnp.asarray([2048, 1000], jnp.int32)
try:
  out = t2.run(k2.build(B, K, C, S), q, kw, ks, kz, vw, vs, vz, n_valid, False)
  t2.check(out, t2.reference(q, kc, vc, ks, kz, vs, vz, n_valid, S))
except Exception:
  import traceback; traceback.print_exc()
  sys.exit(1)

def med(fn, args, reps=30):
  for _ in range(3):
    jax.block_until_ready(fn(*args))
  ts = []
  for _ in range(reps):
    t0 = time.perf_counter()
    for _ in range(10):
      out = fn(*args)
    jax.block_until_ready(out)
    ts.append((time.perf_counter() - t0) / 10 * 1e3)
  return statistics.median(ts)

config = PRESETS["kivi2"]
for L in (32768, 131072):
  layer, lens = bench._kivi_layer(jax.random.key(0), config, 8, 8, L, 128, jnp.bfloat16)
  q16 = jax.random.normal(jax.random.key(1), (8, 8, 16, 128), jnp.bfloat16)
  nq = lens - config.residual_length
  kw, ks, kz = layer.k.codes, layer.k.scale, layer.k.zero
  vw, vs, vz = layer.v.codes, layer.v.scale, layer.v.zero
  C = kw.shape[2] * 16
  print("L", L, "C", C, kw.shape, ks.shape, vs.shape, nq[:2], flush=True)
  tri = jax.jit(lambda *a: da.quantized_decode_partials(
      *a, jnp.zeros_like(nq), k_bits=2, v_bits=2, group_size=32))
  t_tri = med(tri, (q16, kw, ks, kz, vw, vs, vz, nq))
  vsT = jnp.swapaxes(vs, 2, 3); vzT = jnp.swapaxes(vz, 2, 3)
  t_tr = med(jax.jit(lambda a, b: (jnp.swapaxes(a, 2, 3), jnp.swapaxes(b, 2, 3))), (vs, vz))
  row = {"L": L, "triton_ms": t_tri, "transpose_ms": t_tr, "mgpu": {}}
  ref = da.merge_partials(*tri(q16, kw, ks, kz, vw, vs, vz, nq))[0]
  for S in ((8, 16, 32) if L == 32768 else (16, 32, 64)):
    for stages in (2, 3):
      try:
        f = jax.jit(k2.build(8, 8, C, S, stages=stages))
        args = (q16, kw, ks, kz, vw, vsT, vzT, nq)
        o, m, l = f(*args)
        got = da.merge_partials(jnp.swapaxes(o, 3, 4), m, l)[0]
        err = float(jnp.max(jnp.abs(got - ref)) / jnp.max(jnp.abs(ref)))
        t = med(f, args)
        row["mgpu"][f"S{S}_st{stages}"] = {"ms": t, "err_vs_triton": err}
        print(L, S, stages, t, err, flush=True)
      except Exception as e:
        print(L, S, stages, "FAILED", type(e).__name__, str(e)[:300], flush=True)
  print(row, flush=True)
  res["rows"].append(row)
json.dump(res, open(os.path.join(os.environ.get("OUT", "/tmp"), "mg.json"), "w"), indent=1)
