"""Llama-2-7B layer matmuls on a GPU: q, k, v and gate, up as separate matmuls or fused
(one matmul each), 32 layers with their own random weights, a loop of 16 in one jit.
Prototype for the fused parameter layout (benchmarks/NOTES.md, "Fused projections").
Usage: OUT=dir python benchmarks/fused_projections.py"""
import functools, json, os, statistics, time
import jax, jax.numpy as jnp

D, H, DH, F, L = 4096, 32, 128, 11008, 32
key = jax.random.key(0)
def w(i, *shape):
  return (jax.random.normal(jax.random.fold_in(key, i), shape, jnp.float32) * 0.02).astype(jnp.bfloat16)
sep = [dict(wq=w(10*l, D, H*DH), wk=w(10*l+1, D, H*DH), wv=w(10*l+2, D, H*DH), wo=w(10*l+3, H*DH, D),
            wg=w(10*l+4, D, F), wu=w(10*l+5, D, F), wd=w(10*l+6, F, D), n=jnp.ones((D,), jnp.bfloat16)) for l in range(L)]
fused = [dict(wqkv=jnp.concatenate([p["wq"], p["wk"], p["wv"]], 1), wo=p["wo"],
              wgu=jnp.concatenate([p["wg"], p["wu"]], 1), wd=p["wd"], n=p["n"]) for p in sep]

def rms(x, n):
  x32 = x.astype(jnp.float32)
  return n * (x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, -1, keepdims=True) + 1e-5)).astype(x.dtype)

def layer_sep(x, p):
  h = rms(x, p["n"])
  q, k, v = h @ p["wq"], h @ p["wk"], h @ p["wv"]
  x = x + (q * k + v) @ p["wo"]
  h = rms(x, p["n"])
  return x + (jax.nn.silu(h @ p["wg"]) * (h @ p["wu"])) @ p["wd"]

def layer_fused(x, p):
  h = rms(x, p["n"])
  q, k, v = jnp.split(h @ p["wqkv"], 3, -1)
  x = x + (q * k + v) @ p["wo"]
  h = rms(x, p["n"])
  g, u = jnp.split(h @ p["wgu"], 2, -1)
  return x + (jax.nn.silu(g) * u) @ p["wd"]

@functools.partial(jax.jit, static_argnums=0)
def run(layer, params, x):
  def body(_, x):
    for p in params:
      x = layer(x, p)
    return x / jnp.max(jnp.abs(x))
  return jax.lax.fori_loop(0, 16, body, x)

res = {"device": str(jax.devices()[0]), "jax": jax.__version__}
for b in (1, 32):
  x = jax.random.normal(key, (b, D), jnp.bfloat16)
  for name, layer, params in (("separate", layer_sep, sep), ("fused", layer_fused, fused)) * 2:
    jax.block_until_ready(run(layer, params, x))
    ts = []
    for _ in range(7):
      t0 = time.perf_counter(); jax.block_until_ready(run(layer, params, x)); ts.append((time.perf_counter() - t0) / 16 * 1e3)
    res[f"b{b}_{name}"] = statistics.median(ts)
    print(b, name, round(statistics.median(ts), 3), flush=True)
json.dump(res, open(os.environ["OUT"] + "/fused_matmuls.json", "w"), indent=1)
