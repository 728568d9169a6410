"""Decode attention over SKVQ's hidden-dim layout: two Pallas (Triton) GPU kernels.

SKVQ (`channel_group`) quantizes keys and values per token over groups of the
whole hidden dim `H = Hkv * Dh`, in a calibrated channel order that mixes the
heads. `kivi_jax.attention` makes every query head a row over `H` (its own
channels where its kv head's keys sit, zeros elsewhere), so each score is a
dot over all of `H` and each output row has `H` channels, of which it keeps
its own kv head's `Dh`: at real widths the output accumulator (`[M, H]`
float32: 512 KiB for 32 heads over 4096 channels) fits no program. A step
therefore runs in three parts, none of which dequantizes the block into
memory:

1. `_scores_kernel`, grid `(B, splits, chunks)`: walks its split's tokens one
   group of `G` at a time and, per group, its chunk of the hidden dim in tiles
   of `tile` channels (the chunks' partial scores are summed in jnp); each
   `[G, tile]` key tile is unpacked and dequantized in registers (each
   channel's scale and zero gathered from its own group) and dotted with the
   query rows: raw scores `[B, M, C]`, float32.
2. jnp: the mask, the block's maximum and sum, the probabilities.
3. `_values_kernel`, grid `(B, H / span, value_splits)`: `p @ v` over one split's
   tokens for a span of a few tiles of channels (the probabilities read once
   for all of them), of which each channel keeps the rows of its own kv head,
   stored at its natural place; the splits are summed in jnp.

The reference is `decode_attention.quantized_decode_attention_reference` with
`k_groups` and `v_groups`.

The scales and zeros lie tokens last (`[n, C]`, SKVQ's layout in
`kivi_jax.cache`): a tile's scales of one group for a group of tokens are one
contiguous load. Tokens first, each was a byte 256 bytes from the next at
Llama-2-7B's width (a 32-byte sector for one byte), and those loads bound
both kernels (L1 at 86-92% of its throughput by Nsight Compute on an H100);
tokens last, the two take 9-17% less time at 1 to 512 rows (benchmarks/NOTES.md).

Shapes (M query rows padded to 16, H hidden dim, n groups, C block capacity):
  q, q_rot      [B, 1, M, H]     model dtype (q_rot and rope_theta [H]: keys
                                 cached before RoPE, as in `decode_attention`;
                                 RoPE's inverse frequencies, at most 1)
  k_codes       [B, 1, C/w_k, H] uint32     k_scale, k_zero [B, 1, n_k, C]
  v_codes       [B, 1, C/w_v, H] uint32     v_scale, v_zero [B, 1, n_v, C]
  n_valid, lo   [B] int32: the block's live tokens are `lo <= t < n_valid`
  k_groups, v_groups [H] int32: nondecreasing group of each channel
  v_perm        [H] int32: each value channel's natural place `kv * Dh + d`
Returns `(o [B, rep, H], lse [B, 1, M])`, float32: `o[:, j, kv * Dh + d]` is
query row `kv * rep + j`'s output at its kv head's channel `d` (rows past
`Hkv * rep` are not read), `lse` as `decode_attention.quantized_decode_attention`'s.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from kivi_jax.pallas_kernels.common import MASK_VALUE as _NEG
from kivi_jax.pallas_kernels.common import codes_per_word, ptx_f32
from kivi_jax.pallas_kernels.decode_attention import (default_splits, dot_precision, live_groups,
                                             pallas_call, unpack_tile)

# Channels per tile by default: on an H100 (groups of 32 tokens, bf16, 1024 and
# 4096 channels) tiles of 32 channels beat 64, 128 and 256 (benchmarks/NOTES.md).
_TILE = 32
# Triton's software pipelining of both kernels' loops (their next tiles' loads in
# flight): 3 stages take a layer's SKVQ decode attention 11-20% below one stage's on an
# H100, 4 no further (benchmarks/NOTES.md, "SKVQ at serving shapes").
NUM_STAGES = 3


def hidden_tile(hidden: int) -> int:
  """Channels per tile: the largest power of two dividing `hidden`, at most
  `_TILE` and at least 16 (a Triton dot's least)."""
  tile = min(hidden & -hidden, _TILE)
  if tile < 16:
    raise ValueError(f"the hidden dim ({hidden}) must be a multiple of 16 for the "
                     "hidden-layout kernels")
  return tile


def _expand(ref, tok0, g_sz: int, group_map):
  """A `[n, C]` scale ref's tokens `tok0 .. tok0 + g_sz` broadcast over a
  tile's channels, `[g_sz, tile]` float32: one gather of each channel's own
  group (`group_map` `[1, tile]`); a loop over the groups a tile spans waited
  on a load per group."""
  tokens = tok0 + jax.lax.broadcasted_iota(jnp.int32, (g_sz, 1), 0)
  return ref[group_map, tokens].astype(jnp.float32)


# Groups a tile reads its scales and zeros from by selects (`_select`).
_NEAR = 4


def _near_groups(group_map, n: int):
  """For a tile's channels' groups `group_map` `[1, tile]` (nondecreasing, of
  `n`): `(lo, past, fits)`: the first of the `k = min(_NEAR, n)` groups
  `_select` reads, the tile's masks of the channels past each of the next
  `k - 1`, and whether every channel's group is among those `k`."""
  k = min(_NEAR, n)
  lo = jnp.minimum(jnp.min(group_map), n - k)
  d = group_map - lo
  return lo, [d >= j for j in range(1, k)], jnp.max(d) < k


def _select(ref, tok0, g_sz: int, tile: int, lo, past):
  """`_expand`'s `[g_sz, tile]` for a tile whose channels' groups are the
  `len(past) + 1` from `lo` on (`_near_groups`): a load of a group's `g_sz`
  contiguous scales (one sector of fp8) and a select an element for each
  group past the first: the values kernel at Llama-2-7B's width in 0.53x its
  time with the gathers (an H100, benchmarks/NOTES.md); the scores kernel,
  where RoPE's cos and sin hide the gathers' latency, slower with it alone."""
  tokens = pl.ds(tok0, g_sz)
  group = lambda j: ref[pl.ds(lo + j, 1), tokens].reshape(g_sz, 1).astype(  # noqa: E731
      jnp.float32)
  out = jnp.broadcast_to(group(0), (g_sz, tile))
  for j, mask in enumerate(past, 1):
    out = jnp.where(mask, group(j), out)
  return out


def _fma(a, b, c, ptx: bool):
  """`a * b + c` in float32, rounded once with `ptx` (PTX's `fma.rn.f32`), else
  `a * b + c`. Pallas's Triton lowering fuses no multiply and add (Nsight
  Compute counted no FFMA in these kernels): with it both kernels take 1-6%
  less time on an H100, their outputs the same (benchmarks/NOTES.md)."""
  return ptx_f32("fma.rn.f32 $0, $1, $2, $3;", a, b, c) if ptx else a * b + c


def _dequantize(codes, scale_ref, zero_ref, tok0, g_sz: int, group_map, near=None,
                ptx: bool = False):
  """`codes` `[g_sz, tile]` (float32) times each channel's scale plus its
  zero (`_fma`): by `_select` from `near`'s `(lo, past)` (`_near_groups`), or
  by `_expand`'s gathers where `near` is None."""
  if near is None:
    expand = lambda ref: _expand(ref, tok0, g_sz, group_map)  # noqa: E731
  else:
    expand = lambda ref: _select(ref, tok0, g_sz, group_map.shape[1], *near)  # noqa: E731
  return _fma(codes, expand(scale_ref), expand(zero_ref), ptx)


def _trunc(x: float, bits: int) -> float:
  """`x` to its leading `bits` significant bits (toward zero)."""
  m, e = math.frexp(x)
  return math.floor(m * 2**bits) / 2**bits * 2.0**e


def _reduce(x, period: float, ptx: bool = False):
  """`x - k period` for `k = round(x / period)`, float32: the period in three
  parts (Cody and Waite), the first two of 8 significant bits, so `k` times
  each is exact for `k < 2**16`; the multiplies and adds by `_fma`."""
  p1 = _trunc(period, 8)
  p2 = _trunc(period - p1, 8)
  k = jnp.floor(_fma(x, 1 / period, 0.5, ptx))
  return _fma(-k, period - p1 - p2, _fma(-k, p2, _fma(-k, p1, x, ptx), ptx), ptx)


# RoPE's angles below this (positions times inverse frequencies of at most 1)
# take `_sincos`: its 2*pi stage is exact while `k < 2**16`.
SINCOS_MAX_ANGLE = 4e5


def _ptx(op: str, x):
  """`op` (sin or cos) of float32 `x` in [-pi, pi] by PTX's `op.approx.f32`:
  absolute error 2^-20.9 there (PTX's documentation), a few instructions where
  libdevice's precise `sinf` and `cosf` take tens each."""
  return ptx_f32(f"{op}.approx.f32 $0, $1;", x)


def _sincos(x, ptx: bool):
  """`(sin x, cos x)` of float32 angles `0 <= x < SINCOS_MAX_ANGLE`: reduced
  to [-pi, pi] by `_reduce` (a little past it where `x / (2 pi)` rounds to
  the other integer), then `_ptx`'s pair, or with `ptx=False` (interpret
  mode, which has no PTX) `jnp.sin` and `jnp.cos`. Within 7.8e-7 of the exact
  values on a GPU and 3.3e-7 on a CPU, the reduction's 2.7e-7 with the pair's
  own error (tests/test_decode_attention.py derives them)."""
  x = _reduce(x, 2 * math.pi, ptx)
  if ptx:
    return _ptx("sin", x), _ptx("cos", x)
  return jnp.sin(x), jnp.cos(x)


def _dot(a, b, contract, precision):
  return jax.lax.dot_general(a, b, (contract, ((), ())), precision=precision,
                             preferred_element_type=jnp.float32)


def _scores_kernel(q_ref, kw_ref, ks_ref, kz_ref, map_ref, n_ref, lo_ref, *refs,
                   bits: float, group: int, tile: int, groups_per_split: int,
                   tiles_per_chunk: int, sm_scale: float, compute_dtype, rope: bool,
                   pos_offset: int, fast_rope: bool, ptx: bool):
  """One program: batch row b, split s, chunk c of the hidden dim's tiles.
  Writes the chunk's part of the scores of the split's live groups into its
  `[M, groups_per_split * G]` block (the rest is never read). With
  `fast_rope`, cos and sin by `_sincos`, and the scales and zeros by
  `_select` where every tile of the chunk spans at most `_NEAR` groups (else
  `_expand`'s gathers, one loop or the other chosen once): on an H100 either
  alone was slower than the precise pair and the gathers, both together
  faster (benchmarks/NOTES.md)."""
  if rope:
    qr_ref, theta_ref, s_ref = refs
  else:
    (s_ref,) = refs
  g_sz, w = group, codes_per_word(bits)
  m_rows, hidden = q_ref.shape
  n_groups = ks_ref.shape[0]
  precision = dot_precision(compute_dtype)
  first, last, base = live_groups(pl.program_id(1), n_ref, lo_ref, g_sz, groups_per_split)
  tile0 = pl.program_id(2) * tiles_per_chunk

  def group_scores(g, carry, *, by_select: bool):
    tok0 = pl.multiple_of(g * g_sz, g_sz)
    word_rows = pl.ds(pl.multiple_of((g // w) * g_sz, g_sz), g_sz)

    def tile_scores(i, s):
      cols = pl.ds(pl.multiple_of(i * tile, tile), tile)
      group_map = map_ref[cols][None, :]
      codes = unpack_tile(kw_ref[word_rows, cols], g % w, 1, bits).astype(jnp.float32)
      # [G, tile], dequantized in float32 and rounded once to the dot's dtype.
      near = _near_groups(group_map, n_groups)[:2] if by_select else None
      k = _dequantize(codes, ks_ref, kz_ref, tok0, g_sz, group_map, near, ptx)
      q = q_ref[:, cols].astype(compute_dtype)
      if not rope:
        return s + _dot(q, k.astype(compute_dtype), ((1,), (1,)), precision)
      pos = (tok0 + pos_offset + jax.lax.broadcasted_iota(jnp.int32, (g_sz, 1), 0)
             ).astype(jnp.float32)
      angle = pos * theta_ref[cols][None, :]
      sin, cos = _sincos(angle, ptx) if fast_rope else (jnp.sin(angle), jnp.cos(angle))
      q_rot = qr_ref[:, cols].astype(compute_dtype)
      return (s + _dot(q, (k * cos).astype(compute_dtype), ((1,), (1,)), precision)
              + _dot(q_rot, (k * sin).astype(compute_dtype), ((1,), (1,)), precision))

    s = jax.lax.fori_loop(tile0, tile0 + tiles_per_chunk, tile_scores,
                          jnp.zeros((m_rows, g_sz), jnp.float32))
    s_ref[:, pl.ds(pl.multiple_of((g - base) * g_sz, g_sz), g_sz)] = s * sm_scale
    return carry

  def walk(by_select: bool):
    jax.lax.fori_loop(first, last, functools.partial(group_scores, by_select=by_select), 0)

  if not fast_rope:
    walk(False)
    return

  def tile_fits(i, fits):
    group_map = map_ref[pl.ds(pl.multiple_of(i * tile, tile), tile)][None, :]
    return jnp.minimum(fits, _near_groups(group_map, n_groups)[2].astype(jnp.int32))

  fits = jax.lax.fori_loop(tile0, tile0 + tiles_per_chunk, tile_fits, jnp.int32(1))
  jax.lax.cond(fits > 0, lambda: walk(True), lambda: walk(False))


def _values_kernel(p_ref, vw_ref, vs_ref, vz_ref, map_ref, n_ref, lo_ref, inv_l_ref,
                   perm_ref, out_ref, *, bits: float, group: int, tile: int,
                   groups_per_split: int, head_dim: int, compute_dtype, ptx: bool):
  """One program: batch row b, channel span j, split s: `p @ v` over the
  split's live groups for the span's channels, `[M, span]` float32, one
  `tile` of channels at a time (each group's probabilities loaded once for
  all); each channel's `rep` rows of its own kv head, divided by their sums
  `inv_l`, stored at its natural place (`perm`) in the `[rep, H]` output.
  Where each tile's channels fall in `_NEAR` groups, their scales and zeros
  come by `_select`, else by `_expand`'s gathers (one loop or the other, chosen
  once)."""
  g_sz, w = group, codes_per_word(bits)
  rep = out_ref.shape[0]
  precision = dot_precision(compute_dtype)
  first, last, base = live_groups(pl.program_id(2), n_ref, lo_ref, g_sz, groups_per_split)
  cols = [pl.ds(i * tile, tile) for i in range(perm_ref.shape[0] // tile)]
  maps = [map_ref[c][None, :] for c in cols]
  near = [_near_groups(group_map, vs_ref.shape[0]) for group_map in maps]

  def group_values(g, accs, *, by_select: bool):
    tok0 = pl.multiple_of(g * g_sz, g_sz)
    word_rows = pl.ds(pl.multiple_of((g // w) * g_sz, g_sz), g_sz)
    p = p_ref[:, pl.ds(pl.multiple_of((g - base) * g_sz, g_sz), g_sz)].astype(compute_dtype)
    out = []
    for acc, c, group_map, (lo, past, _) in zip(accs, cols, maps, near):
      codes = unpack_tile(vw_ref[word_rows, c], g % w, 1, bits).astype(jnp.float32)
      v = _dequantize(codes, vs_ref, vz_ref, tok0, g_sz, group_map,
                      (lo, past) if by_select else None, ptx)
      out.append(acc + _dot(p, v.astype(compute_dtype), ((1,), (0,)), precision))
    return tuple(out)

  m_rows = p_ref.shape[0]
  zeros = tuple(jnp.zeros((m_rows, tile), jnp.float32) for _ in cols)
  accs = jax.lax.cond(
      functools.reduce(jnp.logical_and, [fits for *_, fits in near]),
      lambda: jax.lax.fori_loop(first, last, functools.partial(group_values, by_select=True),
                                zeros),
      lambda: jax.lax.fori_loop(first, last, functools.partial(group_values, by_select=False),
                                zeros))
  row = jax.lax.broadcasted_iota(jnp.int32, (m_rows, 1), 0)
  for c, acc in zip(cols, accs):
    natural = perm_ref[c]
    acc = acc * inv_l_ref[...][:, None]
    for j in range(rep):
      own = row == (natural // head_dim * rep + j)[None, :]
      out_ref[j, natural] = jnp.sum(jnp.where(own, acc, 0.0), axis=0)


@functools.partial(jax.jit, static_argnames=(
    "k_bits", "v_bits", "group_size", "head_dim", "rep", "sm_scale", "pos_offset", "tile",
    "value_tiles",
    "splits", "chunks", "value_splits", "num_warps", "fast_rope", "interpret", "poison"))
def hidden_decode_attention(q, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero,
                            n_valid, lo, k_groups, v_groups, v_perm, q_rot=None,
                            rope_theta=None, *, k_bits: float, v_bits: float, group_size: int,
                            head_dim: int, rep: int, sm_scale: float, pos_offset: int = 0,
                            tile: int | None = None,
                            value_tiles: int = 1, splits: int | None = None,
                            chunks: int | None = None, value_splits: int | None = None,
                            num_warps: int = 4, fast_rope: bool | None = None,
                            interpret: bool = False, poison: bool = False):
  """Attention of `q` over a block in SKVQ's layout: `(o, lse)` (module docstring).

  `head_dim` is `Dh` and `rep` the query rows of a kv head. `sm_scale`
  multiplies the scores (one head's `1 / sqrt(Dh)`, not the hidden dim's).
  `tile` channels are dequantized at once (`hidden_tile` by default);
  a values program covers `value_tiles` tiles (one by default: fastest on
  average over the 7B widths, `scripts/gpu_skvq_tiles.py`);
  `splits` x `chunks` scores programs share each row's tokens and the hidden
  dim's tiles (chunks of them, the partial scores summed in jnp),
  `value_splits` values programs each channel span's tokens (by default,
  each kernel's enough to fill a large GPU: the tokens split first, up to a
  split a group, then the tiles). `fast_rope` turns on the scores kernel's
  `_sincos` and `_select`: by default without RoPE, or where the block's
  positions' angles stay below `SINCOS_MAX_ANGLE`. With `poison`, both
  kernels' outputs start as NaN, so a live score or an output element the
  kernels fail to write shows.
  """
  if (q_rot is None) != (rope_theta is None):
    raise ValueError("q_rot and rope_theta go together")
  b, _, m_rows, hidden = q.shape
  g = group_size
  tile = hidden_tile(hidden) if tile is None else tile
  if hidden % tile or tile < 16 or tile & (tile - 1):
    raise ValueError(f"tile={tile} must be a power of two of at least 16 dividing the "
                     f"hidden dim ({hidden})")
  if hidden % head_dim or rep < 1 or hidden // head_dim * rep > m_rows:
    raise ValueError(f"head_dim={head_dim} must divide the hidden dim ({hidden}) and rep={rep} "
                     f"kv heads' rows fit the query's {m_rows}")
  n_tiles = hidden // tile
  if n_tiles % value_tiles:
    raise ValueError(f"value_tiles={value_tiles} must divide the {n_tiles} tiles of "
                     f"{tile} channels")
  # The capacity is the scales' (codes may take whole packing blocks more).
  capacity = k_scale.shape[3]
  n_groups = capacity // g
  width = value_tiles * tile  # channels per values program
  if splits is None:
    splits = default_splits(b, 1, n_groups)
  if chunks is None:
    want = default_splits(b * splits, 1, n_tiles)
    chunks = next(c for c in range(want, n_tiles + 1) if n_tiles % c == 0)
  if n_tiles % chunks:
    raise ValueError(f"chunks={chunks} must divide the {n_tiles} tiles of {tile} channels")
  if value_splits is None:
    value_splits = default_splits(b, hidden // width, n_groups)
  groups_per_split = -(-n_groups // splits)
  span = groups_per_split * g  # tokens per split
  if fast_rope is None:  # positions times RoPE's inverse frequencies (at most 1)
    fast_rope = q_rot is None or capacity + pos_offset < SINCOS_MAX_ANGLE
  compute_dtype = jnp.float32 if q.dtype == jnp.float32 else jnp.bfloat16
  head = lambda x: x[:, 0]  # noqa: E731  the layout's single "head"
  whole = lambda x: pl.BlockSpec((None, *x.shape[2:]), lambda i, *_: (i, 0, 0))  # noqa: E731
  row = pl.BlockSpec((1,), lambda i, *_: (i,))
  rows = [n_valid.astype(jnp.int32), lo.astype(jnp.int32)]
  cfg = dict(group=g, compute_dtype=compute_dtype)

  # 1. Scores [B, M, splits * span], summed over the chunks.
  inputs = [head(x) for x in (q, k_codes, k_scale, k_zero)] + [k_groups.astype(jnp.int32)]
  in_specs = [whole(x) for x in (q, k_codes, k_scale, k_zero)] + [
      pl.BlockSpec((hidden,), lambda *_: (0,)), row, row]
  inputs += rows
  if q_rot is not None:
    inputs += [head(q_rot), rope_theta.astype(jnp.float32)]
    in_specs += [whole(q_rot), pl.BlockSpec((hidden,), lambda *_: (0,))]
  scores = pallas_call(
      functools.partial(_scores_kernel, bits=k_bits, tile=tile, sm_scale=sm_scale,
                        rope=q_rot is not None, pos_offset=pos_offset,
                        fast_rope=fast_rope, ptx=not interpret,
                        groups_per_split=groups_per_split,
                        tiles_per_chunk=n_tiles // chunks, **cfg),
      inputs, in_specs,
      [pl.BlockSpec((None, None, m_rows, span), lambda i, s, c: (i, c, 0, s))],
      [jax.ShapeDtypeStruct((b, chunks, m_rows, splits * span), jnp.float32)],
      grid=(b, splits, chunks), poison=poison, num_warps=num_warps,
      num_stages=NUM_STAGES,
      interpret=interpret, name="skvq_decode_scores")[0]
  scores = jnp.sum(scores, axis=1)

  # 2. The block's softmax statistics and probabilities.
  t = jnp.arange(splits * span)
  live = ((t[None, :] >= lo[:, None]) & (t[None, :] < n_valid[:, None]))[:, None, :]
  scores = jnp.where(live, scores, _NEG)
  m = jnp.max(scores, axis=-1)
  p = jnp.where(live, jnp.exp(scores - m[..., None]), 0.0)
  l = jnp.sum(p, axis=-1)

  # 3. Values: [B, value_splits, rep, H], summed over the splits, each over
  # `v_span` tokens of the probabilities (cut, or padded with zeros, to
  # `value_splits * v_span`).
  v_groups_per_split = -(-n_groups // value_splits)
  v_span = v_groups_per_split * g
  extra = value_splits * v_span - p.shape[-1]
  p = jnp.pad(p, ((0, 0), (0, 0), (0, extra))) if extra > 0 else p[..., :p.shape[-1] + extra]
  # Every split's probabilities share the block's maximum: each row's output
  # is its splits' sum over its sum `l` (0 where nothing is live).
  some = l > 0
  l_safe = jnp.where(some, l, 1.0)
  inv_l = jnp.where(some, 1.0 / l_safe, 0.0)
  acc = pallas_call(
      functools.partial(_values_kernel, bits=v_bits, tile=tile,
                        groups_per_split=v_groups_per_split, head_dim=head_dim,
                        ptx=not interpret, **cfg),
      [p.astype(compute_dtype)] + [head(x) for x in (v_codes, v_scale, v_zero)]
      + [v_groups.astype(jnp.int32)] + rows + [inv_l, v_perm.astype(jnp.int32)],
      [pl.BlockSpec((None, m_rows, v_span), lambda i, j, s: (i, 0, s)),
       pl.BlockSpec((None, v_codes.shape[2], width), lambda i, j, s: (i, 0, j)),
       whole(v_scale), whole(v_zero),
       pl.BlockSpec((width,), lambda i, j, s: (j,)), row, row,
       pl.BlockSpec((None, m_rows), lambda i, j, s: (i, 0)),
       pl.BlockSpec((width,), lambda i, j, s: (j,))],
      [pl.BlockSpec((None, None, rep, hidden), lambda i, j, s: (i, s, 0, 0))],
      [jax.ShapeDtypeStruct((b, value_splits, rep, hidden), jnp.float32)],
      grid=(b, hidden // width, value_splits), poison=poison, num_warps=num_warps,
      num_stages=NUM_STAGES,
      interpret=interpret, name="skvq_decode_values")[0]
  lse = jnp.where(some, m + jnp.log(l_safe), _NEG)
  return jnp.sum(acc, axis=1), lse[:, None]
