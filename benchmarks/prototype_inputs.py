"""What the prototypes' checks and benches share: random KIVI-2 inputs (4 query heads
per kv head, d = 128, group 32), main's kernel's arguments for them, exact attention
in float64, and the baselines a bench times beside a prototype.
"""
import math

import jax
import jax.numpy as jnp
import numpy as np

from kivi_jax import quantization
from kivi_jax.bench import _time
from kivi_jax.pallas_kernels import decode_attention as da

H, D, G = 4, 128, 32
f64 = lambda x: np.asarray(jnp.asarray(x, jnp.float32), np.float64)  # noqa: E731


def make(B, K, C, seed=0):
  """Random codes, bf16 scales and zeros, a bf16 query (dict of numpy / jnp arrays)."""
  rng = np.random.default_rng(seed)
  bf = lambda x: jnp.asarray(x, jnp.bfloat16)  # noqa: E731
  return dict(
      q=bf(rng.normal(size=(B, K, H, D)) * 2),
      kcodes=rng.integers(0, 4, (B, K, C, D), np.uint8),
      vcodes=rng.integers(0, 4, (B, K, C, D), np.uint8),
      ks=bf(rng.uniform(0.1, 1, (B, K, C // G, D))), kz=bf(rng.uniform(-1, 1, (B, K, C // G, D))),
      vs=bf(rng.uniform(0.1, 1, (B, K, C, D // G))), vz=bf(rng.uniform(-1, 1, (B, K, C, D // G))))


def main_args(x, n_valid, m_rows=16):
  """Main's kernel's arguments: main's packing, the query padded to 16 rows."""
  q = jnp.pad(x["q"], ((0, 0), (0, 0), (0, m_rows - H), (0, 0)))
  pack = lambda c: quantization.pack(jnp.asarray(c, jnp.uint32), 2, G)  # noqa: E731
  n = jnp.asarray(n_valid, jnp.int32)
  return (q, pack(x["kcodes"]), x["ks"], x["kz"], pack(x["vcodes"]), x["vs"], x["vz"], n,
          jnp.zeros_like(n))


def exact(x, n_valid):
  """Attention over the dequantized block in float64: o [B, K, H, D]."""
  C = x["kcodes"].shape[2]
  keys = x["kcodes"] * np.repeat(f64(x["ks"]), G, axis=2) + np.repeat(f64(x["kz"]), G, axis=2)
  values = (x["vcodes"] * np.repeat(f64(x["vs"]), G, axis=3)
            + np.repeat(f64(x["vz"]), G, axis=3))
  s = np.einsum("bkhd,bktd->bkht", f64(x["q"]), keys) / math.sqrt(D)
  live = np.arange(C)[None, :] < np.asarray(n_valid)[:, None]
  s = np.where(live[:, None, None, :], s, -np.inf)
  p = np.exp(s - s.max(-1, keepdims=True))
  return np.einsum("bkht,bktd->bkhd", p / p.sum(-1, keepdims=True), values)


def rel(got, want):
  """Largest absolute error over the largest absolute value."""
  return float(np.max(np.abs(np.asarray(got, np.float64) - want)) / np.max(np.abs(want)))


def baselines(x, n_valid, L, q_heads):
  """cuDNN's bf16 attention over L tokens and main's kernel over `x`'s block, timed
  (`kivi_jax.bench._time`, median of 30), and main's output for the real query heads:
  (cudnn_ms, main_ms, want [B, K, H, D])."""
  b, k = x["kcodes"].shape[:2]
  base = [jax.random.normal(key, shape, jnp.bfloat16) for key, shape in zip(
      jax.random.split(jax.random.key(0), 3),
      [(b, 1, q_heads, D), (b, L, k, D), (b, L, k, D)])]
  cudnn = jax.jit(lambda q, kk, v: jax.nn.dot_product_attention(q, kk, v,
                                                                 implementation="cudnn"))
  cudnn_ms = _time(cudnn, [base], 30)
  del base
  margs = main_args(x, n_valid)
  tri = jax.jit(lambda *a: da.quantized_decode_partials(*a, k_bits=2, v_bits=2,
                                                        group_size=G))
  main_ms = _time(tri, [margs], 30)
  return cudnn_ms, main_ms, da.merge_partials(*tri(*margs))[0][:, :, :H]
