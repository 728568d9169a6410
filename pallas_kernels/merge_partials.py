"""The decode attention's last merge as one Pallas (Triton) GPU kernel: the pair
kernel's per-split partials and the ring kernel's per-tile partials, read where
the two kernels wrote them, merged by log-sum-exp into the output rows.

XLA makes about five small kernels of the same merge (the splits' transpose and
sum, the concatenation with the ring's partials, the second merge, the output's
convert: 8 us of a 126-us call at P1's 32k on an H100, and a launch each;
`benchmarks/NOTES.md`, "The glue around the kernels").

One program per (row, kv head); `rows` query rows, a power of two that divides
both kernels' padded rows (each kernel's first `rows` rows are read: no slice in
XLA). Shapes (S splits, N ring tiles, R and R2 the kernels' padded rows):
  o_blk   [B, K, S, D, R]  float32   the pair kernel's O^T (one row: [B, K, S, D, 1])
  m_blk, l_blk [B, K, S, R']        (R' >= rows; the folded kernel's 8 columns)
  acc     [B, K, N, R2, D] float32   the ring kernel's partials
  m, l    [B, K, N, R2]
Returns `[B, K, rows, D]` in `dtype`: sum of every partial's `exp(m - M) acc`
over the sum of its `exp(m - M) l` (M the largest `m`), 0 where every `l` is 0.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from kivi_jax.pallas_kernels.decode_attention import pallas_call


def _kernel(o_ref, mb_ref, lb_ref, acc_ref, mr_ref, lr_ref, out_ref, *, splits: int,
            tiles: int):
  rows, d = out_ref.shape
  m_all = functools.reduce(jnp.maximum, [mb_ref[s] for s in range(splits)]
                           + [mr_ref[n] for n in range(tiles)])  # [rows]
  acc = jnp.zeros((rows, d), jnp.float32)
  l_all = jnp.zeros((rows,), jnp.float32)
  for s in range(splits):
    w = jnp.exp(mb_ref[s] - m_all)
    acc += w[:, None] * o_ref[s].T
    l_all += w * lb_ref[s]
  for n in range(tiles):
    w = jnp.exp(mr_ref[n] - m_all)
    acc += w[:, None] * acc_ref[n]
    l_all += w * lr_ref[n]
  out_ref[...] = (acc / jnp.where(l_all > 0, l_all, 1.0)[:, None]).astype(out_ref.dtype)


@functools.partial(jax.jit, static_argnames=("rows", "dtype", "interpret"))
def merge_block_and_ring(o_blk, m_blk, l_blk, acc, m, l, *, rows: int, dtype,
                         interpret: bool = False):
  """The merged output `[B, K, rows, D]` in `dtype` (module docstring)."""
  b, kh, splits, d, r = o_blk.shape
  tiles, r2 = acc.shape[2], acc.shape[3]
  if rows & (rows - 1) or r % rows or r2 % rows or m_blk.shape[-1] % rows:
    raise ValueError(f"rows ({rows}) must be a power of two dividing the partials' rows "
                     f"(block {r}, its maxima {m_blk.shape[-1]}, ring {r2})")
  if acc.shape != (b, kh, tiles, r2, d):
    raise ValueError(f"the ring's partials must be [B, K, N, R, D] = [{b}, {kh}, N, R, {d}], "
                     f"got {acc.shape}")
  spec = lambda *shape: pl.BlockSpec(  # noqa: E731
      (None, None, *shape), lambda i, h: (i, h, *(0,) * len(shape)))
  return pallas_call(
      functools.partial(_kernel, splits=splits, tiles=tiles),
      [o_blk, m_blk, l_blk, acc, m, l],
      [spec(splits, d, rows), spec(splits, rows), spec(splits, rows), spec(tiles, rows, d),
       spec(tiles, rows), spec(tiles, rows)],
      spec(rows, d), jax.ShapeDtypeStruct((b, kh, rows, d), dtype),
      grid=(b, kh), poison=False, num_warps=4, num_stages=1, interpret=interpret,
      name="kivi_merge_partials")
