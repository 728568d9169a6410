"""Prototype: the KIVI-2 decode block kernel in Mosaic GPU (see README.md here).

Per (batch row, kv head, split), one warpgroup walks the split's packing blocks
(16 groups of 32 tokens in a [32, 128] uint32 word tile). Each word tile
arrives by TMA twice, into the two halves of a 64-row buffer, so that one
WGMMA-layout array holds a pair of slots (two groups, 64 tokens). Per pair:
keys dequantized in registers and stored to shared memory as bf16,
S^T = K Q^T by `wgmma` (the query padded to N = 16 rows), an online softmax
over the token axis, values dequantized likewise and O^T += V^T P^T by `wgmma`.
Outputs the split's unnormalized O^T [D, N], max m [N] and sum l [N], as
`kivi_jax.pallas_kernels.decode_attention.quantized_decode_partials` does (transposed).

Inputs: q [B, K, N, D] bf16; k_codes, v_codes [B, K, C/16, D] uint32 (2-bit,
`kivi_jax.quantization.pack`'s slot layout); k_scale, k_zero [B, K, C/32, D];
v_scale, v_zero TRANSPOSED [B, K, D/32, C] (the cache holds [B, K, C, D/32]: a
TMA box needs 16 bytes on its inner dimension); n_valid [B] int32. With
`keys_pairs` the key words are [B, K, C, 8] and with `values_pairs` the value
words [B, K, D, C/16], both in the pair layout (`key_pair_words`), and the
dequantized tiles never reach shared memory (benchmarks/NOTES.md "Codes in the
operand's layout").

`Options` are the versions measured (benchmarks/NOTES.md "Mosaic GPU prototype").
With `interpret` (jax 0.10.2's Mosaic GPU interpret mode, CPU), operations the
interpreter lacks (`plgpu.load` layouts, `layout_cast`, `transpose_ref`,
`run_state`) take equivalent plain paths.
"""
import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax._src.lib.mlir import ir
from jax._src.lib.mlir.dialects import arith, llvm, vector
from jax.experimental import pallas as pl
from jax.experimental.mosaic import gpu as mgpu
from jax.experimental.mosaic.gpu import utils as mgpu_utils
from jax.experimental.pallas import mosaic_gpu as plgpu

G, D, N = 32, 128, 16
W = 16  # 2-bit codes per word
PB = W * G  # tokens per packing block
NEG = -1e30


@dataclasses.dataclass(frozen=True)
class Options:
  stages: int = 2           # TMA buffers of word tiles and scales
  unrolled: bool = False    # the 8 slot pairs of a tile unrolled in Python, not a loop
  shared_dq: bool = False   # keys and values dequantized into one buffer (swizzle 32)
  reload_words: bool = False  # word tiles loaded from shared memory per pair, not held
  magic: bool = False       # codes to float32 by an OR into 2^23 and a subtraction
  prealign: bool = False    # the pair's second slot shifted once per tile
  chunk: int = 1            # slot pairs per softmax update (one cross-warp max)
  defer_sum: bool = False   # the softmax sum kept per element, reduced once
  swizzle_words: bool = False  # word tiles swizzled in shared memory, optimized loads
  keys_only: bool = False   # timing only: no values (wrong output)
  const_scales: bool = False  # timing only: constants for scales and zeros (wrong output)
  keys_in_registers: bool = False  # S^T's A operand: the keys in registers, not stored
  values_in_registers: bool = False  # O^T's A operand likewise: value words channel-major
  # Keys in the pair layout (`key_pair_words`), dequantized by `_dequant_pairs`.
  keys_pairs: bool = False
  # Values likewise (V^T's words channel-major in the pair layout along tokens):
  # per two slot pairs one V^T [128, 128] A operand from registers (chunk 2, 4 or 8).
  values_pairs: bool = False
  # Pallas inserts no barrier of its own (`unsafe_no_auto_barriers`): one
  # `commit_smem` a step before the refetch, one a V^T P^T product after its
  # probabilities, which alternate between two buffers (pair layouts only).
  manual_barriers: bool = False
  approx_math: bool = False  # `CompilerParams(approx_math=True)`: exp by ex2.approx
  # Scores and softmax over 8 query rows (S^T [64, 8], wgmma N = 8), the
  # probabilities padded with zeros to P^T's 16 columns (pair layouts only).
  rows8: bool = False


