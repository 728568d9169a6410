"""Decode attention over a KIVI-packed block: Pallas (Triton) GPU kernel + reference.

One decode query per row attends to the quantized block of the cache without
ever materializing it in full precision (SPEC.md, PALLAS_NOTES.md "Algebra that
keeps codes packed"):

  keys, per channel, group g:  q . k_t = (q * s_g) . code_t + q . z_g
  values, per token t, channel group c:
                               sum_t p_t v_t[c] = sum_t (p_t s_t[c]) code_t[c] + sum_t p_t z_t[c]

Codes are read in group slots (`kivi_jax.quantization.pack`): shifting a tile of
G word rows by a static amount yields one whole group of G consecutive tokens,
so a group's key scale folds into the query and its value scales into the
probabilities with no reshapes. The sequence is split across programs (flash
decoding); the splits are merged by log-sum-exp outside the kernel, as is the
full-precision ring (see `kivi_jax.attention`).

Ternary codes (1.5 bits) are base-3 digits, 5 to a byte
(`kivi_jax.quantization`). SKVQ's layout over the hidden dim has kernels of
its own (`decode_attention_hidden`); the reference below reads both layouts
(SKVQ's with `k_groups` and `v_groups`: one "head" of the hidden dim, scales
and zeros `[B, 1, n, C]` per token, tokens last).

Shapes (B batch, K kv heads, M query rows per kv head padded to 16, D head dim,
C block capacity in tokens, G group size, w codes per word):
  q        [B, K, M, D]      model dtype
  k_codes  [B, K, C/w_k, D]  uint32        k_scale, k_zero [B, K, C/G, D]
  v_codes  [B, K, C/w_v, D]  uint32        v_scale, v_zero [B, K, C, D/min(G, D)]
  n_valid  [B] int32: quantized tokens per row (a multiple of G)
  lo       [B] int32: first visible token per row (sliding window; 0 for none)
  q_rot, rope_theta (optional, together): keys cached before RoPE (SKVQ's
           pre_rope). Block token t sits at position p = t + pos_offset, and
           q . rope(k_t) = (q * cos(p theta)) . k_t + (q_rot * sin(p theta)) . k_t
           with q_rot [B, K, M, D] = -rotate_half(q) in the keys' channel order
           and rope_theta [D] f32 each channel's frequency: the kernel scales
           the dequantized tile by cos and sin and runs two score dots.
Returns `(o, lse)`: o [B, K, M, D] float32, attention normalized over the
block; lse [B, K, M] float32, its log-sum-exp (very negative where a row sees no
block token).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from kivi_jax.pallas_kernels.common import MASK_VALUE as _NEG
from kivi_jax.pallas_kernels.common import codes_per_word

# Shared memory the pipelined word tiles may take (an H100 has 227 KiB per block).
_PIPELINE_SMEM_BYTES = 200 * 1024


def unpack_tile(words, first_slot, n_slots: int, bits: float):
  """Slots `first_slot ..` of a `[G, D]` word tile as `[n_slots * G, D]` int32 codes,
  tokens in order (slot j holds the group after slot j - 1)."""
  slot = first_slot + jax.lax.broadcasted_iota(jnp.int32, (n_slots, 1, 1), 0)
  if bits == 1.5:
    # Base-3 digit slot % 5 of byte slot // 5.
    byte = (words[None, :, :] >> (8 * (slot // 5)).astype(jnp.uint32)) & 255
    digit = slot % 5
    div = jnp.where(digit == 0, 1, jnp.where(digit == 1, 3, jnp.where(
        digit == 2, 9, jnp.where(digit == 3, 27, 81)))).astype(jnp.uint32)
    codes = byte // div % 3
  else:
    codes = (words[None, :, :] >> (slot * bits).astype(jnp.uint32)) & (2**bits - 1)
  return codes.reshape(n_slots * words.shape[0], words.shape[1]).astype(jnp.int32)


def dot_precision(compute_dtype):
  """A float32 model gets IEEE float32 dots (Triton's default would be tf32)."""
  return jax.lax.Precision.HIGHEST if compute_dtype == jnp.float32 else None


def live_groups(split, n_ref, lo_ref, g_sz: int, groups_per_split: int):
  """Groups `[first, last)` of split `split` that hold live tokens (below
  `n_ref[0]`, from the group of `lo_ref[0]` on), and the split's first group."""
  base = split * groups_per_split
  first = jnp.maximum(base, lo_ref[0] // g_sz)
  last = jnp.minimum(base + groups_per_split, n_ref[0] // g_sz)
  return first, last, base


def _kernel(q_ref, kw_ref, ks_ref, kz_ref, vw_ref, vs_ref, vz_ref, n_ref, lo_ref, *refs,
            k_bits: float, v_bits: float, group: int, block_tokens: int,
            groups_per_split: int, sm_scale: float, compute_dtype, rope: bool,
            pos_offset: int):
  """One program: batch row b, kv head h, split s over groups of the block.

  The outer loop walks steps of `w_min` groups, one packing block of the
  tensor with fewer codes per word, loading each tensor's word tile once per
  step (per chunk where the two word sizes are not multiples of each other:
  ternary's 20 and another's 16). The inner loop dequantizes `block_tokens`
  tokens of both tensors in registers and runs one score dot and one value
  dot on them.
  """
  if rope:
    qr_ref, theta, refs = refs[0], refs[1][...][None, :], refs[2:]
  acc_ref, m_ref, l_ref = refs
  g_sz = group
  wk, wv = codes_per_word(k_bits), codes_per_word(v_bits)
  w_min = min(wk, wv)
  aligned = wk % w_min == 0 and wv % w_min == 0
  chunk_slots = block_tokens // g_sz
  n_chunks = w_min // chunk_slots
  m_rows, d = q_ref.shape
  cg = min(g_sz, d)  # channels per value group (kivi_jax.config.channel_group)
  n_cgroups = d // cg
  split = pl.program_id(2)

  precision = dot_precision(compute_dtype)
  q = q_ref[...].astype(compute_dtype)  # [M, D]
  q_rot = qr_ref[...].astype(compute_dtype) if rope else None
  lo_tok = lo_ref[0]
  first, last, _ = live_groups(split, n_ref, lo_ref, g_sz, groups_per_split)
  tok_in_chunk = jax.lax.broadcasted_iota(jnp.int32, (1, block_tokens), 1)

  def words(ref, g, w):
    return ref[pl.ds(pl.multiple_of((g // w) * g_sz, g_sz), g_sz), :]  # [G, D] uint32

  def step(st, carry):
    g0 = st * w_min
    kw, vw = (words(kw_ref, g0, wk), words(vw_ref, g0, wv)) if aligned else (None, None)

    def chunk(c, carry):
      m_prev, l_prev, acc = carry
      g = g0 + c * chunk_slots  # first group of the chunk
      tok0 = pl.multiple_of(g * g_sz, block_tokens)
      rows = pl.ds(tok0, block_tokens)
      kw_c, vw_c = (kw, vw) if aligned else (words(kw_ref, g, wk), words(vw_ref, g, wv))
      kc = unpack_tile(kw_c, g % wk, chunk_slots, k_bits).astype(jnp.float32)
      # Keys [P, D], dequantized in float32 and rounded once to the dot's
      # dtype: bf16 arithmetic here (two roundings) measured 2-3x the error on
      # the H100. Each group's per-channel scale and zero, broadcast over its tokens.
      ks = ks_ref[pl.ds(g, chunk_slots), :].astype(jnp.float32)  # [slots, D]
      kz = kz_ref[pl.ds(g, chunk_slots), :].astype(jnp.float32)
      shape3 = (chunk_slots, g_sz, d)
      k = (kc.reshape(shape3) * ks[:, None, :] + kz[:, None, :]).reshape(block_tokens, d)

      def scores(q, k):
        return jax.lax.dot_general(q, k.astype(compute_dtype), (((1,), (1,)), ((), ())),
                                   precision=precision,
                                   preferred_element_type=jnp.float32)  # [M, P]
      if rope:
        pos = (tok0 + pos_offset + jax.lax.broadcasted_iota(jnp.int32, (block_tokens, 1), 0)
               ).astype(jnp.float32)
        angle = pos * theta  # [P, D], as apply_rope: position times frequency in f32
        s = scores(q, k * jnp.cos(angle)) + scores(q_rot, k * jnp.sin(angle))
      else:
        s = scores(q, k)
      s = s * sm_scale
      tok = tok0 + tok_in_chunk
      live = (tok >= first * g_sz) & (tok < last * g_sz) & (tok >= lo_tok)  # [1, P]
      s = jnp.where(live, s, _NEG)
      m_new = jnp.maximum(m_prev, jnp.max(s, axis=1))
      corr = jnp.exp(m_prev - m_new)
      p = jnp.where(live, jnp.exp(s - m_new[:, None]), 0.0)  # [M, P]
      l_new = l_prev * corr + jnp.sum(p, axis=1)
      # Values [P, D]: per-token scale and zero of each channel group.
      vs = vs_ref[rows, :].astype(jnp.float32)  # [P, D/cg]
      vz = vz_ref[rows, :].astype(jnp.float32)
      full = (block_tokens, n_cgroups, cg)
      vs = jnp.broadcast_to(vs[:, :, None], full).reshape(block_tokens, d)
      vz = jnp.broadcast_to(vz[:, :, None], full).reshape(block_tokens, d)
      vc = unpack_tile(vw_c, g % wv, chunk_slots, v_bits).astype(jnp.float32)
      v = (vc * vs + vz).astype(compute_dtype)
      pv = jax.lax.dot_general(p.astype(compute_dtype), v, (((1,), (0,)), ((), ())),
                               precision=precision,
                               preferred_element_type=jnp.float32)  # [M, D]
      return m_new, l_new, acc * corr[:, None] + pv

    return jax.lax.fori_loop(0, n_chunks, chunk, carry)

  init = (jnp.full((m_rows,), _NEG, jnp.float32), jnp.zeros((m_rows,), jnp.float32),
          jnp.zeros((m_rows, d), jnp.float32))
  st_first = first // w_min
  st_last = jnp.maximum(st_first, (last + w_min - 1) // w_min)
  m, l, acc = jax.lax.fori_loop(st_first, st_last, step, init)
  acc_ref[...] = acc
  m_ref[...] = m
  l_ref[...] = l


def partial_outputs(b: int, kh: int, n: int, m_rows: int, d: int):
  """`(out_specs, out_shape)` of a kernel over the grid `(B, K, N)` whose
  program `(i, h, j)` writes one unnormalized partial: `acc [B, K, N, M, D]`,
  `m` and `l` `[B, K, N, M]`, float32, as `merge_partials` takes them."""
  out_specs = [
      pl.BlockSpec((None, None, None, m_rows, d), lambda i, h, j: (i, h, j, 0, 0)),
      pl.BlockSpec((None, None, None, m_rows), lambda i, h, j: (i, h, j, 0)),
      pl.BlockSpec((None, None, None, m_rows), lambda i, h, j: (i, h, j, 0)),
  ]
  out_shape = [
      jax.ShapeDtypeStruct((b, kh, n, m_rows, d), jnp.float32),
      jax.ShapeDtypeStruct((b, kh, n, m_rows), jnp.float32),
      jax.ShapeDtypeStruct((b, kh, n, m_rows), jnp.float32),
  ]
  return out_specs, out_shape


def merge_partials(acc, m, l):
  """Merges unnormalized partials over axis -3 (splits): acc [..., S, M, D], m/l [..., S, M].

  Returns (o [..., M, D], lse [..., M]); rows with no live key get o = 0.
  """
  m_all = jnp.max(m, axis=-2)
  w = jnp.exp(m - m_all[..., None, :])
  l_all = jnp.sum(w * l, axis=-2)
  acc_all = jnp.sum(w[..., None] * acc, axis=-3)
  o = acc_all / jnp.where(l_all > 0, l_all, 1.0)[..., None]
  lse = jnp.where(l_all > 0, m_all + jnp.log(jnp.where(l_all > 0, l_all, 1.0)), _NEG)
  return o, lse


def pallas_call(kernel, inputs, in_specs, out_specs, out_shape, *, grid, poison: bool,
                num_warps: int, num_stages: int, interpret: bool, name: str):
  """`pl.pallas_call` on Triton, applied to `inputs`. With `poison` every output
  starts as NaN (an aliased input the kernel does not see), so an element the
  kernel fails to write shows."""
  aliases = {}
  if poison:
    n_in, n_out = len(inputs), len(out_shape)
    inputs = [*inputs, *(jnp.full(o.shape, jnp.nan, o.dtype) for o in out_shape)]
    in_specs = [*in_specs, *out_specs]
    aliases = {n_in + i: i for i in range(n_out)}
    kernel = functools.partial(
        lambda k, *refs: k(*refs[:n_in], *refs[n_in + n_out:]), kernel)
  return pl.pallas_call(
      kernel,
      grid=grid,
      in_specs=in_specs,
      out_specs=out_specs,
      out_shape=out_shape,
      input_output_aliases=aliases,
      compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages),
      interpret=interpret,
      name=name,
  )(*inputs)


def default_splits(batch: int, kv_heads: int, n_steps: int,
                   target_programs: int = 1024) -> int:
  """Enough sequence splits that batch x heads x splits fills a large GPU."""
  want = -(-target_programs // (batch * kv_heads))
  return max(1, min(want, n_steps))


@functools.partial(jax.jit, static_argnames=(
    "k_bits", "v_bits", "group_size", "pos_offset", "block_tokens", "splits",
    "num_warps", "num_stages", "interpret", "poison"))
def quantized_decode_partials(q, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero,
                              n_valid, lo, q_rot=None, rope_theta=None, *, k_bits: float,
                              v_bits: float, group_size: int, pos_offset: int = 0,
                              block_tokens: int | None = None, splits: int | None = None,
                              num_warps: int = 2, num_stages: int | None = None,
                              interpret: bool = False, poison: bool = False):
  """Per-split partials `(acc [B, K, S, M, D], m [B, K, S, M], l [B, K, S, M])`.

  `block_tokens` tokens are dequantized per inner step
  (a multiple of the group size dividing one packing block of each tensor);
  `splits` programs share each row's sequence. `num_stages` (Triton's
  software pipelining) defaults to 3 where that many copies of the two word
  tiles fit in shared memory, else 1 (ternary values beside 2-bit keys in
  128 x 128 tiles asked an H100 for 326 KiB). With `poison`, the outputs start
  as NaN (aliased inputs), so an element the kernel fails to write shows.
  """
  b, kh, m_rows, d = q.shape
  g = group_size
  w_min = min(codes_per_word(k_bits), codes_per_word(v_bits))
  if block_tokens is None:
    # One group per step: on the H100 small tiles and 2 warps beat larger ones
    # (more programs resident per SM; benchmarks/NOTES.md).
    block_tokens = g
  # A chunk's groups must share a word row of each tensor (a packing block).
  blocks = [codes_per_word(bits) * g for bits in (k_bits, v_bits)]
  if block_tokens % g or any(n % block_tokens for n in blocks):
    raise ValueError(f"block_tokens={block_tokens} must be a multiple of group_size={g} "
                     f"dividing {' and '.join(map(str, sorted(set(blocks))))}")
  capacity = k_codes.shape[2] * codes_per_word(k_bits)
  n_steps = capacity // (w_min * g)
  if splits is None:
    splits = default_splits(b, kh, n_steps)
  groups_per_split = -(-n_steps // splits) * w_min
  compute_dtype = jnp.float32 if q.dtype == jnp.float32 else jnp.bfloat16
  if num_stages is None:
    num_stages = 3 if 3 * (2 * g * d * 4) <= _PIPELINE_SMEM_BYTES else 1
  kernel = functools.partial(
      _kernel, k_bits=k_bits, v_bits=v_bits, group=g, block_tokens=block_tokens,
      groups_per_split=groups_per_split, sm_scale=1.0 / math.sqrt(d),
      compute_dtype=compute_dtype, rope=q_rot is not None, pos_offset=pos_offset)
  slab = lambda x: pl.BlockSpec((None, None, *x.shape[2:]), lambda i, j, s: (i, j, 0, 0))
  row = pl.BlockSpec((1,), lambda i, j, s: (i,))
  out_specs, out_shape = partial_outputs(b, kh, splits, m_rows, d)
  inputs = [q, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero,
            n_valid.astype(jnp.int32), lo.astype(jnp.int32)]
  in_specs = [slab(q), slab(k_codes), slab(k_scale), slab(k_zero), slab(v_codes),
              slab(v_scale), slab(v_zero), row, row]
  if (q_rot is None) != (rope_theta is None):
    raise ValueError("q_rot and rope_theta go together")
  if q_rot is not None:
    inputs += [q_rot, rope_theta.astype(jnp.float32)]
    in_specs += [slab(q_rot), pl.BlockSpec((d,), lambda i, j, s: (0,))]
  acc, m, l = pallas_call(kernel, inputs, in_specs, out_specs, out_shape,
                          grid=(b, kh, splits), poison=poison, num_warps=num_warps,
                          num_stages=num_stages, interpret=interpret,
                          name="kivi_decode_attention")
  # As JAX's own decode attention: keep XLA from fusing the merge into the
  # kernel's consumers in a way that produced NaNs there.
  return jax.lax.optimization_barrier((acc, m, l))


def quantized_decode_attention(*args, **kwargs):
  """Attention of `q` over the quantized block: `(o, lse)` (module docstring).

  Takes the arguments of `quantized_decode_partials` and merges its splits.
  """
  return merge_partials(*quantized_decode_partials(*args, **kwargs))


def quantized_decode_attention_reference(q, k_codes, k_scale, k_zero, v_codes, v_scale,
                                         v_zero, n_valid, lo, k_groups=None, v_groups=None,
                                         q_rot=None, rope_theta=None, *, k_bits: float,
                                         v_bits: float, group_size: int,
                                         sm_scale: float | None = None, pos_offset: int = 0,
                                         dot_dtype=jnp.float32):
  """The same function in plain jnp: dequantize the block, mask, softmax.

  Float32 throughout by default. With `dot_dtype=bfloat16` the operands of
  both dots are rounded as the kernel rounds them for bf16 inputs: keys and
  values dequantized in float32 then rounded once (SKVQ's values, as
  `decode_attention_hidden`'s kernels take them: codes times scale rounded,
  the zeros added unrounded, their term a product of its own),
  probabilities rounded (relative to the row's global maximum here, to the
  running maximum in the kernel: the one rounding that is not reproduced
  exactly).
  """
  from kivi_jax import quantization
  g = group_size
  d = q.shape[-1]
  rnd = lambda x: x.astype(dot_dtype).astype(jnp.float32)  # noqa: E731
  k_axis, k_map, v_map = "channel", None, None
  if k_groups is not None:  # SKVQ's scales `[..., n, C]`, tokens last
    k_scale, k_zero, v_scale, v_zero = (jnp.swapaxes(x, -1, -2)
                                        for x in (k_scale, k_zero, v_scale, v_zero))
    k_axis, k_map = "token", (k_groups, k_scale.shape[-1])
    v_map = (v_groups, v_scale.shape[-1])
  # The block's capacity is its scales'; codes may take more (whole packing
  # blocks of SKVQ's layout, `kivi_jax.cache._empty_block`).
  capacity = v_scale.shape[-2]
  unpack = lambda c, bits: quantization.unpack(c, bits, g)[..., :capacity, :]  # noqa: E731
  keys = quantization.dequantize(unpack(k_codes, k_bits), k_scale, k_zero, g, k_axis,
                                 jnp.float32, k_map)
  v_codes = unpack(v_codes, v_bits)
  v_deq = lambda c, z: quantization.dequantize(c, v_scale, z, g, "token",  # noqa: E731
                                               jnp.float32, v_map)
  if v_map is None:
    values = rnd(v_deq(v_codes, v_zero))
  else:
    values = rnd(v_deq(v_codes, jnp.zeros_like(v_zero))) + v_deq(jnp.zeros_like(v_codes),
                                                                v_zero)
  sm_scale = 1.0 / math.sqrt(d) if sm_scale is None else sm_scale
  if q_rot is None:
    s = jnp.einsum("bkmd,bktd->bkmt", q.astype(jnp.float32), rnd(keys))
  else:
    angle = (jnp.arange(keys.shape[2]) + pos_offset).astype(jnp.float32)[:, None] * rope_theta
    s = (jnp.einsum("bkmd,bktd->bkmt", q.astype(jnp.float32), rnd(keys * jnp.cos(angle)))
         + jnp.einsum("bkmd,bktd->bkmt", q_rot.astype(jnp.float32),
                      rnd(keys * jnp.sin(angle))))
  s = s * sm_scale
  t = jnp.arange(keys.shape[2])
  live = (t[None, :] < n_valid[:, None]) & (t[None, :] >= lo[:, None])  # [B, T]
  s = jnp.where(live[:, None, None, :], s, _NEG)
  m = jnp.max(s, axis=-1)
  p = jnp.where(live[:, None, None, :], jnp.exp(s - m[..., None]), 0.0)
  l = jnp.sum(p, axis=-1)
  acc = jnp.einsum("bkmt,bktd->bkmd", rnd(p), values)
  return merge_partials(acc[:, :, None], m[:, :, None], l[:, :, None])
