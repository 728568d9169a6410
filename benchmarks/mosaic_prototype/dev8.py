"""k5: `chunk` slot pairs per softmax update (one cross-warp max per chunk) and
`defer_sum` (the softmax sum kept per element, reduced once), on the shared-buffer
one-stage kernel at 32k and 128k, beside main's kernel; the compiled check first."""
import json, os, sys, time, statistics
sys.path.insert(0, os.path.dirname(__file__))
import numpy as np, jax, jax.numpy as jnp
import k5
import t2
from pallas_kernels import decode_attention as da

t2.k2 = k5
q, kc, vc, kw_, vw_, ks, kz, vs, vz = t2.make(2, 2, 2048)
nv = jnp.asarray([2048, 1000], jnp.int32)
for extra in (dict(chunk=2), dict(chunk=4, defer_sum=True)):
  out = t2.run(k5.build(2, 2, 2048, 2, shared_dq=True, stages=1, **extra),
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


res = {"jax": jax.__version__, "device": jax.devices()[0].device_kind}
B, K = 8, 8
for L, C, splits, variants in (
    (32768, 33280, 64, [(c, d) for c in (1, 2, 4, 8) for d in (False, True)]),
    (131072, 131584, 64, [(1, False), (2, True), (4, True)])):
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
  row = {"triton_main": med(tri, args)}
  ref = da.merge_partials(*tri(*args))[0]
  margs = (*args[:5], jnp.swapaxes(args[5], 2, 3), jnp.swapaxes(args[6], 2, 3), args[7])
  for chunk, defer in variants:
    f = jax.jit(k5.build(B, K, C, splits, shared_dq=True, stages=1, chunk=chunk,
                         defer_sum=defer))
    o, m, l = f(*margs)
    got = da.merge_partials(jnp.swapaxes(o, 3, 4), m, l)[0]
    err = float(jnp.max(jnp.abs(got - ref)) / jnp.max(jnp.abs(ref)))
    row[f"chunk{chunk}{'_defer' if defer else ''}"] = {"ms": med(f, margs),
                                                      "err_vs_triton": err}
    print(L, chunk, defer, row[f"chunk{chunk}{'_defer' if defer else ''}"], flush=True)
  print(L, "triton_main", row["triton_main"], flush=True)
  res[str(L)] = row
json.dump(res, open(os.path.join(os.environ.get("OUT", "/tmp"), "mg8.json"), "w"), indent=1)
