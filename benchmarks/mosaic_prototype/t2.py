import math, os, sys
import numpy as np, jax, jax.numpy as jnp
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
import k2
from kivi_jax import quantization

def make(B, K, C, seed=0):
  rng = np.random.default_rng(seed)
  kcodes = rng.integers(0, 4, (B, K, C, k2.D)).astype(np.uint32)
  vcodes = rng.integers(0, 4, (B, K, C, k2.D)).astype(np.uint32)
  kw = np.asarray(quantization.pack(jnp.asarray(kcodes), 2, k2.G))
  vw = np.asarray(quantization.pack(jnp.asarray(vcodes), 2, k2.G))
  ks = jnp.asarray(rng.uniform(0.1, 1, (B, K, C // k2.G, k2.D)), jnp.bfloat16)
  kz = jnp.asarray(rng.uniform(-1, 1, (B, K, C // k2.G, k2.D)), jnp.bfloat16)
  vs = jnp.asarray(rng.uniform(0.1, 1, (B, K, C, k2.D // k2.G)), jnp.bfloat16)
  vz = jnp.asarray(rng.uniform(-1, 1, (B, K, C, k2.D // k2.G)), jnp.bfloat16)
  q = jnp.asarray(rng.normal(size=(B, K, k2.N, k2.D)) * 2, jnp.bfloat16)
  return q, kcodes, vcodes, kw, vw, ks, kz, vs, vz

def reference(q, kcodes, vcodes, ks, kz, vs, vz, n_valid, S):
  f64 = lambda x: np.asarray(jnp.asarray(x, jnp.float32), np.float64)
  bf = lambda x: f64(jnp.asarray(x, jnp.float32).astype(jnp.bfloat16))
  G = k2.G
  kf = bf(kcodes * np.repeat(f64(ks), G, 2) + np.repeat(f64(kz), G, 2))
  vf = bf(vcodes * np.repeat(f64(vs), G, 3) + np.repeat(f64(vz), G, 3))
  s = np.einsum("bknd,bktd->bknt", f64(q), kf) / math.sqrt(k2.D)
  B, K, N, C = s.shape
  t = np.arange(C)
  s = np.where(t[None, None, None] < np.asarray(n_valid)[:, None, None, None], s, -1e30)
  per = -(-C // k2.PB // S) * k2.PB
  pad = per * S - C
  s = np.pad(s, [(0, 0)] * 3 + [(0, pad)], constant_values=-1e30).reshape(B, K, N, S, per)
  vf = np.pad(vf, [(0, 0)] * 2 + [(0, pad), (0, 0)])
  m = s.max(-1)
  p = np.where(s > -1e29, np.exp(s - m[..., None]), 0)
  l = p.sum(-1)
  o = np.einsum("bknst,bkstd->bksdn", p, vf.reshape(B, K, S, per, k2.D))
  return o, m.transpose(0, 1, 3, 2), l.transpose(0, 1, 3, 2)

def run(f, q, kw, ks, kz, vw, vs, vz, n_valid, interp):
  qq = jnp.swapaxes(q, 2, 3) if interp else q
  return jax.jit(f)(qq, jnp.asarray(kw), ks, kz, jnp.asarray(vw), jnp.swapaxes(vs, 2, 3),
                    jnp.swapaxes(vz, 2, 3), n_valid)

def check(out, ref):
  o, m, l = map(np.asarray, out)
  ro, rm, rl = ref
  print("m err", np.abs(m - rm)[rm > -1e29].max(), "l rel", np.abs(l / rl - 1)[rm > -1e29].max(),
        "o rel", np.abs(o - ro).max() / np.abs(ro).max())

if __name__ == "__main__":
  from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams
  B, K, C, S = 2, 1, 2560, 2
  q, kc, vc, kw, vw, ks, kz, vs, vz = make(B, K, C)
  n_valid = jnp.asarray([2560, 1000], jnp.int32)
  f = k2.build(B, K, C, S, interpret=InterpretGPUParams())
  out = run(f, q, kw, ks, kz, vw, vs, vz, n_valid, True)
  check(out, reference(q, kc, vc, ks, kz, vs, vz, n_valid, S))
