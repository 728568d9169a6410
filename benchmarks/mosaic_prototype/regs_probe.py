"""Probe for NOTES.md "BitDecoding, read": 2-bit key codes unpacked in registers
into the A operand of a bf16 `wgmma`, exact, with no shared-memory store of codes.

Keys packed along channels with stride 8: word j (0..7) of a token holds channel
j + 8t at bits 2t (t = 0..15). Loaded as uint32 [64 tokens, 8] in the WGMMA
layout, a thread holds words 2(l%4) and 2(l%4)+1 of its two rows, the codes of
exactly the channels its A fragments take. Pallas's Mosaic GPU lowering has no
register concatenation, so the words and the words shifted right by 2 go through
shared memory once, side by side, as uint32 [64, 16]: then k-step s is
`((w16 >> 4s) & 3)` as bf16, column c = channel 16s + c, and
S^T [64 tokens, N] = sum_s A_s q^T[16s:16s+16] over the 8 k-steps, with q^T
[128, N] the B operand in shared memory.

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


def body(w_ref, q_ref, o_ref, w_smem, w16_smem, q_smem, bar):
  plgpu.copy_gmem_to_smem(w_ref, w_smem, bar)
  plgpu.copy_gmem_to_smem(q_ref, q_smem, bar)
  plgpu.barrier_wait(bar)
  w = plgpu.load(w_smem, (), layout=WG, optimized=False)  # [64, 8]
  w16_smem[:, pl.ds(0, 8)] = w
  w16_smem[:, pl.ds(8, 8)] = w >> 2
  w16 = plgpu.load(w16_smem, (), layout=WG, optimized=False)  # [64, 16]

  def mm(acc_ref):
    for s in range(8):
      a = ((w16 >> (4 * s)) & 3).astype(jnp.bfloat16)
      plgpu.wgmma(acc_ref, a, plgpu.transpose_ref(q_smem.at[:, pl.ds(16 * s, 16)], (1, 0)))
    return acc_ref[...]
  o_ref[...] = pl.run_scoped(mm, plgpu.ACC((64, N), jnp.float32))


f = plgpu.kernel(body, out_type=jax.ShapeDtypeStruct((64, N), jnp.float32),
                 scratch_types=[plgpu.SMEM((64, 8), jnp.uint32),
                                plgpu.SMEM((64, 16), jnp.uint32),
                                tiled((N, 128), jnp.bfloat16, (8, 16), 32),
                                plgpu.Barrier(num_arrivals=2)])


def codes(w: np.ndarray) -> np.ndarray:
  """The [64, 128] codes the words hold (word j: channel j + 8t at bits 2t)."""
  out = np.zeros((w.shape[0], 128), np.int64)
  for j in range(8):
    for t in range(16):
      out[:, j + 8 * t] = (w[:, j] >> (2 * t)) & 3
  return out


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
  args = (jax.ShapeDtypeStruct((64, 8), jnp.uint32), jax.ShapeDtypeStruct((N, 128), jnp.bfloat16))
  if sys.argv[1:] == ["mlir"]:
    print(thread_level_module(args))
    sys.exit()
  txt = jax.jit(f).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
  print("lowered", len(txt))
  if jax.devices()[0].platform == "gpu":
    rng = np.random.default_rng(0)
    w = rng.integers(0, 2**32, (64, 8), dtype=np.uint32)
    q = jnp.asarray(rng.standard_normal((N, 128)), jnp.bfloat16)
    want = codes(w).astype(np.float64) @ np.asarray(q, np.float64).T
    got = np.asarray(jax.jit(f)(jnp.asarray(w), q), np.float64)
    print("largest error", np.abs(got - want).max(), "of", np.abs(want).max())
