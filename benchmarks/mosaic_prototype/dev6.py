"""32k: k4's options (codes to float32 without int-to-float conversions, words
pre-aligned per half) on the shared-buffer one-stage kernel, beside main's kernel;
the compiled check first."""
import json, os, sys, time, statistics
sys.path.insert(0, os.path.dirname(__file__))
import numpy as np, jax, jax.numpy as jnp
import k4
import t2
from pallas_kernels import decode_attention as da

t2.k2 = k4
q, kc, vc, kw_, vw_, ks, kz, vs, vz = t2.make(2, 2, 2048)
nv = jnp.asarray([2048, 1000], jnp.int32)
out = t2.run(k4.build(2, 2, 2048, 2, shared_dq=True, stages=1, magic=True, prealign=True),
             q, kw_, ks, kz, vw_, vs, vz, nv, False)
t2.check(out, t2.reference(q, kc, vc, ks, kz, vs, vz, nv, 2))


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


B, K, L, C = 8, 8, 32768, 33280
rng = np.random.default_rng(0)
args = (jnp.asarray(rng.normal(size=(B, K, 16, 128)), jnp.bfloat16),
        jnp.asarray(rng.integers(0, 2**32, (B, K, C // 16, 128), dtype=np.uint32)),
        jnp.asarray(rng.uniform(0.1, 1, (B, K, C // 32, 128)), jnp.bfloat16),
        jnp.asarray(rng.uniform(-1, 1, (B, K, C // 32, 128)), jnp.bfloat16),
        jnp.asarray(rng.integers(0, 2**32, (B, K, C // 16, 128), dtype=np.uint32)),
        jnp.asarray(rng.uniform(0.1, 1, (B, K, C, 4)), jnp.bfloat16),
        jnp.asarray(rng.uniform(-1, 1, (B, K, C, 4)), jnp.bfloat16),
        jnp.asarray(np.full((B,), L - 128), jnp.int32))
tri = jax.jit(lambda *a: da.quantized_decode_partials(*a, jnp.zeros_like(a[-1]), k_bits=2,
                                                      v_bits=2, group_size=32))
res = {"jax": jax.__version__, "device": jax.devices()[0].device_kind,
       "triton_main": med(tri, args)}
ref = da.merge_partials(*tri(*args))[0]
margs = (*args[:5], jnp.swapaxes(args[5], 2, 3), jnp.swapaxes(args[6], 2, 3), args[7])
base = dict(shared_dq=True, stages=1)
for name, extra in [("J", {}), ("J_magic", dict(magic=True)),
                    ("J_prealign", dict(prealign=True)),
                    ("J_magic_prealign", dict(magic=True, prealign=True)),
                    ("J_magic_prealign_const", dict(magic=True, prealign=True,
                                                    const_scales=True)),
                    ("J_magic_prealign_konly", dict(magic=True, prealign=True, k_only=True))]:
  f = jax.jit(k4.build(B, K, C, 64, **base, **extra))
  o, m, l = f(*margs)
  got = da.merge_partials(jnp.swapaxes(o, 3, 4), m, l)[0]
  err = float(jnp.max(jnp.abs(got - ref)) / jnp.max(jnp.abs(ref)))
  res[name] = {"ms": med(f, margs), "err_vs_triton": err}
  print(name, res[name], flush=True)
print("triton_main", res["triton_main"])
json.dump(res, open(os.path.join(os.environ.get("OUT", "/tmp"), "mg6.json"), "w"), indent=1)
