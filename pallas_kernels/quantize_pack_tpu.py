"""Quantize-and-pack into a cache block in place: Pallas Mosaic TPU kernel.

The same function as `quantize_pack.quantize_pack` (its jnp reference,
`quantize_pack_reference`, is the specification for both): quantize
`n_tokens[b]` tokens of `x[b]` (whole groups) and write their codes, scales and
zeros into the block at token `start[b]`, in place through
`input_output_aliases`.

Laid out for the TPU: each program owns `tiles_per_program(bits)` packing blocks
(word tiles of `G` rows) of one (row, head), so that a block of its scales spans
a multiple of 8 rows (sublanes) on the channel axis, and the word tile and the
scales reach the kernel as pipelined `BlockSpec` blocks whose index comes from
the prefetched `start`. `x` is first realigned per row so that its block lines
up with the program's first token (a gather of `x`, in jnp). The program
quantizes every group slot of its tiles (static loops; tiles of the whole head
dim on the channel axis, lane-dense for D = 128, one channel group at a time on
the token axis) and keeps the stored words, scales and zeros where a slot is not being
written. A row's programs start at the span holding `start`, moved back so
that they end inside the block; where the block has fewer spans than programs,
the extra ones map to the last span and write nothing (its buffers stay as the
previous program left them).

Verified in TPU interpret mode only (no TPU was available); there `/` is IEEE
float32 division as in the reference, on a TPU it is whatever Mosaic lowers.

Shapes as in `quantize_pack`; the block capacity must be a whole number of
`tiles_per_program(bits)` packing blocks (`kivi_jax.cache.block_granularity`).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from kivi_jax.pallas_kernels.common import codes_per_word, ieee_divide, quantize_tile


def tiles_per_program(bits: float) -> int:
  """Packing blocks per program: their `w` groups per tile (one scale row
  each on the channel axis) add up to a multiple of 8 sublanes."""
  return 8 // math.gcd(codes_per_word(bits), 8)


def _kernel(start_ref, ntok_ref, x_ref, words_in, scale_in, zero_in, words_ref, scale_ref,
            zero_ref, *, bits: float, group: int, axis: str, clip: float, n_blocks: int,
            divide):
  """One program: batch row b, head h, the span of packing blocks `p` after
  the row's first (`_first_block`)."""
  g, w = group, codes_per_word(bits)
  tiles = tiles_per_program(bits)
  span = tiles * w * g  # tokens per program
  d = x_ref.shape[-1]
  cg = d if axis == "channel" else min(g, d)  # columns quantized together
  b = pl.program_id(0)
  start, n_tok = start_ref[b], ntok_ref[b]
  block = _first_block(start, span, n_blocks, pl.num_programs(2)) + pl.program_id(2)

  @pl.when(block < n_blocks)
  def _():
    first_tok = block * span
    live_lo = jnp.maximum(start, first_tok)
    live_hi = jnp.minimum(start + n_tok, first_tok + span)
    for tile in range(tiles):
      rows = slice(tile * g, (tile + 1) * g)
      for c0 in range(0, d, cg):
        cols = slice(c0, c0 + cg)
        acc = jnp.zeros((g, cg), jnp.uint32)
        for j in range(w):
          slot = tile * w + j  # group of the program's span
          tok = slot * g
          live = (first_tok + tok >= live_lo) & (first_tok + tok < live_hi)
          x = x_ref[tok:tok + g, cols].astype(jnp.float32)
          codes, scale, zero = quantize_tile(x, axis, bits, clip, scale_ref.dtype, divide)
          shift = 8 * (j // 5) if bits == 1.5 else j * bits
          mult = 3 ** (j % 5) if bits == 1.5 else 1
          acc = acc + jnp.where(live, (codes * mult) << shift, 0)
          # The output blocks start empty: every element is written, kept
          # from the input where this slot is not being written.
          if axis == "channel":
            at = (slice(slot, slot + 1), cols)
          else:
            at = (slice(tok, tok + g), slice(c0 // cg, c0 // cg + 1))
          scale_ref[at] = jnp.where(live, scale, scale_in[at])
          zero_ref[at] = jnp.where(live, zero, zero_in[at])
        # Each slot is written once, into zero bits (as the reference): adding
        # sets it, for binary fields and for ternary digits of a byte alike.
        words_ref[rows, cols] = words_in[rows, cols] + acc


def _first_block(start, span: int, n_blocks: int, programs):
  """The span holding `start`, moved back where fewer than `programs` spans
  follow it (runs at the end of the block, or past it), so that programs stay
  inside the block: only where a row has fewer spans than programs do the last
  ones fall past it (and map to the last span)."""
  return jnp.clip(start // span, 0, jnp.maximum(n_blocks - programs, 0))


@functools.partial(jax.jit, static_argnames=("bits", "group_size", "axis", "clip",
                                             "interpret"))
def quantize_pack(x, words, scale, zero, start, n_tokens, *, bits: float, group_size: int,
                  axis: str, clip: float = 1.0, interpret=False):
  """Quantizes `x` and writes it into the block in place (module docstring).

  Returns the new `(words, scale, zero)`, aliased to the inputs. `interpret`:
  False on a TPU, or `pltpu.InterpretParams(...)` / True elsewhere.
  """
  b, h, n, d = x.shape
  g, w = group_size, codes_per_word(bits)
  if n % g:
    raise ValueError(f"x has {n} tokens, not a multiple of group_size={g}")
  span = tiles_per_program(bits) * w * g
  capacity = words.shape[2] * w
  if capacity % span:
    raise ValueError(f"block capacity {capacity} is not a multiple of {span} tokens "
                     f"({tiles_per_program(bits)} packing blocks of {w * g})")
  start = start.astype(jnp.int32)
  n_tokens = jnp.clip(jnp.minimum(n_tokens.astype(jnp.int32), capacity - start), 0, n)
  # Programs per row: the spans a run of n tokens starting on a group boundary
  # can touch; x realigned so that program p reads x's tokens of its span.
  programs = -(-(n + span - g) // span)
  offset = start - _first_block(start, span, capacity // span, programs) * span
  idx = jnp.clip(jnp.arange(programs * span)[None, :] - offset[:, None], 0, n - 1)
  x_span = jax.vmap(lambda a, i: a[:, i])(x, idx)  # [B, H, programs * span, D]

  n_blocks = capacity // span
  block = lambda i, j, p, s, _: (
      i, j, jnp.minimum(_first_block(s[i], span, n_blocks, programs) + p, n_blocks - 1), 0)
  spec = lambda rows, cols, index: pl.BlockSpec((None, None, rows, cols), index)
  scale_rows = span // g if axis == "channel" else span
  grid_spec = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=2,
      grid=(b, h, programs),
      in_specs=[spec(span, d, lambda i, j, p, s, _: (i, j, p, 0)),
                spec(span // w, d, block),
                spec(scale_rows, scale.shape[-1], block),
                spec(scale_rows, zero.shape[-1], block)],
      out_specs=[spec(span // w, d, block),
                 spec(scale_rows, scale.shape[-1], block),
                 spec(scale_rows, zero.shape[-1], block)],
  )
  kernel = functools.partial(_kernel, bits=bits, group=g, axis=axis, clip=clip,
                             n_blocks=n_blocks,
                             divide=ieee_divide if interpret else jnp.divide)
  return pl.pallas_call(
      kernel,
      grid_spec=grid_spec,
      out_shape=[jax.ShapeDtypeStruct(a.shape, a.dtype) for a in (words, scale, zero)],
      # Inputs count the two prefetched scalars: words, scale, zero are 3, 4, 5.
      input_output_aliases={3: 0, 4: 1, 5: 2},
      compiler_params=pltpu.CompilerParams(
          # Consecutive programs of a row may share the last block (past the
          # capacity): the span axis runs in order.
          dimension_semantics=("parallel", "parallel", "arbitrary")),
      interpret=interpret,
      name="kivi_quantize_pack_tpu",
  )(start, n_tokens, x_span, words, scale, zero)
