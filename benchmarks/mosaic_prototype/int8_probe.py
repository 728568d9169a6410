"""Probe for NOTES.md "Next": 2-bit codes unpacked four to a register into an int8
`wgmma` operand, exact.

Key words packed along channels: word i of a token holds channel 32j + 4i + b at bits
8b + 2j. So `(w >> 2j) & 0x03030303` (two instructions for four codes) gives the
four consecutive channels 32j + 4i .. + 3 in its bytes. Those u32 results are stored
into shared memory viewed as uint32 [64, 32] and read by `wgmma` as int8 [64, 128]
(a `RefUnion`, swizzle 32), times an int8 query [16, 128], into int32.

  python benchmarks/mosaic_prototype/int8_probe.py   # lowers; on a GPU also checks
"""
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

WG = plgpu.Layout.WGMMA


def tiled(shape, dt, tile, swz):
  return plgpu.SMEM(shape, dt, transforms=(plgpu.TilingTransform(tile),
                                           plgpu.SwizzleTransform(swz)))


def body(w_ref, q_ref, o_ref, w_smem, a_union, q_smem, bar):
  a_u32, a_i8 = a_union
  plgpu.copy_gmem_to_smem(w_ref, w_smem, bar)
  plgpu.copy_gmem_to_smem(q_ref, q_smem, bar)
  plgpu.barrier_wait(bar)
  w = plgpu.load(w_smem, (), layout=WG, optimized=False)
  for j in range(4):
    a_u32[:, pl.ds(8 * j, 8)] = (w >> (2 * j)) & 0x03030303
  plgpu.commit_smem()

  def mm(acc_ref):
    plgpu.wgmma(acc_ref, a_i8, plgpu.transpose_ref(q_smem, (1, 0)))
    return acc_ref[...]
  o_ref[...] = pl.run_scoped(mm, plgpu.ACC((64, 16), jnp.int32))


f = plgpu.kernel(body, out_type=jax.ShapeDtypeStruct((64, 16), jnp.int32),
                 scratch_types=[plgpu.SMEM((64, 8), jnp.uint32),
                                plgpu.RefUnion(tiled((64, 32), jnp.uint32, (8, 8), 32),
                                               tiled((64, 128), jnp.int8, (8, 32), 32)),
                                tiled((16, 128), jnp.int8, (8, 32), 32),
                                plgpu.Barrier(num_arrivals=2)])

if __name__ == "__main__":
  args = (jax.ShapeDtypeStruct((64, 8), jnp.uint32), jax.ShapeDtypeStruct((16, 128), jnp.int8))
  txt = jax.jit(f).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
  print("lowered", len(txt))
  if jax.devices()[0].platform == "gpu":
    rng = np.random.default_rng(0)
    w = rng.integers(0, 2**32, (64, 8), dtype=np.uint32)
    q = rng.integers(-128, 128, (16, 128)).astype(np.int8)
    a = np.zeros((64, 128), np.int64)
    for i in range(8):
      for j in range(4):
        for b in range(4):
          a[:, 32 * j + 4 * i + b] = (w[:, i] >> (8 * b + 2 * j)) & 3
    want = a @ q.T.astype(np.int64)
    got = np.asarray(jax.jit(f)(jnp.asarray(w), jnp.asarray(q)))
    print("exact:", np.array_equal(got, want), "max diff", np.abs(got - want).max())
