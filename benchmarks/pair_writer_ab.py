"""A/B of the pair writer's flush (one 32-token group of every row and head,
Llama-2-7B's 512 x 32 heads, d 128, 2-bit codes, a 1536-token block donated):
the module of a copy of an older tree (`.devrun/main`, here af729e3, built by
`git archive`) against the installed one, wall time of a call with
`block_until_ready`, median of 15 after one warm-up, and the words of the first
rows compared. Run once on the H200 (raw: results/pair_writer_h200.txt); kept
in git history, not in the tree (benchmarks/NOTES.md, "Quantize-and-pack")."""
import importlib.util, sys, time, json
import jax, jax.numpy as jnp, numpy as np
from kivi_jax.pallas_kernels import quantize_pack as new
spec = importlib.util.spec_from_file_location("qp_old", ".devrun/main/kivi_jax/pallas_kernels/quantize_pack.py")
old = importlib.util.module_from_spec(spec); spec.loader.exec_module(old)
B, H, n, d, cap, g, bits = 512, 32, 32, 128, 1536, 32, 2
rng = np.random.default_rng(0)
x = jnp.asarray(rng.standard_normal((B, H, n, d)), jnp.bfloat16)
st = jnp.full((B,), 1024, jnp.int32); nt = jnp.full((B,), n, jnp.int32)
def arrays(axis):
  if axis == "channel":
    return (jnp.zeros((B, H, cap, d * bits // 32), jnp.uint32),
            jnp.zeros((B, H, cap // g, d), jnp.bfloat16), jnp.zeros((B, H, cap // g, d), jnp.bfloat16))
  return (jnp.zeros((B, H, d, cap * bits // 32), jnp.uint32),
          jnp.zeros((B, H, d // g, cap), jnp.bfloat16), jnp.zeros((B, H, d // g, cap), jnp.bfloat16))
res = {}
for axis in ("channel", "token"):
  outs = {}
  for name, mod, nw in [("old", old, 4), ("new", new, 4), ("new", new, 8), ("new", new, 2)]:
    f = jax.jit(lambda x, w, s, z, st, nt: mod.quantize_pack_pairs(
        x, w, s, z, st, nt, bits=bits, group_size=g, axis=axis, num_warps=nw), donate_argnums=(1, 2, 3))
    w, s, z = arrays(axis)
    w, s, z = f(x, w, s, z, st, nt); jax.block_until_ready(w)
    ts = []
    for _ in range(15):
      t = time.perf_counter(); w, s, z = f(x, w, s, z, st, nt); jax.block_until_ready(w); ts.append(time.perf_counter() - t)
    outs[(name, nw)] = np.asarray(w[:4])
    res[f"{axis} {name} warps={nw}"] = round(float(np.median(ts)) * 1e6, 1)
    print(axis, name, nw, res[f"{axis} {name} warps={nw}"], "us", flush=True)
  print(axis, "equal", all(np.array_equal(outs[("old", 4)], v) for v in outs.values()), flush=True)
print(json.dumps(res))