def key_pair_words(codes):
  """2-bit codes [..., R, 128 n] -> uint32 words [..., R, 8 n], the pair layout:
  of each 128 columns, word 2j + h holds column 16s + 8h + 2j + e at bit 2s + 16e
  (s < 8, e < 2), so that a thread's two words of a row in the WGMMA layout
  (words 2j, 2j+1) give by `(w >> 2s) & 0x30003 | 0x43004300` its bf16 pairs of
  k-step s."""
  codes = jnp.asarray(codes, jnp.uint32)
  *lead, r, n = codes.shape
  c = codes.reshape(*lead, r, n // D, D // 16, 2, 4, 2)  # column 16s + 8h + 2j + e
  bit = (2 * jnp.arange(D // 16)[:, None, None, None]
         + 16 * jnp.arange(2)).astype(jnp.uint32)  # [s, 1, 1, e]
  words = jnp.sum(c << bit, axis=(-4, -1), dtype=jnp.uint32)  # [..., R, n, h, j]
  return jnp.swapaxes(words, -1, -2).reshape(*lead, r, n // 16)


def _dequant_pairs(words, scale_ref, zero_ref):
  """uint32 words [R, 8] (`key_pair_words` of codes [R, 128]; WGMMA layout) ->
  bf16 [R, 128] = code * scale + zero in the WGMMA layout wgmma's A operand takes,
  row r's scales and zeros at row r // 32 of `scale_ref`, `zero_ref` [R / 32, 128].
  Per register (two codes): a shift, an and/or into bf16 pairs 128 + code, a
  subtraction of 128 (exact) and one bf16x2 fma (one rounding, as the reference)."""
  wg = plgpu.Layout.WGMMA
  rows = words.shape[0]

  @plgpu.inline_mgpu(arg_types=(wg, plgpu.RefType(), plgpu.RefType()),
                     return_type=plgpu.ShapeDtypeStruct((rows, D), jnp.bfloat16, wg))
  def dequant(ctx, w, scales, zeros):
    del ctx
    i32, index = ir.IntegerType.get_signless(32), ir.IndexType.get()
    pair = ir.VectorType.get((2,), ir.BF16Type.get())
    layout = mgpu.WGMMA_LAYOUT
    out = np.empty(layout.registers_shape((rows, D)), dtype=object)
    where = dict(zip(np.ndindex(out.shape), layout.thread_idxs((rows, D))))
    loaded = {}  # rows r and r + 8 of a thread (h = 0, 1) lie in one group of 32
    for idx in np.ndindex(out.shape):
      rt, ct, h = idx[0], idx[1], idx[4]
      word = mgpu_utils.bitcast(mgpu_utils.vector_slice(
          w.registers[rt, 0, 0, 0, h, 0, 0, 0, 0], slice(ct % 2, ct % 2 + 1)), i32)
      if (rt, ct) not in loaded:
        row, col = where[idx]
        at = [arith.divui(row, mgpu_utils.c(32, index)), col]
        loaded[rt, ct] = [mgpu_utils.bitcast(vector.load(pair, ref, at), i32)
                          for ref in (scales, zeros)]
      sz = loaded[rt, ct]
      x = llvm.inline_asm(i32, [word, *sz], f"""
          {{
          .reg .b32 t, m;
          shr.b32 t, $1, {2 * (ct // 2)};
          lop3.b32 t, t, 0x00030003, 0x43004300, 0xea;
          mov.b32 m, 0x43004300;
          sub.bf16x2 t, t, m;
          fma.rn.bf16x2 $0, t, $2, $3;
          }}""", "=r,r,r,r")
      out[idx] = mgpu_utils.bitcast(x, pair)
    return mgpu.FragmentedArray(_registers=out, _layout=layout, _is_signed=None)
  return dequant(words, scale_ref, zero_ref)


def _pad_columns(x, fill, layout):
  """x [..., 8] in the WGMMA `layout` (or its column vector) -> [..., 16], the
  new columns `fill`: their registers are constants, no instruction a value."""
  shape = (*x.shape[:-1], 2 * x.shape[-1])

  @plgpu.inline_mgpu(arg_types=(layout,),
                     return_type=plgpu.ShapeDtypeStruct(shape, x.dtype, layout))
  def pad(ctx, a):
    del ctx
    ty = ir.BF16Type.get() if x.dtype == jnp.bfloat16 else ir.F32Type.get()
    full = mgpu.FragmentedArray.splat(mgpu_utils.c(fill, ty), shape, a.layout)
    regs = np.array(full.registers)
    col = len(shape) - 1  # the column-tile dimension of the registers
    regs[(slice(None),) * col + (slice(0, a.registers.shape[col]),)] = a.registers
    return mgpu.FragmentedArray(_registers=regs, _layout=a.layout, _is_signed=None)
  return pad(x)


def build(B, K, C, splits, opts=Options(), interpret=None):
  n_pb = C // PB
  pb_per_split = -(-n_pb // splits)
  stages = opts.stages
  sm_scale = 1 / math.sqrt(D)
  WG = plgpu.Layout.WGMMA
  interp = interpret is not None
  # V^T [D, tokens] as wgmma's A operand from registers needs the value words with
  # channels as rows: `vw` arrives as [B, K, D, C/W] (the cache's words transposed)
  # and one [D, G] tile serves both slots of a pair (shifts 4 jp and 4 jp + 2).
  vp = opts.values_pairs
  if vp and (opts.chunk not in (2, 4, 8) or opts.values_in_registers or opts.const_scales
             or interp):
    raise ValueError("values_pairs: compiled only, chunk 2, 4 or 8, real scales")
  vin = opts.values_in_registers or vp  # value words [B, K, D, C/W], one copy a block
  if vin and (interp or opts.swizzle_words or opts.reload_words):
    raise ValueError("values_in_registers: compiled only, with plain word tiles held")
  kp = opts.keys_pairs
  if kp and (interp or opts.swizzle_words or opts.reload_words or opts.magic
             or opts.const_scales):
    raise ValueError("keys_pairs: compiled only, plain word tiles, real scales")
  if (opts.manual_barriers or opts.rows8) and not (kp and vp):
    raise ValueError("manual_barriers, rows8: with keys_pairs and values_pairs only")
  NS = 8 if opts.rows8 else N  # query rows of the scores and the softmax

  def lc(x, layout):
    return x if interp else plgpu.layout_cast(x, layout)

  def iota(shape, dim):
    if interp:
      return lax.broadcasted_iota(jnp.int32, shape, dim)
    return plgpu.broadcasted_iota(jnp.int32, shape, dim, layout=WG)

  def ld(ref, layout, optimized=False):
    return ref[...] if interp else plgpu.load(ref, (), layout=layout, optimized=optimized)

  def to_f32(c):
    if not opts.magic:
      return c.astype(jnp.float32)
    return lax.bitcast_convert_type(c | jnp.uint32(0x4B000000), jnp.float32) - 8388608.0

  def T(ref):
    return ref if interp else plgpu.transpose_ref(ref, (1, 0))

  def kernel(q_ref, kw_ref, ks_ref, kz_ref, vw_ref, vs_ref, vz_ref, n_ref,
             o_out, m_out, l_out,
             q_smem, kw_smem, ks_smem, kz_smem, vw_smem, vs_smem, vz_smem, *rest):
    if kp and vp:  # both operands from registers: no dequantized tile in shared memory
      kdq_smem = vdq_smem = None
      p_smem, bar_q, bars = rest
    elif opts.shared_dq:
      kdq_smem, p_smem, bar_q, bars = rest
      vdq_smem = kdq_smem
    else:
      kdq_smem, vdq_smem, p_smem, bar_q, bars = rest
    b, h, s = lax.axis_index("b"), lax.axis_index("h"), lax.axis_index("s")
    pb0 = s * pb_per_split
    n_valid = n_ref[b]
    n_steps = jnp.clip((n_valid + PB - 1) // PB - pb0, 0, pb_per_split)

    def fetch(i, slot):
      pb = pb0 + i
      bar = bars.at[slot]
      if vin:
        plgpu.copy_gmem_to_smem(vw_ref.at[b, h, :, pl.ds(pb * G, G)], vw_smem.at[slot], bar)
      for half in range(2):
        if kp:  # a TMA box holds at most 256 rows
          plgpu.copy_gmem_to_smem(kw_ref.at[b, h, pl.ds(pb * PB + half * 256, 256)],
                                  kw_smem.at[slot, pl.ds(half * 256, 256)], bar)
        else:
          plgpu.copy_gmem_to_smem(kw_ref.at[b, h, pl.ds(pb * G, G)],
                                  kw_smem.at[slot, pl.ds(half * G, G)], bar)
        if not vin:
          plgpu.copy_gmem_to_smem(vw_ref.at[b, h, pl.ds(pb * G, G)],
                                  vw_smem.at[slot, pl.ds(half * G, G)], bar)
        plgpu.copy_gmem_to_smem(vs_ref.at[b, h, :, pl.ds(pb * PB + half * 256, 256)],
                                vs_smem.at[slot, half], bar)
        plgpu.copy_gmem_to_smem(vz_ref.at[b, h, :, pl.ds(pb * PB + half * 256, 256)],
                                vz_smem.at[slot, half], bar)
      plgpu.copy_gmem_to_smem(ks_ref.at[b, h, pl.ds(pb * W, W)], ks_smem.at[slot], bar)
      plgpu.copy_gmem_to_smem(kz_ref.at[b, h, pl.ds(pb * W, W)], kz_smem.at[slot], bar)

    plgpu.copy_gmem_to_smem(q_ref.at[b, h, pl.ds(0, NS)], q_smem, bar_q)
    for i in range(min(stages - 1, pb_per_split)):
      pl.when(i < n_steps)(lambda i=i: fetch(i, i))
    plgpu.barrier_wait(bar_q)
    upper = iota((2 * G, D), 0) < G  # rows of the pair's first slot
    cgrp = iota((2 * G, D), 1) // G  # channel group of each column
    tok_in = iota((2 * G, NS), 0)
    bc_col = lambda v: lax.broadcast_in_dim(v, (2 * G, D), [1])
    bc_row = lambda v: lax.broadcast_in_dim(v, (2 * G, D), [0])
    cgrp_t = iota((D, G), 0) // G if vin else None  # channel group of each row of V^T
    bc_tok = lambda v: lax.broadcast_in_dim(v, (D, G), [1])

    def step(i, carry):
      slot = lax.rem(i, stages)
      if opts.manual_barriers:  # every warp done reading the slot refetched below
        plgpu.commit_smem()

      @pl.when(i + stages - 1 < n_steps)
      def _():
        fetch(i + stages - 1, lax.rem(i + stages - 1, stages))
      plgpu.barrier_wait(bars.at[slot])

      def words(ref):
        w = ld(ref.at[slot], WG, opts.swizzle_words)
        return jnp.where(upper, w, w >> 2) if opts.prealign else w
      kwords = vwords = None
      if not opts.reload_words:
        kwords = None if kp else words(kw_smem)
        vwords = None if vp else ld(vw_smem.at[slot], WG) if vin else words(vw_smem)

      def keys(jp):
        """Scores S^T [64 tokens, N] of slot pair `jp`, scaled and masked."""
        if opts.prealign:
          shift = jnp.asarray(4 * jp).astype(jnp.uint32)
        else:
          shift = jnp.where(upper, 4 * jp, 4 * jp + 2).astype(jnp.uint32)
        if kp:
          k = _dequant_pairs(ld(kw_smem.at[slot, pl.ds(2 * G * jp, 2 * G)], WG),
                             ks_smem.at[slot, pl.ds(2 * jp, 2)],
                             kz_smem.at[slot, pl.ds(2 * jp, 2)])
        else:
          kws = words(kw_smem) if opts.reload_words else kwords
          kc = to_f32((kws >> shift) & 3)
          if opts.const_scales:
            k = kc * jnp.where(upper, 0.5, 0.25) + jnp.where(upper, 0.1, 0.2)
          else:
            sk = [ld(ks_smem.at[slot, 2 * jp + u], WG.reduce(0)).astype(jnp.float32)
                  for u in (0, 1)]
            zk = [ld(kz_smem.at[slot, 2 * jp + u], WG.reduce(0)).astype(jnp.float32)
                  for u in (0, 1)]
            k = kc * jnp.where(upper, bc_col(sk[0]), bc_col(sk[1])) + jnp.where(
                upper, bc_col(zk[0]), bc_col(zk[1]))
        if (opts.keys_in_registers or kp) and not interp:
          # k is in the WGMMA layout (its words were loaded so): wgmma's A operand
          # as it is, with no shared-memory round trip (NOTES.md "BitDecoding, read").
          def qk(acc_ref):
            plgpu.wgmma(acc_ref, k.astype(jnp.bfloat16), T(q_smem))
            return acc_ref[...]
        else:
          kdq_smem[...] = k.astype(jnp.bfloat16)
          plgpu.commit_smem()

          def qk(acc_ref):
            plgpu.wgmma(acc_ref, kdq_smem, T(q_smem))
            return acc_ref[...]
        st = pl.run_scoped(qk, plgpu.ACC((2 * G, NS), jnp.float32)) * sm_scale
        tok = (pb0 + i) * PB + 2 * G * jp + tok_in
        return jnp.where(tok < n_valid, st, NEG), shift

      def values_from_registers(jp, p, acc):
        """acc + V^T P^T over slot pair `jp`, V^T [D, G] per slot in registers."""
        vts = []
        for u in range(2):  # the pair's two slots, tokens 32 u .. of its 64
          vc = to_f32((vwords >> (4 * jp + 2 * u)) & 3)  # [D, G]
          if opts.const_scales:
            vts.append((vc * jnp.where(cgrp_t == 0, 0.5, 0.25) + 0.1).astype(jnp.bfloat16))
            continue

          def per_group(ref):  # [D, G]: each row's channel group's scale of each token
            rows = [bc_tok(ld(ref.at[slot, jp // 4, g, pl.ds(2 * G * (jp % 4) + G * u, G)],
                              WG.reduce(0)).astype(jnp.float32)) for g in range(D // G)]
            return jnp.where(cgrp_t == 0, rows[0], jnp.where(
                cgrp_t == 1, rows[1], jnp.where(cgrp_t == 2, rows[2], rows[3])))
          vts.append((vc * per_group(vs_smem) + per_group(vz_smem)).astype(jnp.bfloat16))
        p_smem[...] = p.astype(jnp.bfloat16)
        plgpu.commit_smem()

        def pv(acc_ref):
          for u in range(2):
            plgpu.wgmma(acc_ref, vts[u], p_smem.at[pl.ds(G * u, G)])
        return pl.run_state(pv)(plgpu.ACC.init(acc))

      def values_pairs(c, ps, acc):
        """acc + V^T P^T over slot pairs 2c, 2c + 1 (128 tokens, `ps` their
        probabilities), V^T [D, 128] dequantized in registers (`_dequant_pairs`)."""
        vt = _dequant_pairs(ld(vw_smem.at[slot, :, pl.ds(8 * c, 8)], WG),
                            vs_smem.at[slot, c // 2, :, pl.ds(128 * (c % 2), 128)],
                            vz_smem.at[slot, c // 2, :, pl.ds(128 * (c % 2), 128)])
        # With manual barriers the buffer alternates: the commit before the
        # other buffer's product follows every warp's wait on this one's last.
        p_buf = p_smem.at[lax.rem(c, 2)] if opts.manual_barriers else p_smem
        for u in range(2):
          pu = ps[u].astype(jnp.bfloat16)
          p_buf[pl.ds(2 * G * u, 2 * G)] = _pad_columns(pu, 0.0, WG) if opts.rows8 else pu
        plgpu.commit_smem()

        def pv(acc_ref):
          plgpu.wgmma(acc_ref, vt, p_buf)
        return pl.run_state(pv)(plgpu.ACC.init(acc))

      def values(jp, shift, p, acc):
        """acc + V^T P^T over slot pair `jp`."""
        if vin:
          return values_from_registers(jp, p, acc)
        vws = words(vw_smem) if opts.reload_words else vwords
        vc = to_f32((vws >> shift) & 3)
        if opts.const_scales:
          v = vc * jnp.where(cgrp == 0, 0.5, 0.25) + jnp.where(cgrp == 1, 0.1, 0.2)
        else:
          def per_group(ref):  # [64, D]: each token's value of each column's group
            cols = [bc_row(ld(ref.at[slot, jp // 4, g, pl.ds(2 * G * (jp % 4), 2 * G)],
                              WG.reduce(1)).astype(jnp.float32)) for g in range(D // G)]
            return jnp.where(cgrp == 0, cols[0], jnp.where(
                cgrp == 1, cols[1], jnp.where(cgrp == 2, cols[2], cols[3])))
          v = vc * per_group(vs_smem) + per_group(vz_smem)
        vdq_smem[...] = v.astype(jnp.bfloat16).T if interp else v.astype(jnp.bfloat16)
        p_smem[...] = p.astype(jnp.bfloat16)
        plgpu.commit_smem()
        if interp:
          def pv_new(acc_ref):
            plgpu.wgmma(acc_ref, vdq_smem, p_smem)
            return acc_ref[...]
          return acc + pl.run_scoped(pv_new, plgpu.ACC((D, N), jnp.float32))

        def pv(acc_ref):
          plgpu.wgmma(acc_ref, T(vdq_smem), p_smem)
        return pl.run_state(pv)(plgpu.ACC.init(acc))

      def pairs(c, carry):
        """`chunk` slot pairs: their scores, one softmax update, their values."""
        m, l, acc = carry
        jps = [c * opts.chunk + u for u in range(opts.chunk)]
        sts, shifts = zip(*[keys(jp) for jp in jps])
        smax = sts[0]
        for st in sts[1:]:
          smax = jnp.maximum(smax, st)
        m_new = jnp.maximum(m, smax.max(axis=0))
        alpha = jnp.exp(m - m_new)
        ps = [jnp.exp(st - lax.broadcast_in_dim(m_new, st.shape, [1])) for st in sts]
        psum = ps[0]
        for p in ps[1:]:
          psum = psum + p
        if opts.defer_sum:
          l = l * lax.broadcast_in_dim(alpha, l.shape, [1]) + psum
        else:
          l = l * alpha + psum.sum(axis=0)
        if opts.keys_only:
          return m_new, l, acc
        alpha_n = _pad_columns(alpha, 1.0, WG.reduce(0)) if opts.rows8 else alpha
        acc = acc * lax.broadcast_in_dim(alpha_n, acc.shape, [1])
        if vp:  # the chunk's 128-token blocks, one V^T operand each
          for u in range(opts.chunk // 2):
            acc = values_pairs(c * (opts.chunk // 2) + u, ps[2 * u:2 * u + 2], acc)
          return m_new, l, acc
        for jp, shift, p in zip(jps, shifts, ps):
          acc = values(jp, shift, p, acc)
        return m_new, l, acc

      n_chunks = W // 2 // opts.chunk
      if opts.unrolled:
        for c in range(n_chunks):
          carry = pairs(c, carry)
        return carry
      return lax.fori_loop(0, n_chunks, pairs, carry)

    m0 = lc(jnp.full((NS,), NEG, jnp.float32), WG.reduce(0))
    l0 = (lc(jnp.full((2 * G, NS), 0.0, jnp.float32), WG) if opts.defer_sum
          else lc(jnp.full((NS,), 0.0, jnp.float32), WG.reduce(0)))
    a0 = lc(jnp.full((D, N), 0.0, jnp.float32), WG)
    m, l, acc = lax.fori_loop(0, n_steps, step, (m0, l0, a0))
    if opts.defer_sum:
      l = l.sum(axis=0)
    o_out[b, h, s] = acc
    m_out[b, h, s] = m
    l_out[b, h, s] = l

  def tiled(shape, dt, swz=128):
    if interp:
      return plgpu.SMEM(shape, dt)
    return plgpu.SMEM(shape, dt, transforms=(
        plgpu.TilingTransform((8, swz // 2)), plgpu.SwizzleTransform(swz)))

  def word_tiles():
    shape = (stages, 2 * G, D)
    if opts.swizzle_words and not interp:
      return plgpu.SMEM(shape, jnp.uint32, transforms=(
          plgpu.TilingTransform((8, 32)), plgpu.SwizzleTransform(128)))
    return plgpu.SMEM(shape, jnp.uint32)

  kswz = 32 if opts.shared_dq else 128
  scratch = [
      tiled((D, N), jnp.bfloat16) if interp else tiled((NS, D), jnp.bfloat16, kswz),
      plgpu.SMEM((stages, PB, 8), jnp.uint32) if kp else word_tiles(),
      plgpu.SMEM((stages, W, D), jnp.bfloat16), plgpu.SMEM((stages, W, D), jnp.bfloat16),
      plgpu.SMEM((stages, D, G), jnp.uint32) if vin else word_tiles(),
      plgpu.SMEM((stages, 2, D // G, PB // 2), jnp.bfloat16),
      plgpu.SMEM((stages, 2, D // G, PB // 2), jnp.bfloat16),
      *([] if kp and vp else [tiled((2 * G, D), jnp.bfloat16, kswz)]),
      *([] if opts.shared_dq or (kp and vp) else [
          tiled((D, 2 * G), jnp.bfloat16) if interp else tiled((2 * G, D), jnp.bfloat16, 32)]),
      tiled((2, 4 * G, N) if opts.manual_barriers else (4 * G if vp else 2 * G, N),
            jnp.bfloat16, 32),
      plgpu.Barrier(num_barriers=1),
      plgpu.Barrier(num_arrivals=9 if vin else 10, num_barriers=stages),
  ]
  return plgpu.kernel(
      kernel,
      out_type=[jax.ShapeDtypeStruct((B, K, splits, D, N), jnp.float32),
                jax.ShapeDtypeStruct((B, K, splits, NS), jnp.float32),
                jax.ShapeDtypeStruct((B, K, splits, NS), jnp.float32)],
      scratch_types=scratch,
      grid=(B, K, splits), grid_names=("b", "h", "s"),
      compiler_params=plgpu.CompilerParams(
          approx_math=opts.approx_math, unsafe_no_auto_barriers=opts.manual_barriers),
      **({} if interpret is None else dict(interpret=interpret)))
