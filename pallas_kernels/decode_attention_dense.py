"""Decode attention over a 16-bit block (the `fp16` preset's cache): a Pallas
(Triton) GPU kernel of flash decoding.

One program per (row, kv head, tile of `T` tokens; the last tile ends at the
block's capacity), nothing carried from one tile to the next (as
`decode_attention_mha`'s kernels, which this follows: many short programs per
SM hide each other's load latency). A program reads its tile of keys and
values once, in their own `[B, K, C, D]` layout, and writes the tile's
unnormalized partial `(acc, m, l)`; `merge_partials` merges the tiles. Tiles
past a row's last token, or before its window, load nothing.

A kv head with one query row (MHA) computes on CUDA cores in float32: scores
`sum_d q_d k_td`, values `sum_t p_t v_t` (no operand rounded). With several
rows (GQA), rows are padded to 16 and the scores and values are dots, the
probabilities rounded to the values' dtype for the second (as cuDNN's).

Shapes (B batch, K kv heads, M query rows, D head dim, C block capacity):
  q        [B, K, M, D]   M = 1, or padded to a multiple of 16
  k, v     [B, K, C, D]   the model's dtype (float32 for tests)
  n_valid  [B] int32: live tokens per row (tokens `lo <= t < n_valid`)
  lo       [B] int32: first visible token (sliding window; 0 for none)
Returns `(o [B, K, M, D], lse [B, K, M])` float32, as
`decode_attention.quantized_decode_attention`.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from kivi_jax.pallas_kernels.common import MASK_VALUE as _NEG
from kivi_jax.pallas_kernels.decode_attention import (dot_precision, merge_partials, pallas_call,
                                                      partial_outputs)

# Tokens per program and warps: on an H200, in profiler traces, tiles of 128
# tokens at 8 warps read a batch-1 block of 32 kv heads in 8.9 us a layer,
# tiles of 64 at 4 warps in 20.9, cuDNN in 12.4 with its reduction
# (benchmarks/NOTES.md, "A kernel for the 16-bit block").
TILE_TOKENS = 128
NUM_WARPS = 8
# The kernel's tiles are powers of two of at least 16 tokens (Triton's shapes).
MIN_CAPACITY = 16


def _kernel(q_ref, k_ref, v_ref, n_ref, lo_ref, acc_ref, m_ref, l_ref, *, tile: int,
            sm_scale: float):
  j = pl.program_id(2)
  c = k_ref.shape[0]
  rows = q_ref.shape[0]
  precision = dot_precision(k_ref.dtype)
  n, lo = n_ref[0], lo_ref[0]
  live = (j * tile < n) & ((j + 1) * tile > lo)

  @pl.when(live)
  def _():
    # The last tile ends at the capacity, overlapping the one before where
    # the capacity is not a multiple of the tile; each token counts in the
    # tile `t // tile` only.
    start = jnp.minimum(j * tile, c - tile)
    tok = start + jax.lax.broadcasted_iota(jnp.int32, (1, tile), 1)
    visible = (tok >= j * tile) & (tok < n) & (tok >= lo)  # [1, T]
    k = k_ref[pl.ds(start, tile), :]
    v = v_ref[pl.ds(start, tile), :]
    if rows == 1:
      q = q_ref[...].astype(jnp.float32) * sm_scale  # [1, D]
      s = jnp.sum(k.astype(jnp.float32) * q, axis=1)[None, :]  # [1, T]
    else:
      s = jax.lax.dot_general(q_ref[...], k, (((1,), (1,)), ((), ())), precision=precision,
                              preferred_element_type=jnp.float32) * sm_scale  # [M, T]
    s = jnp.where(visible, s, _NEG)
    m = jnp.max(s, axis=1)  # [M]
    p = jnp.where(visible, jnp.exp(s - m[:, None]), 0.0)
    if rows == 1:
      acc = jnp.sum(p[0][:, None] * v.astype(jnp.float32), axis=0)[None, :]
    else:
      acc = jax.lax.dot_general(p.astype(v.dtype), v, (((1,), (0,)), ((), ())),
                                precision=precision, preferred_element_type=jnp.float32)
    acc_ref[...] = acc
    m_ref[...] = m
    l_ref[...] = jnp.sum(p, axis=1)

  @pl.when(~live)
  def _():
    acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)
    m_ref[...] = jnp.full(m_ref.shape, _NEG, jnp.float32)
    l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)


def tile_tokens_for(capacity: int, tile_tokens: int = TILE_TOKENS) -> int:
  """Tokens a program reads: `tile_tokens`, or the largest power of two within
  a smaller capacity."""
  return min(tile_tokens, 1 << (capacity.bit_length() - 1))


@functools.partial(jax.jit, static_argnames=("tile_tokens", "num_warps", "interpret", "poison"))
def dense_decode_partials(q, k, v, n_valid, lo, *, tile_tokens: int = TILE_TOKENS,
                          num_warps: int = NUM_WARPS, interpret: bool = False,
                          poison: bool = False):
  """Per-tile partials `(acc [B, K, N, M, D], m [B, K, N, M], l [B, K, N, M])`
  over the block's `N = ceil(C / T)` tiles (module docstring). With `poison`,
  the outputs start as NaN, so an element the kernel fails to write shows."""
  b, kh, m_rows, d = q.shape
  c = k.shape[2]
  if k.shape != (b, kh, c, d) or v.shape != k.shape:
    raise ValueError(f"k and v must be [B, K, C, D] = [{b}, {kh}, C, {d}] "
                     f"(got k {k.shape}, v {v.shape})")
  if m_rows > 1 and m_rows % 16:
    raise ValueError(f"q's rows are padded to a multiple of 16 for the kernel's dots (got "
                     f"{m_rows} rows)")
  if c < MIN_CAPACITY:
    raise ValueError(f"the block must hold at least {MIN_CAPACITY} tokens (got {c})")
  t = tile_tokens_for(c, tile_tokens)
  rows = [n_valid.astype(jnp.int32), lo.astype(jnp.int32)]
  row = pl.BlockSpec((1,), lambda i, h, j: (i,))
  whole = pl.BlockSpec((None, None, c, d), lambda i, h, j: (i, h, 0, 0))
  n_tiles = -(-c // t)
  return pallas_call(
      functools.partial(_kernel, tile=t, sm_scale=1.0 / math.sqrt(d)),
      [q, k, v, *rows],
      [pl.BlockSpec((None, None, m_rows, d), lambda i, h, j: (i, h, 0, 0)), whole, whole,
       row, row],
      *partial_outputs(b, kh, n_tiles, m_rows, d),
      grid=(b, kh, n_tiles), poison=poison, num_warps=num_warps, num_stages=1,
      interpret=interpret, name="kivi_dense_decode")


def dense_decode_attention(q, k, v, n_valid, lo, **kwargs):
  """Attention of `q` `[B, K, M, D]` over the 16-bit block: `(o, lse)` (module
  docstring)."""
  return merge_partials(*dense_decode_partials(q, k, v, n_valid, lo, **kwargs))
