"""References for kernel.py: exact attention in float64, and the prototype's own
arithmetic (int8 folding, step by step) mirrored in numpy.

`python benchmarks/int8_prototype/reference.py` runs the kernel in interpret mode on
the CPU (the jnp unpacking in place of the inline PTX) against the mirror, and
reports both and main's kernel against exact attention.
"""
import math
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
import kernel  # noqa: E402
from kernel import D, G, H, T  # noqa: E402
from prototype_inputs import exact, main_args, make, rel  # noqa: E402
from kivi_jax.pallas_kernels import decode_attention as da  # noqa: E402


def prototype_args(x, n_valid, mode):
  return (x["q"], jnp.asarray(kernel.pack_keys(x["kcodes"], mode)), x["ks"], x["kz"],
          jnp.asarray(kernel.pack_values(x["vcodes"], mode)), x["vs"], x["vz"],
          jnp.asarray(n_valid, jnp.int32))


def _fold(x, axis, mode):
  """kernel.fold in float32 numpy ("exact": no rounding, for `attribution`)."""
  if mode == "exact":
    amax = np.max(np.abs(x), axis=axis, keepdims=True)
    return x * np.float32(127) / np.where(amax > 0, amax, 1), amax * np.float32(1 / 127)
  if mode == "bf16":
    return np.asarray(jnp.asarray(x).astype(jnp.bfloat16), np.float32), np.float32(1)
  amax = np.max(np.abs(x), axis=axis, keepdims=True)
  inv = np.where(amax > 0, np.float32(127) / np.where(amax > 0, amax, 1), np.float32(0))
  return np.floor(x * inv + np.float32(0.5)), amax * np.float32(1 / 127)


def mirror(x, n_valid, splits, mode, q_mode=None):
  """The kernel's arithmetic step by step (float32 where the kernel rounds, float64
  elsewhere), splits merged as `merge_partials` merges them: o [B, K, H, D]. `q_mode`
  (default `mode`) folds the query apart from the probabilities."""
  f32 = lambda a: np.asarray(jnp.asarray(a, jnp.float32))  # noqa: E731
  B, K, C, _ = x["kcodes"].shape
  per_split = -(-(C // T) // splits)
  q = f32(x["q"]) * np.float32(1 / math.sqrt(D))
  ks, kz, vs, vz = (f32(x[n]) for n in ("ks", "kz", "vs", "vz"))
  n = np.asarray(n_valid)
  m = np.full((B, K, splits, H), -1e30)
  l = np.zeros((B, K, splits, H))
  acc = np.zeros((B, K, splits, H, D))
  for s in range(splits):
    for i in range(s * per_split, min((s + 1) * per_split, C // T)):
      t = np.arange(i * T, (i + 1) * T)
      live = t[None, :] < n[:, None]  # [B, T]
      if not live.any():
        continue
      g = t // G
      qi, qsc = _fold(q[:, :, :, None, :] * ks[:, :, None, i * 4:(i + 1) * 4, :], 4,
                      q_mode or mode)
      bias = np.sum(q[:, :, :, None, :] * kz[:, :, None, i * 4:(i + 1) * 4, :], axis=4)
      s_all = np.einsum("bkhgd,bktd->bkhgt", qi, x["kcodes"][:, :, t].astype(np.float64))
      s_all = s_all * qsc + bias[..., None]
      sc = np.take_along_axis(s_all, (g - i * 4)[None, None, None, None, :], axis=3)[..., 0, :]
      sc = np.where(live[:, None, None, :], sc, -1e30)
      m_new = np.maximum(m[:, :, s], sc.max(-1))
      active = live.any(1)[:, None, None]
      p = np.where(live[:, None, None, :], np.exp(sc - m_new[..., None]), 0.0)
      corr = np.exp(m[:, :, s] - m_new)
      p32 = p.astype(np.float32)
      pi, psc = _fold(p32[:, :, :, None, :] * vs[:, :, None, t, :].swapaxes(-1, -2), 4, mode)
      pv = np.einsum("bkhct,bktd->bkhcd", pi, x["vcodes"][:, :, t].astype(np.float64)) * psc
      pv = np.take_along_axis(pv, (np.arange(D) // G)[None, None, None, None, :], axis=3)[
          ..., 0, :]
      z = np.einsum("bkht,bktc->bkhc", p, vz[:, :, t])
      pv = pv + np.repeat(z, G, axis=3)
      new_acc = acc[:, :, s] * corr[..., None] + pv
      acc[:, :, s] = np.where(active[..., None], new_acc, acc[:, :, s])
      l[:, :, s] = np.where(active, l[:, :, s] * corr + p.sum(-1), l[:, :, s])
      m[:, :, s] = np.where(active, m_new, m[:, :, s])
  w = np.exp(m - m.max(2, keepdims=True))
  return np.sum(w[..., None] * acc, 2) / np.sum(w * l, 2)[..., None]


def attribution(B=2, K=2, C=1024, n_valid=(1024, 480), splits=2):
  """int8's error against exact attention, and with only the query or only the
  probabilities rounded to int8 (the mirror, float64 numpy)."""
  x = make(B, K, C)
  want = exact(x, n_valid)
  return {"both": rel(mirror(x, n_valid, splits, "int8"), want),
          "query_only": rel(mirror(x, n_valid, splits, "exact", "int8"), want),
          "probabilities_only": rel(mirror(x, n_valid, splits, "int8", "exact"), want)}


def check(mode: str, asm: bool, interpret: bool, B=2, K=2, C=2048, n_valid=(2048, 992), splits=2,
          **opts):
  """The prototype against its mirror and exact attention, main's kernel against exact."""
  x = make(B, K, C)
  got = da.merge_partials(*kernel.partials(*prototype_args(x, n_valid, mode), splits=splits,
                                           mode=mode, asm=asm, interpret=interpret,
                                           **opts))[0]
  main = da.merge_partials(*da.quantized_decode_partials(
      *main_args(x, n_valid), k_bits=2, v_bits=2, group_size=G, interpret=interpret))[0]
  want = exact(x, n_valid)
  return {"vs_mirror": rel(got, mirror(x, n_valid, splits, mode)), "vs_exact": rel(got, want),
          "main_vs_exact": rel(main[:, :, :H], want)}


if __name__ == "__main__":
  jax.config.update("jax_platforms", "cpu")
  for mode in ("int8", "bf16"):
    print(mode, check(mode, asm=False, interpret=True, C=1024, n_valid=(1024, 480)))
  print("int8 error by fold", attribution())
