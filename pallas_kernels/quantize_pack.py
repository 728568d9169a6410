"""Quantize-and-pack into a cache block in place: Pallas (Triton) GPU kernel + reference.

A ring flush (one group of `G` tokens per row in a decode step) and a
prefill's bulk quantization are the same operation: quantize `n_tokens[b]`
tokens of `x[b]` (whole groups) and write their codes, scales and zeros into
the block at token `start[b]` (a multiple of `G`). Codes go into group slots
(`kivi_jax.quantization.pack`): slot `j` of a `G`-row word tile holds the group
`j` groups after the tile's first, so one flushed group touches `G` word rows
and shares them with up to `w - 1` other groups, older or newer.

The kernel gives each program one word tile (one packing block of `w * G`
tokens) of one (row, head): it quantizes every flushed group that lands in the
tile, column block by column block, ORs their slots into the tile's other
slots, and writes the tile, scales and zeros back through
`input_output_aliases`, so under `jit` with the cache donated nothing is
copied. One owner per tile means no two programs write the same word.

`quantize_pack_pairs` writes a block in the pair layout
(`kivi_jax.quantization.pair_pack`; `quantize_pack_pairs_reference` in jnp): one
program per (row, head, group) for the keys (axis "channel"), packed along
each token's channels, a word row per token; per (row, head, 128-token span
touched) for the values (axis "token"), packed along each channel's tokens, so
a flushed group shares its span's words with the span's other groups and is
ORed into them.

Shapes (B batch, H heads, n tokens offered, D channels, C block capacity):
  x               [B, H, n, D]      model dtype; n a multiple of G
  words           [B, H, C/w, D]    uint32
  scale, zero     [B, H, C/G, D] (axis "channel") or [B, H, C, D/min(G, D)]
                  (axis "token"), in the cache's scale dtype
  start, n_tokens [B] int32, multiples of G; tokens past the capacity are dropped
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from kivi_jax.pallas_kernels.common import PAIR_SPAN as SPAN
from kivi_jax.pallas_kernels.common import codes_per_word, ieee_divide, ptx_f32, quantize_tile


def _slot_place(slot, bits: float, width: int):
  """`(multiplier, shift)`, uint32 `[1, width]`, that put a code in word slot
  `slot` (`kivi_jax.quantization.slot_fields`). Computed on a broadcast row, as
  the decode kernel unpacks: on scalars jnp's `%` lowers to a select Triton
  refuses."""
  slot = slot + jnp.zeros((1, width), jnp.int32)
  if bits == 1.5:
    digit = slot % 5
    mult = jnp.where(digit == 0, 1, jnp.where(digit == 1, 3, jnp.where(
        digit == 2, 9, jnp.where(digit == 3, 27, 81))))
    return mult.astype(jnp.uint32), (8 * (slot // 5)).astype(jnp.uint32)
  return jnp.ones((1, width), jnp.uint32), (slot * bits).astype(jnp.uint32)


def _divide(a, b, interpret: bool):
  """`a / b` in float32, correctly rounded as in the reference. Triton's `/`
  is an approximate division (up to 2 ulp), which moved codes by one level at
  near-ties on an H100; compiled, this is `div.rn.f32`. In interpret mode XLA
  divides (`ieee_divide`)."""
  if interpret:
    return ieee_divide(a, b)
  return ptx_f32("div.rn.f32 $0, $1, $2;", a, b)


def _kernel(x_ref, start_ref, ntok_ref, words_in, scale_in, zero_in, words_ref, scale_ref,
            zero_ref, *, bits: float, group: int, axis: str, clip: float,
            col_block: int, interpret: bool):
  del scale_in, zero_in  # aliased with scale_ref, zero_ref, written whole-group
  g = group
  w = codes_per_word(bits)
  n, d = x_ref.shape
  start, n_tok = start_ref[0], ntok_ref[0]
  tile = start // (w * g) + pl.program_id(2)  # packing block of this program
  first_tok = tile * w * g
  live_lo = jnp.maximum(start, first_tok)
  live_hi = jnp.minimum(start + n_tok, first_tok + w * g)

  @pl.when(live_lo < live_hi)
  def _():
    rows = pl.ds(pl.multiple_of(tile * g, g), g)
    for c0 in range(0, d, col_block):
      cols = pl.ds(c0, col_block)

      def slot(j, acc):
        tok0 = first_tok + j * g
        x = x_ref[pl.ds(pl.multiple_of(tok0 - start, g), g), cols].astype(jnp.float32)
        codes, scale, zero = quantize_tile(x, axis, bits, clip, scale_ref.dtype,
                                           functools.partial(_divide, interpret=interpret))
        if axis == "channel":
          scale_ref[tok0 // g, cols] = scale[0]
          zero_ref[tok0 // g, cols] = zero[0]
        else:
          scale_ref[pl.ds(tok0, g), c0 // col_block] = scale[:, 0]
          zero_ref[pl.ds(tok0, g), c0 // col_block] = zero[:, 0]
        mult, shift = _slot_place(j, bits, col_block)
        return acc + ((codes * mult) << shift)

      # Only the slots being written: a decode step's flush is one group.
      acc = jax.lax.fori_loop((live_lo - first_tok) // g, (live_hi - first_tok) // g, slot,
                              jnp.zeros((g, col_block), jnp.uint32))
      # Each slot is written once, into zero bits (as the reference): adding
      # sets it, for binary fields and for ternary digits of a byte alike.
      words_ref[rows, cols] = words_in[rows, cols] + acc


@functools.partial(jax.jit, static_argnames=(
    "bits", "group_size", "axis", "clip", "num_warps", "interpret"))
def quantize_pack(x, words, scale, zero, start, n_tokens, *, bits: float, group_size: int,
                  axis: str, clip: float = 1.0, num_warps: int = 4,
                  interpret: bool = False):
  """Quantizes `x` and writes it into the block in place (module docstring).

  Returns the new `(words, scale, zero)`, aliased to the inputs: inside a jit
  that donates them (as `generate` donates the cache) they are updated in place.
  """
  n, d = x.shape[2:]
  g, w = group_size, codes_per_word(bits)
  if n % g:
    raise ValueError(f"x has {n} tokens, not a multiple of group_size={g}")
  # Programs per row: the packing blocks a run of n tokens starting on a group
  # boundary can touch.
  tiles = -(-(n + w * g - g) // (w * g))
  col_block = min(g, d) if axis == "token" else min(32, d)
  kernel = functools.partial(_kernel, bits=bits, group=g, axis=axis, clip=clip,
                             col_block=col_block, interpret=interpret)
  return _write_in_place(kernel, x, words, scale, zero, start, n_tokens, words.shape[2] * w,
                         tiles, num_warps=num_warps, interpret=interpret,
                         name="kivi_quantize_pack")


def _write_in_place(kernel, x, words, scale, zero, start, n_tokens, capacity: int,
                    programs: int, *, num_warps: int, interpret: bool, name: str):
  """`kernel` over the grid (B, H, `programs`), each program seeing its (row,
  head)'s slab of every array, `words`, `scale`, `zero` written in place
  (`input_output_aliases`). Tokens past `capacity` are dropped (as the
  references' scatters drop them)."""
  start = start.astype(jnp.int32)
  n_tokens = jnp.clip(jnp.minimum(n_tokens.astype(jnp.int32), capacity - start), 0,
                      x.shape[2])
  slab = lambda a: pl.BlockSpec((None, None, *a.shape[2:]), lambda i, j, t: (i, j, 0, 0))
  row = pl.BlockSpec((1,), lambda i, j, t: (i,))
  return pl.pallas_call(
      kernel,
      grid=(*x.shape[:2], programs),
      in_specs=[slab(x), row, row, slab(words), slab(scale), slab(zero)],
      out_specs=[slab(words), slab(scale), slab(zero)],
      out_shape=[jax.ShapeDtypeStruct(a.shape, a.dtype) for a in (words, scale, zero)],
      input_output_aliases={3: 0, 4: 1, 5: 2},
      compiler_params=pltriton.CompilerParams(num_warps=num_warps),
      interpret=interpret,
      name=name,
  )(x, start, n_tokens, words, scale, zero)


def _pair_places(col, bits: int, width: int = SPAN):
  """`(word, shift)` int32 of columns `col` (int32, any shape) of a 128-column
  span in the pair layout: column `16 s + 8 h + 2 j + e` sits in word
  `8 (s // p) + 2 j + h` at bit `b (s % p) + 16 e` (`p = 16 / b`); of a row of
  `width` 64 columns: column `8 t + 2 j + e` in word `4 (t // p) + j` at bit
  `b (t % p) + 16 e`. Bit operations only (Triton takes no `%` of a scalar)."""
  lg = {2: 3, 4: 2, 8: 1}[bits]  # log2(p)
  c = col & (width - 1)
  if width == SPAN // 2:
    t, j, e = c >> 3, (c >> 1) & 3, c & 1
    return ((t >> lg) << 2) + j, bits * (t & ((1 << lg) - 1)) + 16 * e
  s, h, j, e = c >> 4, (c >> 3) & 1, (c >> 1) & 3, c & 1
  return ((s >> lg) << 3) + 2 * j + h, bits * (s & ((1 << lg) - 1)) + 16 * e


def _channel_words(placed, word, n_words: int):
  """The words `[C, n_words]` of value codes `placed` `[T, C]` (T tokens of C
  channels, shifted into their fields) summed over the tokens where `word`
  (`[T, 1]`) names them: fields are disjoint, so the sum is their OR. Masked
  reductions: a group's tokens fill a span's words at a place that depends on
  where the group starts."""
  col = jax.lax.broadcasted_iota(jnp.int32, (placed.shape[1], n_words), 1)
  out = jnp.zeros((placed.shape[1], n_words), jnp.uint32)
  for w in range(n_words):
    red = jnp.sum(jnp.where(word == w, placed, jnp.uint32(0)), axis=0)
    out = jnp.where(col == w, red[:, None], out)
  return out


def _key_row_words(placed, bits: int):
  """The pair layout's word rows `[g, d b/32]` of key codes `placed` `[g, d]`
  (uint32, each shifted into its field by `_pair_places`), by reshapes and sums
  (fields are disjoint: the sum is their OR). Of 128 columns, column
  `16 (p sq + sr) + 8 h + 2 j + e` goes to word `8 sq + 2 j + h`: the `p` codes
  `sr` of a 16-bit half summed, then the halves `e`, then `(h, j)` reordered
  to `(j, h)`. Of a 64-column row, column `8 (p tq + tr) + 2 j + e` goes to
  word `4 tq + j`: no reorder."""
  g, d = placed.shape
  p = 16 // bits
  if d == SPAN // 2:
    r = placed.reshape(g * d // (8 * p), p, 8).sum(axis=1)  # [., (j, e)]
    return r.reshape(-1, 4, 2).sum(axis=2).reshape(g, d * bits // 32)
  r = placed.reshape(g * d // (16 * p), p, 16).sum(axis=1)  # [., (h, j, e)]
  r = r.reshape(-1, 2, 4, 2).sum(axis=3)  # [., h, j]
  return jnp.swapaxes(r, 1, 2).reshape(g, d * bits // 32)


def _pair_program_tokens(axis: str, group: int) -> int:
  """The tokens a program of `quantize_pack_pairs` writes: a 128-token span for
  the values, whose groups OR into the span's words; one group for the keys, a
  word row a token, so that a prefill's launch has a program a group. With a
  program a span the keys' writer took 107 us a launch of 2 rows x 32 heads x
  1024 tokens on an H200; a program a group takes a 64-row Llama-2-7B KIVI-2
  prefill's write kernels from 150 to 141 ms (benchmarks/NOTES.md, "Where the
  prefill's time goes")."""
  return SPAN if axis == "token" else group


def _pair_kernel(x_ref, start_ref, ntok_ref, words_in, scale_in, zero_in, words_ref,
                 scale_ref, zero_ref, *, bits: int, group: int, axis: str, clip: float,
                 interpret: bool):
  del scale_in, zero_in  # aliased with scale_ref, zero_ref, written whole-group
  g = group
  n, d = x_ref.shape
  start, n_tok = start_ref[0], ntok_ref[0]
  # This program's tokens: a span (values), a group (keys, whose groups share no word).
  run = _pair_program_tokens(axis, g)
  first_tok = (start // run + pl.program_id(2)) * run
  live_lo = jnp.maximum(start, first_tok)
  live_hi = jnp.minimum(start + n_tok, first_tok + run)
  divide = functools.partial(_divide, interpret=interpret)
  tile = lambda j, cols=slice(None): x_ref[  # noqa: E731
      pl.ds(pl.multiple_of(first_tok + j * g - start, g), g), cols]

  @pl.when(live_lo < live_hi)
  def _():
    if axis == "channel":
      # The program's group: each token's own word row, the group's rows written whole.
      _, shift = _pair_places(jax.lax.broadcasted_iota(jnp.int32, (1, d), 1), bits,
                              min(d, SPAN))
      codes, scale, zero = quantize_tile(tile(0).astype(jnp.float32), axis, bits, clip,
                                         scale_ref.dtype, divide)
      scale_ref[first_tok // g, :] = scale[0]
      zero_ref[first_tok // g, :] = zero[0]
      words_ref[pl.ds(pl.multiple_of(first_tok, g), g), :] = _key_row_words(
          codes << shift.astype(jnp.uint32), bits)
      return
    groups = ((live_lo - first_tok) // g, (live_hi - first_tok) // g)
    cg = min(g, d)
    n_words = 4 * bits  # a channel's words of the span
    cols = pl.ds(pl.multiple_of(first_tok // SPAN * n_words, n_words), n_words)
    for c0 in range(0, d, cg):  # one channel group at a time, as the scales
      def one(j, acc):
        tok0 = first_tok + j * g
        x = tile(j, pl.ds(c0, cg)).astype(jnp.float32)
        codes, scale, zero = quantize_tile(x, axis, bits, clip, scale_ref.dtype, divide)
        scale_ref[c0 // cg, pl.ds(pl.multiple_of(tok0, g), g)] = scale[:, 0]
        zero_ref[c0 // cg, pl.ds(pl.multiple_of(tok0, g), g)] = zero[:, 0]
        word, shift = _pair_places(
            tok0 + jax.lax.broadcasted_iota(jnp.int32, (g, 1), 0), bits)
        return acc + _channel_words(codes << shift.astype(jnp.uint32), word, n_words)
      acc = jax.lax.fori_loop(*groups, one, jnp.zeros((cg, n_words), jnp.uint32))
      # The span's other groups keep their fields (zeros where this one's go).
      rows = pl.ds(c0, cg)
      words_ref[rows, cols] = words_in[rows, cols] + acc


@functools.partial(jax.jit, static_argnames=(
    "bits", "group_size", "axis", "clip", "num_warps", "interpret"))
def quantize_pack_pairs(x, words, scale, zero, start, n_tokens, *, bits: int,
                        group_size: int, axis: str, clip: float = 1.0,
                        num_warps: int | None = None, interpret: bool = False):
  """`quantize_pack` into a block in the pair layout (module docstring): words
  `[B, H, C, D b/32]` (axis "channel") or `[B, H, D, C b/32]` (axis "token"),
  scale and zero `[B, H, C/G, D]` or `[B, H, D/min(G, D), C]`. Groups of at
  most 128 tokens (a span), head_dim 64 or a multiple of 128. `num_warps`
  None: 2 for the values (their full-span launches measured 0.43 ms against
  0.71 with 4 in the 512-row Llama-2-7B step on an H200), 4 for the keys."""
  n, d = x.shape[2:]
  g = group_size
  if n % g:
    raise ValueError(f"x has {n} tokens, not a multiple of group_size={g}")
  if g > SPAN or (d % SPAN and d != SPAN // 2):
    raise ValueError(f"the pair writer takes groups of at most {SPAN} tokens and a head_dim "
                     f"of {SPAN // 2} or a multiple of {SPAN}, got group_size={g}, "
                     f"head_dim={d}")
  capacity = scale.shape[-1] if axis == "token" else scale.shape[2] * g
  run = _pair_program_tokens(axis, g)
  programs = -(-(n + run - g) // run)  # runs that n tokens from a group's start touch
  kernel = functools.partial(_pair_kernel, bits=bits, group=g, axis=axis, clip=clip,
                             interpret=interpret)
  if num_warps is None:
    num_warps = 2 if axis == "token" else 4
  return _write_in_place(kernel, x, words, scale, zero, start, n_tokens, capacity, programs,
                         num_warps=num_warps, interpret=interpret,
                         name="kivi_quantize_pack_pairs")


def quantize_pack_reference(x, words, scale, zero, start, n_tokens, clip=1.0, groups=None,
                            *, bits: float, group_size: int, axis: str,
                            scales_last: bool = False):
  """The same function in plain jnp: quantize, then scatter into the block.

  Also takes SKVQ's traced `clip` and explicit channel `groups`
  (`kivi_jax.quantization.quantize`), which the kernel does not, and with
  `scales_last` per-token scales laid out `[B, H, n, C]` (SKVQ's: tokens last).
  """
  from kivi_jax import quantization
  g, w = group_size, codes_per_word(bits)
  i = jnp.arange(x.shape[2])[None, :]
  live = i < n_tokens[:, None]
  tok = start[:, None] + i  # [B, n]
  codes, sc, zr = quantization.quantize(x, bits, g, axis, scale.dtype, clip, groups)
  group = tok // g
  row = jnp.where(live, group // w * g + tok % g, words.shape[-2])
  shift, div, _ = quantization.slot_fields(bits)
  slot = group % w
  place = (jnp.asarray(div)[slot] << jnp.asarray(shift)[slot])[:, None, :, None]
  # Each slot of a word is written once, into zero bits: adding is or-ing, and
  # groups of one flush that share word rows combine.
  words = scatter_tokens(words, row, codes.astype(jnp.uint32) * place, add=True)
  return (words, *_scatter_scales(scale, zero, sc, zr, start, live, g, axis,
                                  last=scales_last))


def quantize_pack_pairs_reference(x, words, scale, zero, start, n_tokens, clip=1.0, *,
                                  bits: int, group_size: int, axis: str):
  """`quantize_pack_reference` into a block in the pair layout
  (`kivi_jax.cache.QuantizedBlock`, `kivi_jax.quantization.pair_pack`): for axis
  "channel" each token's row of words, for axis "token" each channel's words
  along tokens, where a flushed group shares its words with the others of its
  128-token span, and the scales `[B, H, D/G, C]`."""
  from kivi_jax import quantization
  g, n = group_size, x.shape[2]
  i = jnp.arange(n)[None, :]
  live = i < n_tokens[:, None]
  codes, sc, zr = quantization.quantize(x, bits, g, axis, scale.dtype, clip)
  tok = start[:, None] + i  # [B, n]
  if axis == "channel":
    words = scatter_tokens(words, jnp.where(live, tok, words.shape[2]),
                           quantization.pair_pack(codes, bits))
    return (words, *_scatter_scales(scale, zero, sc, zr, start, live, g, axis))
  # Token t's code: in its span's words (span t // 128), as `_pair_places` says.
  word, bit = _pair_places(tok, bits)
  word, bit = word + tok // SPAN * 4 * bits, bit.astype(jnp.uint32)
  placed = jnp.swapaxes(codes, 2, 3).astype(jnp.uint32) << bit[:, None, None, :]
  # Each code's bits are written once, into zero bits: adding is or-ing.
  words = scatter_tokens(words, jnp.where(live, word, words.shape[-1]), placed, add=True,
                         last=True)
  return (words, *_scatter_scales(scale, zero, sc, zr, start, live, g, axis, last=True))


def _scatter_scales(scale, zero, sc, zr, start, live, group_size: int, axis: str,
                    last: bool = False):
  """The new tokens' scales and zeros (`quantize`'s `sc`, `zr`) into the block's:
  one per group of `G` tokens for axis "channel", one per token for "token", row
  b's from token `start[b]` where `live` `[B, n]`; along the block's last axis
  with `last` (the pair layout's transposed value scales, SKVQ's scales)."""
  g, n = group_size, live.shape[1]
  drop = scale.shape[-1 if last else 2]  # an index past the end: not written
  if axis == "channel":
    idx = jnp.where(live[:, ::g], start[:, None] // g + jnp.arange(n // g)[None, :], drop)
  else:
    idx = jnp.where(live, start[:, None] + jnp.arange(n)[None, :], drop)
  if last:
    sc, zr = jnp.swapaxes(sc, 2, 3), jnp.swapaxes(zr, 2, 3)
  return (scatter_tokens(scale, idx, sc, last=last),
          scatter_tokens(zero, idx, zr, last=last))


def scatter_tokens(dst, idx, src, add: bool = False, last: bool = False):
  """Per batch row `b`: `dst[b, :, idx[b]] = src[b]` (or `+=`) on the token axis.

  dst `[B, H, N, X]`, idx int32 `[B, n]`, src `[B, H, n, X]`; with `last` the
  token axis is the last one: dst `[B, H, X, N]`, src `[B, H, X, n]`. Indices
  out of range are dropped.
  """
  def one(d, i, s):
    ref = d.at[:, :, i] if last else d.at[:, i]
    return ref.add(s, mode="drop") if add else ref.set(s, mode="drop")
  return jax.vmap(one)(dst, idx, src)
