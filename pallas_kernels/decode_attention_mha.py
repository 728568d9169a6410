"""Decode attention of one query row per kv head (MHA) over a KIVI-packed block:
two Pallas (Triton) GPU kernels on CUDA cores, and where they apply.

`decode_attention.py`'s kernel pads a kv head's query rows to 16 for its dots;
with one row (Llama-2-7B: 32 heads, 32 kv heads) 15 of them are zeros, and its
running softmax holds both tensors' word tiles and its accumulators in 255
registers. Here the step is split in two kernels with no state carried from
one packing block to the next, so many programs share each SM and hide each
other's load latency (`benchmarks/NOTES.md`, "Two kernels for MHA"):

  scores  one program per (row, kv head, packing block of the keys): the word
          tile `[G, D]` once, then per slot (one group of `G` tokens) the codes
          times the query folded with the group's scales plus the query times
          the group's zeros, summed over the channels:
            s_t = sum_c (q_c s_gc code_tc + q_c z_gc)
          written in token order, masked tokens at `MASK_VALUE`.
  values  one program per (row, kv head, packing block of the values): the
          block's maximum `m`, `p_t = exp(s_t - m)`, and
            acc[d] = sum_t (p_t s_t[c]) code_t[d] + sum_t p_t z_t[c]
          accumulated per element over the slots and summed over tokens once.
The blocks' partials `(acc, m, l)` are merged by `merge_partials`. Arithmetic
is float32 on CUDA cores: no operand is rounded to bf16 (`decode_attention`
rounds keys, values and probabilities for its dots).

Codes of 2, 4 or 8 bits (not ternary); layouts and shapes as
`decode_attention.py`'s, with `M = 1` query row.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from kivi_jax.pallas_kernels.common import MASK_VALUE as _NEG
from kivi_jax.pallas_kernels.common import codes_per_word
from kivi_jax.pallas_kernels.decode_attention import merge_partials, pallas_call, partial_outputs

# Warps per program, measured on an H200 (benchmarks/NOTES.md): the scores
# kernel at 8 was 3x faster than at 4; the values kernel best at 4.
SCORE_WARPS = 8
VALUE_WARPS = 4


def applies(k_bits: float, v_bits: float, query_rows: int) -> bool:
  """Whether these kernels read the block: one query row per kv head, codes
  of 2, 4 or 8 bits."""
  return query_rows == 1 and k_bits in (2, 4, 8) and v_bits in (2, 4, 8)


def _live(j, tokens: int, n_ref, lo_ref):
  """Whether packing block `j` of `tokens` tokens holds a live token."""
  return (j * tokens < n_ref[0]) & ((j + 1) * tokens > lo_ref[0])


def _codes(words, slot: int, bits: int):
  return ((words >> jnp.uint32(slot * bits)) & jnp.uint32(2**bits - 1)).astype(jnp.float32)


def _scores_kernel(q_ref, kw_ref, ks_ref, kz_ref, n_ref, lo_ref, s_ref, *, bits: int,
                   sm_scale: float):
  j = pl.program_id(2)
  slots, g = s_ref.shape
  live = _live(j, slots * g, n_ref, lo_ref)

  @pl.when(live)
  def _():
    q = q_ref[...].astype(jnp.float32) * sm_scale  # [1, D]
    words = kw_ref[...]  # [G, D]
    tok_in_group = jax.lax.broadcasted_iota(jnp.int32, (g,), 0)
    for slot in range(slots):
      # The zero term rides in the same channel sum: one reduction per slot
      # (a separate `q . z` was 6-8% of the block's time, benchmarks/NOTES.md).
      qs = q * ks_ref[pl.ds(slot, 1), :].astype(jnp.float32)  # [1, D]
      qz = q * kz_ref[pl.ds(slot, 1), :].astype(jnp.float32)  # [1, D]
      s = jnp.sum(_codes(words, slot, bits) * qs + qz, axis=1)  # [G]
      tok = (j * slots + slot) * g + tok_in_group
      s_ref[slot, :] = jnp.where((tok < n_ref[0]) & (tok >= lo_ref[0]), s, _NEG)

  @pl.when(~live)
  def _():
    s_ref[...] = jnp.full(s_ref.shape, _NEG, jnp.float32)


def _values_kernel(s_ref, vw_ref, vs_ref, vz_ref, n_ref, lo_ref, acc_ref, m_ref, l_ref, *,
                   bits: int):
  j = pl.program_id(2)
  slots, g = s_ref.shape
  d = vw_ref.shape[-1]
  n_cgroups = vs_ref.shape[-1]
  cg = d // n_cgroups
  live = _live(j, slots * g, n_ref, lo_ref)

  @pl.when(live)
  def _():
    scores = s_ref[...]  # [slots, G]
    m = jnp.max(scores)
    l = jnp.sum(jnp.where(scores > _NEG / 2, jnp.exp(scores - m), 0.0))
    words = vw_ref[...]  # [G, D]
    acc = jnp.zeros((g, d), jnp.float32)
    bias = jnp.zeros((g, n_cgroups), jnp.float32)
    for slot in range(slots):
      s = s_ref[pl.ds(slot, 1), :][0]  # [G]
      p = jnp.where(s > _NEG / 2, jnp.exp(s - m), 0.0)
      ps = p[:, None] * vs_ref[slot].astype(jnp.float32)  # [G, D/cg]
      ps = jnp.broadcast_to(ps[:, :, None], (g, n_cgroups, cg)).reshape(g, d)
      acc = acc + ps * _codes(words, slot, bits)
      bias = bias + p[:, None] * vz_ref[slot].astype(jnp.float32)
    bias = jnp.broadcast_to(jnp.sum(bias, axis=0)[:, None], (n_cgroups, cg)).reshape(d)
    acc_ref[...] = (jnp.sum(acc, axis=0) + bias)[None, :]
    m_ref[...] = jnp.full((1,), m, jnp.float32)
    l_ref[...] = jnp.full((1,), l, jnp.float32)

  @pl.when(~live)
  def _():
    acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)
    m_ref[...] = jnp.full((1,), _NEG, jnp.float32)
    l_ref[...] = jnp.zeros((1,), jnp.float32)


@functools.partial(jax.jit, static_argnames=(
    "k_bits", "v_bits", "group_size", "score_warps", "value_warps", "interpret", "poison"))
def mha_decode_partials(q, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, n_valid, lo,
                        *, k_bits: int, v_bits: int, group_size: int,
                        score_warps: int = SCORE_WARPS, value_warps: int = VALUE_WARPS,
                        interpret: bool = False, poison: bool = False):
  """Per-packing-block partials `(acc [B, K, P, 1, D], m [B, K, P, 1],
  l [B, K, P, 1])` over the values' `P` packing blocks (module docstring).
  `q` is `[B, K, 1, D]`; the other arguments as
  `decode_attention.quantized_decode_partials`'. With `poison`, the outputs
  start as NaN, so an element a kernel fails to write shows."""
  b, kh, m_rows, d = q.shape
  if not applies(k_bits, v_bits, m_rows):
    raise ValueError(f"the MHA kernels read one query row (got {m_rows}) and 2, 4 or 8-bit "
                     f"codes (got k_bits={k_bits}, v_bits={v_bits})")
  g = group_size
  wk, wv = codes_per_word(k_bits), codes_per_word(v_bits)
  capacity = k_codes.shape[2] * wk
  nk, nv = capacity // (wk * g), capacity // (wv * g)  # packing blocks
  rows = [n_valid.astype(jnp.int32), lo.astype(jnp.int32)]
  row = pl.BlockSpec((1,), lambda i, h, j: (i,))
  per_block = lambda *shape: pl.BlockSpec(  # noqa: E731
      (None, None, *shape), lambda i, h, j: (i, h, j, *([0] * (len(shape) - 1))))
  scores = pallas_call(
      functools.partial(_scores_kernel, bits=k_bits, sm_scale=1.0 / math.sqrt(d)),
      [q, k_codes, k_scale, k_zero, *rows],
      [pl.BlockSpec((None, None, 1, d), lambda i, h, j: (i, h, 0, 0)), per_block(g, d),
       per_block(wk, d), per_block(wk, d), row, row],
      [pl.BlockSpec((None, None, None, wk, g), lambda i, h, j: (i, h, j, 0, 0))],
      [jax.ShapeDtypeStruct((b, kh, nk, wk, g), jnp.float32)],
      grid=(b, kh, nk), poison=poison, num_warps=score_warps, num_stages=1,
      interpret=interpret, name="kivi_mha_scores")[0]
  n_cgroups = v_scale.shape[-1]
  blocked = lambda x: x.reshape(b, kh, nv, wv, g, n_cgroups)  # noqa: E731
  acc, m, l = pallas_call(
      functools.partial(_values_kernel, bits=v_bits),
      [scores.reshape(b, kh, nv, wv, g), v_codes, blocked(v_scale), blocked(v_zero), *rows],
      [pl.BlockSpec((None, None, None, wv, g), lambda i, h, j: (i, h, j, 0, 0)),
       per_block(g, d),
       pl.BlockSpec((None, None, None, wv, g, n_cgroups), lambda i, h, j: (i, h, j, 0, 0, 0)),
       pl.BlockSpec((None, None, None, wv, g, n_cgroups), lambda i, h, j: (i, h, j, 0, 0, 0)),
       row, row],
      *partial_outputs(b, kh, nv, 1, d),
      grid=(b, kh, nv), poison=poison, num_warps=value_warps, num_stages=1,
      interpret=interpret, name="kivi_mha_values")
  return acc, m, l


def mha_decode_attention(*args, **kwargs):
  """Attention of `q` `[B, K, 1, D]` over the quantized block: `(o [B, K, 1, D],
  lse [B, K, 1])`, as `decode_attention.quantized_decode_attention`."""
  return merge_partials(*mha_decode_partials(*args, **kwargs))
