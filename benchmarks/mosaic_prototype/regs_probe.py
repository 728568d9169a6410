"""Probe for NOTES.md "BitDecoding, read": one tile of 2-bit decode attention on
Hopper with the cache as `wgmma`'s A operand, unpacked in registers (no
shared-memory store of codes), exact.

Keys packed along channels with stride 8: word j (0..7) of a token holds channel
j + 8t at bits 2t (t = 0..15). Loaded as uint32 [64 tokens, 8] in the WGMMA
layout, a thread holds words 2(l%4) and 2(l%4)+1 of its two rows, the codes of
exactly the channels its A fragments take. Pallas's Mosaic GPU lowering has no
register concatenation, so the words and the words shifted right by 2 pass once
through shared memory side by side, as uint32 [64, 16]: then k-step s is
`((w16 >> 4s) & 3)` as bf16, column c = channel 16s + c, and
  S^T [64 tokens, N] = sum_s A_s Q^T[16s:16s+16]       (Q^T in shared memory)
The softmax runs down S^T's columns (over the tile's tokens, across the four
warps), P^T goes to shared memory in bf16, and values packed along tokens with
stride 8 (word j of a channel: token j + 8t at bits 2t) are the A operand of
  O^T [64 channels, N] = sum_s B_s P^T[16s:16s+16]     (4 k-steps: 64 tokens)
No scales yet: the codes are the keys and values.

  python benchmarks/mosaic_prototype/regs_probe.py         # lowers; on a GPU also checks
  python benchmarks/mosaic_prototype/regs_probe.py mlir    # the thread-level module
"""
import sys

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

WG = plgpu.Layout.WGMMA
N = 16  # query rows (a GQA group's, padded)


def tiled(shape, dt, tile, swz):
  return plgpu.SMEM(shape, dt, transforms=(plgpu.TilingTransform(tile),
                                           plgpu.SwizzleTransform(swz)))


def unpacked(words_smem, pairs_smem):
  """The words [64, 8] beside themselves shifted right by 2, as [64, 16]."""
  w = plgpu.load(words_smem, (), layout=WG, optimized=False)
  pairs_smem[:, pl.ds(0, 8)] = w
  pairs_smem[:, pl.ds(8, 8)] = w >> 2
  return plgpu.load(pairs_smem, (), layout=WG, optimized=False)


def body(kw_ref, q_ref, vw_ref, o_ref, kw_smem, k16_smem, q_smem, vw_smem, v16_smem,
         p_smem, bar):
  for src, dst in ((kw_ref, kw_smem), (q_ref, q_smem), (vw_ref, vw_smem)):
    plgpu.copy_gmem_to_smem(src, dst, bar)
  plgpu.barrier_wait(bar)
  k16 = unpacked(kw_smem, k16_smem)

  def scores(acc_ref):
    for s in range(8):
      a = ((k16 >> (4 * s)) & 3).astype(jnp.bfloat16)
      plgpu.wgmma(acc_ref, a, plgpu.transpose_ref(q_smem.at[:, pl.ds(16 * s, 16)], (1, 0)))
    return acc_ref[...]
  st = pl.run_scoped(scores, plgpu.ACC((64, N), jnp.float32))  # [64 tokens, N]
  m = jnp.max(st, axis=0)
  p = jnp.exp(st - jax.lax.broadcast_in_dim(m, st.shape, (1,)))
  l = jnp.sum(p, axis=0)
  p_smem[...] = p.astype(jnp.bfloat16)
  plgpu.commit_smem()
  v16 = unpacked(vw_smem, v16_smem)

  def values(acc_ref):
    for s in range(4):
      a = ((v16 >> (4 * s)) & 3).astype(jnp.bfloat16)
      plgpu.wgmma(acc_ref, a, p_smem.at[pl.ds(16 * s, 16), :])
    return acc_ref[...]
  ot = pl.run_scoped(values, plgpu.ACC((64, N), jnp.float32))  # [64 channels, N]
  o_ref[...] = ot / jax.lax.broadcast_in_dim(l, ot.shape, (1,))


f = plgpu.kernel(body, out_type=jax.ShapeDtypeStruct((64, N), jnp.float32),
                 scratch_types=[plgpu.SMEM((64, 8), jnp.uint32),
                                plgpu.SMEM((64, 16), jnp.uint32),
                                tiled((N, 128), jnp.bfloat16, (8, 16), 32),
                                plgpu.SMEM((64, 8), jnp.uint32),
                                plgpu.SMEM((64, 16), jnp.uint32),
                                tiled((64, N), jnp.bfloat16, (8, 16), 32),
                                plgpu.Barrier(num_arrivals=3)])
ARGS = (jax.ShapeDtypeStruct((64, 8), jnp.uint32), jax.ShapeDtypeStruct((N, 128), jnp.bfloat16),
        jax.ShapeDtypeStruct((64, 8), jnp.uint32))


def codes(w: np.ndarray, n: int) -> np.ndarray:
  """The first `n` codes of each row of words: word j holds j + 8t at bits 2t."""
  out = np.zeros((w.shape[0], 128), np.int64)
  for j in range(8):
    for t in range(16):
      out[:, j + 8 * t] = (w[:, j] >> (2 * t)) & 3
  return out[:, :n]


def reference(kw, q, vw) -> np.ndarray:
  """O^T [64 channels, N] in float64, the probabilities rounded to bf16 as the
  kernel feeds them to the second product."""
  st = codes(kw, 128).astype(np.float64) @ np.asarray(q, np.float64).T  # [64, N]
  p = np.exp(st - st.max(0))
  p16 = np.asarray(jnp.asarray(p, jnp.float32).astype(jnp.bfloat16), np.float64)
  return codes(vw, 64).astype(np.float64) @ p16 / p.sum(0)


def thread_level_module(args) -> str:
  """The kernel's module as Pallas lowers it (after Mosaic GPU's layouts are
  resolved to per-thread registers), captured on the way to the custom call."""
  from jax._src.pallas.mosaic_gpu import pallas_call_registration as registration
  lower = registration.lowering.lower_pipelined_jaxpr_to_module
  modules = []

  def capture(*a, **k):
    result = lower(*a, **k)
    modules.append(str(result.module.operation))
    return result
  registration.lowering.lower_pipelined_jaxpr_to_module = capture
  try:
    jax.jit(f).trace(*args).lower(lowering_platforms=("cuda",))
  finally:
    registration.lowering.lower_pipelined_jaxpr_to_module = lower
  return modules[0]


if __name__ == "__main__":
  if sys.argv[1:] == ["mlir"]:
    print(thread_level_module(ARGS))
    sys.exit()
  txt = jax.jit(f).trace(*ARGS).lower(lowering_platforms=("cuda",)).as_text()
  print("lowered", len(txt))
  if jax.devices()[0].platform == "gpu":
    rng = np.random.default_rng(0)
    kw, vw = (rng.integers(0, 2**32, (64, 8), dtype=np.uint32) for _ in range(2))
    q = jnp.asarray(rng.standard_normal((N, 128)) / 8, jnp.bfloat16)
    want = reference(kw, q, vw)
    got = np.asarray(jax.jit(f)(jnp.asarray(kw), q, jnp.asarray(vw)), np.float64)
    print("largest error", np.abs(got - want).max(), "of", np.abs(want).max())
