"""Decode attention over a packed block: Pallas Mosaic TPU kernel, both layouts.

The same function as `decode_attention.quantized_decode_attention_reference`
(the specification for every decode kernel), laid out for the TPU: the grid's
last axis walks the block sequentially, one step of `gcd(w_k, w_v)` groups (a
whole packing block of the tensor with fewer codes per word, or 4 groups where
ternary's 20 codes per word meet another tensor's 16) at a time, accumulating an
online softmax in VMEM scratch; per-row lengths arrive by scalar prefetch. Word
tiles are `[G, D]` uint32 (lane-dense for D = 128), widened shifts only (no int8
shifts), ternary digits taken apart in float32 (no vector integer division).

Both layouts of the cache:
- KIVI's: per kv head, keys per channel (`[w_step, D]` scale rows, one per
  group), values per token in contiguous channel groups.
- SKVQ's (`k_groups`, `v_groups` given): the hidden dim as one head `D = H`,
  both tensors per token over explicit channel groups. Every query head is a
  row over the whole hidden dim (`kivi_jax.attention._hidden_block_attention`).
Per-token scales (`[P, D / G]` KIVI's, `[n, P]` SKVQ's, tokens last) reach the
channels through a 0/1 matrix `[n, D]` on the MXU (float32 at full precision,
so exact) instead of a lane gather; SKVQ's come in blocks of whole 128-token
lanes, a step's tokens picked from them by another 0/1 product. Keys
cached before RoPE (`q_rot`, `rope_theta`) are rotated as in the GPU kernel:
`(q * cos) . k + (q_rot * sin) . k`. A step is dequantized `chunk_slots` groups
at a time, so wide hidden dims keep their temporaries small.

Verified in TPU interpret mode only (no TPU was available).

Shapes as in `decode_attention` (M query rows per kv head, padded to 8).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from kivi_jax.pallas_kernels.common import MASK_VALUE as _NEG
from kivi_jax.pallas_kernels.common import codes_per_word

MIN_ROWS = 8  # sublanes
_LANES = 128
# Dequantized float32 elements per chunk of a step ([tokens, D], 256 KiB).
_CHUNK_ELEMENTS = 64 * 1024

_HIGHEST = jax.lax.Precision.HIGHEST


def _unpack(words, first_slot, n_slots: int, bits: float):
  """Slots `first_slot ..` of a `[G, D]` word tile as `[n_slots * G, D]` codes in
  float32, tokens in order."""
  g, d = words.shape
  slot = first_slot + jax.lax.broadcasted_iota(jnp.int32, (n_slots, 1, 1), 0)
  if bits == 1.5:
    # Slot j is base-3 digit j % 5 of byte j // 5; small integers are exact in
    # float32, so floor((x + 1/2) / n) is x // n without integer division.
    fdiv = lambda x, n: jnp.floor((x + 0.5) * (1.0 / n))  # noqa: E731
    sf = slot.astype(jnp.float32)
    byte_idx = fdiv(sf, 5)
    digit = sf - 5.0 * byte_idx
    power = jnp.where(digit == 0, 1.0, jnp.where(digit == 1, 3.0, jnp.where(
        digit == 2, 9.0, jnp.where(digit == 3, 27.0, 81.0))))
    byte = ((words[None] >> (8 * byte_idx.astype(jnp.int32)).astype(jnp.uint32))
            & jnp.uint32(255)).astype(jnp.int32).astype(jnp.float32)
    t = fdiv(byte, power)
    codes = t - 3.0 * fdiv(t, 3)
  else:
    codes = ((words[None] >> (slot * bits).astype(jnp.uint32))
             & jnp.uint32(2**bits - 1)).astype(jnp.int32).astype(jnp.float32)
  return codes.reshape(n_slots * g, d)


def _key_scale_rows(w_step: int) -> int:
  """Groups of key scales a block brings (KIVI's layout): a whole number of
  steps, and of 8 rows, as a TPU block's second-minor dimension must be (the
  whole axis aside). A step of 4 groups (8-bit codes, or ternary beside 2-bit
  codes) takes blocks of two steps."""
  return math.lcm(w_step, MIN_ROWS)


def _step_rows(ref, st, c, w_step: int, chunk_slots: int):
  """Rows `[chunk_slots, D]` float32 of chunk `c` of step `st` in a block of
  `_key_scale_rows(w_step)` scale rows: the step's part chosen by a select
  between static slices (no unaligned dynamic offset into packed rows)."""
  parts = _key_scale_rows(w_step) // w_step
  at = lambda p: pl.ds(pl.multiple_of(p * w_step + c * chunk_slots, chunk_slots),  # noqa: E731
                       chunk_slots)
  rows = ref[at(0), :].astype(jnp.float32)
  for p in range(1, parts):
    rows = jnp.where(st % parts == p, ref[at(p), :].astype(jnp.float32), rows)
  return rows


def _kernel(n_ref, lo_ref, q_ref, kw_ref, ks_ref, kz_ref, vw_ref, vs_ref, vz_ref, *refs,
            k_bits: float, v_bits: float, group: int, sm_scale: float, compute_dtype,
            hidden: bool, rope: bool, pos_offset: int, chunk_slots: int,
            scale_blocks: int):
  refs = list(refs)
  k_map = refs.pop(0) if hidden else None
  v_map = refs.pop(0)
  if rope:
    qr_ref, theta_ref = refs.pop(0), refs.pop(0)
  o_ref, lse_ref, m_sc, l_sc, acc_sc = refs
  g_sz = group
  wk, wv = codes_per_word(k_bits), codes_per_word(v_bits)
  w_step = math.gcd(wk, wv)
  p_tok = w_step * g_sz
  chunk_tok = chunk_slots * g_sz
  b, st = pl.program_id(0), pl.program_id(2)
  n_tok, lo_tok = n_ref[b], lo_ref[b]
  tok0 = st * p_tok

  @pl.when(st == 0)
  def _init():
    m_sc[...] = jnp.full(m_sc.shape, _NEG, jnp.float32)
    l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
    acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

  def chunk_tokens(c):
    """How a chunk finds its tokens' scales: KIVI's value scales `[P, n]` by
    rows; SKVQ's `[n, T]` blocks of `T = scale_blocks * P` tokens (tokens
    last, whole lanes) by a 0/1 `[chunk_tok, T]` product (exact), where
    slicing lanes would take an unaligned dynamic offset."""
    if not hidden:
      return pl.ds(pl.multiple_of(c * chunk_tok, chunk_tok), chunk_tok)
    at = (st % scale_blocks) * p_tok + c * chunk_tok
    pick = (jax.lax.broadcasted_iota(jnp.int32, (chunk_tok, scale_blocks * p_tok), 1)
            == at + jax.lax.broadcasted_iota(jnp.int32, (chunk_tok, 1), 0))
    return pick.astype(jnp.float32)

  def per_token(ref, tokens, group_map):
    # [chunk_tok, D]: each token's scale (or zero) of each channel's group.
    if hidden:
      scales = jax.lax.dot_general(tokens, ref[...].astype(jnp.float32),
                                   (((1,), (1,)), ((), ())), precision=_HIGHEST,
                                   preferred_element_type=jnp.float32)
    else:
      scales = ref[tokens, :].astype(jnp.float32)
    return jnp.dot(scales, group_map, precision=_HIGHEST, preferred_element_type=jnp.float32)

  def chunk(c, carry):
    m_prev, l_prev, acc = carry
    g0 = st * w_step + c * chunk_slots  # first group of the chunk
    t0 = tok0 + c * chunk_tok
    tokens = chunk_tokens(c)
    k = _unpack(kw_ref[...], g0 % wk, chunk_slots, k_bits)  # [chunk_tok, D]
    if hidden:
      k = k * per_token(ks_ref, tokens, k_map[...]) + per_token(kz_ref, tokens, k_map[...])
    else:
      # One scale row per group, broadcast over its tokens.
      ks = _step_rows(ks_ref, st, c, w_step, chunk_slots)[:, None, :]
      kz = _step_rows(kz_ref, st, c, w_step, chunk_slots)[:, None, :]
      k = (k.reshape(chunk_slots, g_sz, -1) * ks + kz).reshape(chunk_tok, -1)
    q = q_ref[...].astype(compute_dtype)

    def scores(q, k):
      return jax.lax.dot_general(q, k.astype(compute_dtype), (((1,), (1,)), ((), ())),
                                 preferred_element_type=jnp.float32)  # [M, chunk_tok]
    if rope:
      pos = (t0 + pos_offset + jax.lax.broadcasted_iota(jnp.int32, (chunk_tok, 1), 0)
             ).astype(jnp.float32)
      angle = pos * theta_ref[...]  # [chunk_tok, D], as apply_rope: position times frequency
      s = scores(q, k * jnp.cos(angle)) + scores(qr_ref[...].astype(compute_dtype),
                                                 k * jnp.sin(angle))
    else:
      s = scores(q, k)
    s = s * sm_scale
    tok = t0 + jax.lax.broadcasted_iota(jnp.int32, (1, chunk_tok), 1)
    live = (tok < n_tok) & (tok >= lo_tok)
    s = jnp.where(live, s, _NEG)
    m_new = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
    corr = jnp.exp(m_prev - m_new)
    p = jnp.where(live, jnp.exp(s - m_new), 0.0)
    l_new = l_prev * corr + jnp.sum(p, axis=1, keepdims=True)
    v = _unpack(vw_ref[...], g0 % wv, chunk_slots, v_bits)
    v = (v * per_token(vs_ref, tokens, v_map[...])
         + per_token(vz_ref, tokens, v_map[...])).astype(compute_dtype)
    pv = jax.lax.dot_general(p.astype(compute_dtype), v, (((1,), (0,)), ((), ())),
                             preferred_element_type=jnp.float32)
    return m_new, l_new, acc * corr + pv

  @pl.when((tok0 < n_tok) & (tok0 + p_tok > lo_tok))
  def _step():
    m, l, acc = jax.lax.fori_loop(0, w_step // chunk_slots, chunk,
                                  (m_sc[...], l_sc[...], acc_sc[...]))
    m_sc[...] = m
    l_sc[...] = l
    acc_sc[...] = acc

  @pl.when(st == pl.num_programs(2) - 1)
  def _finish():
    l = l_sc[...]
    o_ref[...] = acc_sc[...] / jnp.where(l > 0, l, 1.0)
    lse_ref[...] = jnp.where(l > 0, m_sc[...] + jnp.log(jnp.where(l > 0, l, 1.0)), _NEG)


def _group_map(ids, n: int):
  """`[n, D]` float32, 1 where channel `j` is in group `i`."""
  return (ids[None, :] == jnp.arange(n)[:, None]).astype(jnp.float32)


@functools.partial(jax.jit, static_argnames=("k_bits", "v_bits", "group_size", "sm_scale",
                                             "pos_offset", "interpret"))
def quantized_decode_attention(q, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero,
                               n_valid, lo, k_groups=None, v_groups=None, q_rot=None,
                               rope_theta=None, *, k_bits: float, v_bits: float,
                               group_size: int, sm_scale: float | None = None,
                               pos_offset: int = 0, interpret=False):
  """`(o [B, K, M, D], lse [B, K, M])` over the quantized block; see the module
  doc and the reference's arguments.

  `interpret`: False on a TPU, or `pltpu.InterpretParams(...)` / True elsewhere.
  """
  if (k_groups is None) != (v_groups is None):
    raise ValueError("k_groups and v_groups go together (SKVQ's layout)")
  if (q_rot is None) != (rope_theta is None):
    raise ValueError("q_rot and rope_theta go together")
  b, kh, m_rows, d = q.shape
  g = group_size
  wk, wv = codes_per_word(k_bits), codes_per_word(v_bits)
  w_step = math.gcd(wk, wv)
  p_tok = w_step * g
  hidden = k_groups is not None
  # SKVQ's per-token scales hold the capacity exactly; its codes may take whole
  # packing blocks more (`kivi_jax.cache._empty_block`).
  capacity = k_scale.shape[3] if hidden else k_codes.shape[2] * wk
  n_steps = capacity // p_tok
  # Groups per chunk: a divisor of the step within the temporaries' budget.
  chunk_slots = max(n for n in range(1, w_step + 1)
                    if w_step % n == 0 and (n == 1 or n * g * d <= _CHUNK_ELEMENTS))
  compute_dtype = jnp.float32 if q.dtype == jnp.float32 else jnp.bfloat16
  # Steps a block of SKVQ's scales spans: a whole number of 128 lanes
  # (`kivi_jax.cache.block_granularity` makes the capacity one).
  scale_blocks = math.lcm(p_tok, _LANES) // p_tok if hidden else 1
  if capacity % (scale_blocks * p_tok):
    raise ValueError(f"SKVQ's block capacity ({capacity}) must be a multiple of "
                     f"{scale_blocks * p_tok} tokens for the TPU kernel")
  kernel = functools.partial(
      _kernel, k_bits=k_bits, v_bits=v_bits, group=g,
      sm_scale=1.0 / math.sqrt(d) if sm_scale is None else sm_scale,
      compute_dtype=compute_dtype, hidden=hidden, rope=q_rot is not None,
      pos_offset=pos_offset, chunk_slots=chunk_slots, scale_blocks=scale_blocks)
  blk = lambda rows, cols, index: pl.BlockSpec((None, None, rows, cols), index)
  whole = lambda x: pl.BlockSpec(x.shape, lambda *_: (0,) * x.ndim)  # noqa: E731
  if hidden:  # per-token scales `[n, C]`, tokens last: blocks of whole lanes
    tokens = lambda x: blk(x.shape[-2], scale_blocks * p_tok,  # noqa: E731
                           lambda i, j, s, n, lo: (i, j, 0, s // scale_blocks))
  else:  # KIVI's value scales `[C, D / G]`
    tokens = lambda x: blk(p_tok, x.shape[-1], lambda i, j, s, n, lo: (i, j, s, 0))  # noqa: E731
  if hidden:
    k_specs = [tokens(k_scale), tokens(k_zero)]
    maps = [_group_map(k_groups, k_scale.shape[-2]), _group_map(v_groups, v_scale.shape[-2])]
  else:
    k_rows = _key_scale_rows(w_step)
    k_specs = [blk(k_rows, d, lambda i, j, s, n, lo: (i, j, s * w_step // k_rows, 0))] * 2
    cg = min(g, d)  # channels per value group (kivi_jax.config.channel_group)
    maps = [_group_map(jnp.arange(d) // cg, d // cg)]
  inputs = [q, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, *maps]
  in_specs = [
      blk(m_rows, d, lambda i, j, s, n, lo: (i, j, 0, 0)),
      # The key (value) packing block holding groups s*w_step ..: word-row
      # block (s * w_step) // wk of G rows each.
      blk(g, d, lambda i, j, s, n, lo: (i, j, s * w_step // wk, 0)),
      *k_specs,
      blk(g, d, lambda i, j, s, n, lo: (i, j, s * w_step // wv, 0)),
      tokens(v_scale), tokens(v_zero),
      *(whole(x) for x in maps),
  ]
  if q_rot is not None:
    theta = rope_theta.astype(jnp.float32)[None, :]
    inputs += [q_rot, theta]
    in_specs += [in_specs[0], whole(theta)]
  grid_spec = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=2,
      grid=(b, kh, n_steps),
      in_specs=in_specs,
      out_specs=[
          blk(m_rows, d, lambda i, j, s, n, lo: (i, j, 0, 0)),
          blk(m_rows, 1, lambda i, j, s, n, lo: (i, j, 0, 0)),
      ],
      scratch_shapes=[pltpu.VMEM((m_rows, 1), jnp.float32),
                      pltpu.VMEM((m_rows, 1), jnp.float32),
                      pltpu.VMEM((m_rows, d), jnp.float32)],
  )
  o, lse = pl.pallas_call(
      kernel,
      grid_spec=grid_spec,
      out_shape=[jax.ShapeDtypeStruct((b, kh, m_rows, d), jnp.float32),
                 jax.ShapeDtypeStruct((b, kh, m_rows, 1), jnp.float32)],
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "arbitrary")),
      interpret=interpret,
      name="kivi_decode_attention_tpu",
  )(n_valid.astype(jnp.int32), lo.astype(jnp.int32), *inputs)
  return o, lse[..., 0]
