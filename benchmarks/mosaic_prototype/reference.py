"""Float64 numpy reference for kernel.py, random inputs, and a check.

`python benchmarks/mosaic_prototype/reference.py` runs the kernel in jax 0.10.2's
Mosaic GPU interpret mode on the CPU against the reference.
"""
import math
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
import kernel  # noqa: E402
from kivi_jax import quantization  # noqa: E402


def make(B, K, C, seed=0):
  """Random codes (and their packed words), scales, zeros and a query."""
  rng = np.random.default_rng(seed)
  kcodes = rng.integers(0, 4, (B, K, C, kernel.D)).astype(np.uint32)
  vcodes = rng.integers(0, 4, (B, K, C, kernel.D)).astype(np.uint32)
  kw = np.asarray(quantization.pack(jnp.asarray(kcodes), 2, kernel.G))
  vw = np.asarray(quantization.pack(jnp.asarray(vcodes), 2, kernel.G))
  ks = jnp.asarray(rng.uniform(0.1, 1, (B, K, C // kernel.G, kernel.D)), jnp.bfloat16)
  kz = jnp.asarray(rng.uniform(-1, 1, (B, K, C // kernel.G, kernel.D)), jnp.bfloat16)
  vs = jnp.asarray(rng.uniform(0.1, 1, (B, K, C, kernel.D // kernel.G)), jnp.bfloat16)
  vz = jnp.asarray(rng.uniform(-1, 1, (B, K, C, kernel.D // kernel.G)), jnp.bfloat16)
  q = jnp.asarray(rng.normal(size=(B, K, kernel.N, kernel.D)) * 2, jnp.bfloat16)
  return q, kcodes, vcodes, kw, vw, ks, kz, vs, vz


def reference(q, kcodes, vcodes, ks, kz, vs, vz, n_valid, S):
  """Per-split (o^T [B, K, S, D, N], m, l) in float64, keys and values rounded to
  bf16 once as the kernel rounds them; splits of whole packing blocks."""
  f64 = lambda x: np.asarray(jnp.asarray(x, jnp.float32), np.float64)
  bf = lambda x: f64(jnp.asarray(x, jnp.float32).astype(jnp.bfloat16))
  G = kernel.G
  kf = bf(kcodes * np.repeat(f64(ks), G, 2) + np.repeat(f64(kz), G, 2))
  vf = bf(vcodes * np.repeat(f64(vs), G, 3) + np.repeat(f64(vz), G, 3))
  s = np.einsum("bknd,bktd->bknt", f64(q), kf) / math.sqrt(kernel.D)
  B, K, N, C = s.shape
  t = np.arange(C)
  s = np.where(t[None, None, None] < np.asarray(n_valid)[:, None, None, None], s, -1e30)
  per = -(-C // kernel.PB // S) * kernel.PB
  pad = per * S - C
  s = np.pad(s, [(0, 0)] * 3 + [(0, pad)], constant_values=-1e30).reshape(B, K, N, S, per)
  vf = np.pad(vf, [(0, 0)] * 2 + [(0, pad), (0, 0)])
  m = s.max(-1)
  p = np.where(s > -1e29, np.exp(s - m[..., None]), 0)
  l = p.sum(-1)
  o = np.einsum("bknst,bkstd->bksdn", p, vf.reshape(B, K, S, per, kernel.D))
  return o, m.transpose(0, 1, 3, 2), l.transpose(0, 1, 3, 2)


def run(f, q, kw, ks, kz, vw, vs, vz, n_valid, interp):
  """`f` (a built kernel) on the cache's arrays: value scales transposed, and in
  interpret mode the query transposed too (the interpreter has no transpose_ref)."""
  qq = jnp.swapaxes(q, 2, 3) if interp else q
  return jax.jit(f)(qq, jnp.asarray(kw), ks, kz, jnp.asarray(vw), jnp.swapaxes(vs, 2, 3),
                    jnp.swapaxes(vz, 2, 3), n_valid)


def check(out, ref):
  """Errors of m (absolute), l (relative) and o (over the largest |o|), live splits."""
  o, m, l = map(np.asarray, out)
  ro, rm, rl = ref
  live = rm > -1e29
  err = {"m": float(np.abs(m - rm)[live].max()),
         "l_rel": float(np.abs(l[live] / rl[live] - 1).max()),
         "o_rel": float(np.abs(o - ro).max() / np.abs(ro).max())}
  print(err, flush=True)
  return err


if __name__ == "__main__":
  from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams
  B, K, C, S = 2, 1, 2560, 2
  q, kc, vc, kw, vw, ks, kz, vs, vz = make(B, K, C)
  n_valid = jnp.asarray([2560, 1000], jnp.int32)
  ref = reference(q, kc, vc, ks, kz, vs, vz, n_valid, S)
  for opts in (kernel.Options(), kernel.Options(unrolled=True, magic=True, prealign=True),
               kernel.Options(chunk=4, defer_sum=True)):
    f = kernel.build(B, K, C, S, opts, interpret=InterpretGPUParams())
    check(run(f, q, kw, ks, kz, vw, vs, vz, n_valid, True), ref)
