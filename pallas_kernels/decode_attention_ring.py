"""Attention of one decode query over a layer's full-precision tokens: the ring
and the group the step flushed (a Pallas (Triton) GPU kernel).

One program per (row, kv head, tile of up to `T` tokens of either part)
reads its tile of keys and values once and writes the tile's unnormalized
partial `(acc, m, l)` (a tile with no visible token, as the flushed group's at
a step that flushes none, loads nothing and writes the empty partial: 0.12 ms
of a Llama-2-7B batch-32 step); nothing is carried from one tile to the next (as
`decode_attention_mha`'s kernels: many short programs per SM hide each other's
load latency, and a tile's float32 products fit in registers). The tiles'
partials are merged with the block's by `merge_partials` (`kivi_jax.attention`
reads the parts in jnp elsewhere: two reductions over each, about 2 TB/s on an
H200 where this kernel reads 3).
Keys are cached after RoPE (KIVI's layout): no rotation here.

A kv head with one query row computes on CUDA cores in float32; with several,
rows are padded to 16 and the scores and values are dots (the probabilities
rounded to the values' dtype for the second).

Shapes (B batch, K kv heads, M query rows, D head dim):
  q                 [B, K, M, D]   M = 1, or padded to a multiple of 16
  ring_k, ring_v    [B, K, R, D]
  flush_k, flush_v  [B, K, F, D]
  ring_live         [B, R] int32, 1 where the slot holds a visible token
  flush_live        [B, F] int32, the same for the flushed group
Returns `(acc [B, K, N, M, D], m [B, K, N, M], l [B, K, N, M])` float32 over
the `N = R / min(T, R) + F / min(T, F)` tiles, the ring's first.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from kivi_jax.pallas_kernels.common import MASK_VALUE as _NEG
from kivi_jax.pallas_kernels.decode_attention import dot_precision, pallas_call, partial_outputs

# Tokens and warps per program, of a sweep in the whole decode step on an H200
# (KIVI-2, 1280 cached tokens, benchmarks/NOTES.md "The ring in a kernel"):
# one query row (MHA) 128 tokens and 8 warps (0.89 ms a step at batch 32,
# 1.69 at 32 and 4); several rows (GQA) 32 and 4.
ONE_ROW_TILING = (128, 8)
ROWS_TILING = (32, 4)


def _scores(q_ref, k, sm_scale: float):
  if q_ref.shape[0] == 1:
    q = q_ref[...].astype(jnp.float32) * sm_scale  # [1, D]
    return jnp.sum(k.astype(jnp.float32) * q, axis=1)[None, :]  # [1, T]
  return jax.lax.dot_general(q_ref[...], k, (((1,), (1,)), ((), ())),
                             precision=dot_precision(k.dtype),
                             preferred_element_type=jnp.float32) * sm_scale  # [M, T]


def _values(p, v):
  if p.shape[0] == 1:
    return jnp.sum(p[0][:, None] * v.astype(jnp.float32), axis=0)[None, :]  # [1, D]
  return jax.lax.dot_general(p.astype(v.dtype), v, (((1,), (0,)), ((), ())),
                             precision=dot_precision(v.dtype),
                             preferred_element_type=jnp.float32)  # [M, D]


def _kernel(q_ref, rk_ref, rv_ref, fk_ref, fv_ref, rlive_ref, flive_ref, tlive_ref, acc_ref,
            m_ref, l_ref, *, ring_tile: int, flush_tile: int, ring_tiles: int,
            sm_scale: float):
  j = pl.program_id(2)
  # A tile with no visible token loads nothing (the flushed group's, at every
  # step that flushes none).
  tile_live = tlive_ref[0, 0] > 0

  def tile_partial(k_ref, v_ref, live_ref, tile, start):
    at = pl.ds(pl.multiple_of(start, tile), tile)
    live = live_ref[:, at] > 0  # [1, T]
    # A dead slot's key and value are not read: after each flush the ring's
    # window of G slots holds up to G - 1 (an eighth of the ring's bytes on
    # average at R = 128, G = 32).
    rows = jnp.broadcast_to(live.reshape(tile, 1), (tile, k_ref.shape[1]))
    k = pltriton.load(k_ref.at[at, :], mask=rows, other=0)
    v = pltriton.load(v_ref.at[at, :], mask=rows, other=0)
    s = jnp.where(live, _scores(q_ref, k, sm_scale), _NEG)
    m = jnp.max(s, axis=1)  # [M]
    p = jnp.where(live, jnp.exp(s - m[:, None]), 0.0)
    acc_ref[...] = _values(p, v)
    m_ref[...] = m
    l_ref[...] = jnp.sum(p, axis=1)

  @pl.when(tile_live & (j < ring_tiles))
  def _():
    tile_partial(rk_ref, rv_ref, rlive_ref, ring_tile, j * ring_tile)

  @pl.when(tile_live & (j >= ring_tiles))
  def _():
    tile_partial(fk_ref, fv_ref, flive_ref, flush_tile, (j - ring_tiles) * flush_tile)

  @pl.when(~tile_live)
  def _():
    acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)
    m_ref[...] = jnp.full(m_ref.shape, _NEG, jnp.float32)
    l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)


@functools.partial(jax.jit, static_argnames=("tile_tokens", "num_warps", "interpret", "poison"))
def ring_partials(q, ring_k, ring_v, flush_k, flush_v, ring_live, flush_live, *,
                  tile_tokens: int | None = None, num_warps: int | None = None,
                  interpret: bool = False, poison: bool = False):
  """The ring's and flushed group's per-tile partials `(acc, m, l)` (module
  docstring), in tiles of `min(tile_tokens, R)` and `min(tile_tokens, F)`
  tokens (by default `ONE_ROW_TILING` or `ROWS_TILING`). With `poison`, the
  outputs start as NaN, so an element the kernel fails to write shows."""
  b, kh, m_rows, d = q.shape
  tiling = ONE_ROW_TILING if m_rows == 1 else ROWS_TILING
  tile_tokens = tiling[0] if tile_tokens is None else tile_tokens
  num_warps = tiling[1] if num_warps is None else num_warps
  r, f = ring_k.shape[2], flush_k.shape[2]
  for name, x, t in (("ring_k", ring_k, r), ("ring_v", ring_v, r), ("flush_k", flush_k, f),
                     ("flush_v", flush_v, f)):
    if x.shape != (b, kh, t, d):
      raise ValueError(f"{name} must be [B, K, T, D] = [{b}, {kh}, T, {d}] (got {x.shape})")
  if m_rows > 1 and m_rows % 16:
    raise ValueError(f"q's rows are padded to a multiple of 16 for the kernel's dots (got "
                     f"{m_rows} rows)")
  for name, t in (("ring", r), ("flushed group", f), ("tile_tokens", tile_tokens)):
    if t < 16 or t & (t - 1):
      raise ValueError(f"the {name} must hold a power of two of at least 16 tokens (got {t})")
  tr, tf = min(tile_tokens, r), min(tile_tokens, f)
  n = r // tr + f // tf
  tiles_live = jnp.concatenate([ring_live.reshape(b, r // tr, tr).any(-1),
                                flush_live.reshape(b, f // tf, tf).any(-1)], 1)
  whole = lambda c: pl.BlockSpec((None, None, c, d), lambda i, h, j: (i, h, 0, 0))  # noqa: E731
  live = lambda c: pl.BlockSpec((1, c), lambda i, h, j: (i, 0))  # noqa: E731
  return pallas_call(
      functools.partial(_kernel, ring_tile=tr, flush_tile=tf, ring_tiles=r // tr,
                        sm_scale=1.0 / math.sqrt(d)),
      [q, ring_k, ring_v, flush_k, flush_v, ring_live.astype(jnp.int32),
       flush_live.astype(jnp.int32), tiles_live.astype(jnp.int32)],
      [pl.BlockSpec((None, None, m_rows, d), lambda i, h, j: (i, h, 0, 0)), whole(r),
       whole(r), whole(f), whole(f), live(r), live(f),
       pl.BlockSpec((1, 1), lambda i, h, j: (i, j))],
      *partial_outputs(b, kh, n, m_rows, d),
      grid=(b, kh, n), poison=poison, num_warps=num_warps, num_stages=1, interpret=interpret,
      name="kivi_ring_attention")
