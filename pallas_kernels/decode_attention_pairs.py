"""Decode attention over a KIVI block in the pair layout: a Mosaic GPU kernel for
Hopper's tensor cores (`wgmma`), and where it applies.

The pair layout (`kivi_jax.quantization.pair_pack`) packs each row of a tensor
along the axis `wgmma` contracts: a token's channels for the keys, a channel's
tokens for the values (`V^T`). Of each 128 columns, word `8 (s // p) + 2 j + h`
holds column `16 s + 8 h + 2 j + e` at bit `b (s % p) + 16 e` (`p = 16 / b`), so a
thread of the WGMMA register layout finds the two codes of each of its bf16 pairs
in one word, in the two 16-bit halves. Per register one inline PTX block turns
them into `wgmma`'s A operand: a shift, `lop3` into the bf16 pair `128 + code`
(exact below 8 bits), a subtraction of 128 and one `fma.rn.bf16x2` with the
pair's scale and zero (8-bit codes go through `cvt`, 256 + code not being exact in
bf16). The dequantized tiles stay in registers:

  per 64 tokens      S^T [64, N] = K Q^T       (K [64, 128] from registers)
  per 256 tokens     one online-softmax update over the 256 tokens' scores
  per 128 tokens     O^T [128, 16] += V^T P^T  (V^T [128 channels, 128 tokens];
                     2-bit codes: two products of 64 channels, `values_in_halves`)

with `N` = 8 query rows (P^T's columns padded to 16 by constant registers) or 16.
One warpgroup per (batch row, kv head, split); each split walks steps of
`step_tokens` tokens (word tiles, scales and zeros by TMA, two buffers), sums
of the softmax kept per element and reduced once, Pallas's automatic barriers
off (each step's `commit_smem` guards the buffer refetched; P^T alternates
between two buffers), exponentials by `ex2.approx`. The design and its
measurements: `benchmarks/NOTES.md`, "Codes in the operand's layout" and after.

Shapes (B batch, K kv heads, M <= 16 query rows per kv head, D = 128 or 64 (a
64-wide key row packs alone and is read as 16-bit halves: `pair_pack`), C block
capacity, a multiple of `STEP_TOKENS`; G group size, cg = min(G, D)):
  q        [B, K, M, D]        bf16
  k_codes  [B, K, C, D b/32]   uint32   k_scale, k_zero [B, K, C/G, D]  bf16
  v_codes  [B, K, D, C b/32]   uint32   v_scale, v_zero [B, K, D/cg, C] bf16
  n_valid  [B] int32: quantized tokens per row; lo [B] int32: first visible token.
Returns the per-split partials `(acc [B, K, S, M, D], m, l [B, K, S, M])` float32,
as `decode_attention.quantized_decode_partials`'s (`merge_partials` merges them).

Compiled only (Mosaic GPU on sm_90a): the inline PTX and the register operands of
`wgmma` have no interpret mode. CI lowers it for CUDA on a CPU; on a Hopper GPU
`tests/test_decode_pairs.py` checks its results against float64.
"""

from __future__ import annotations

import functools
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

from kivi_jax.pallas_kernels.common import MASK_VALUE as _NEG
from kivi_jax.pallas_kernels.common import PAIR_SPAN as SPAN  # tokens of one V^T tile

HEAD_DIM = 128
HEAD_DIMS = (64, HEAD_DIM)  # a 64-wide head's key rows are read as 16-bit halves
BITS = (2, 4, 8)
# Block capacities are whole numbers of this many tokens (`kivi_jax.cache`).
STEP_TOKENS = 512
PAIR = 64     # tokens of one S^T tile
UPDATE = 256  # tokens per online-softmax update
TMA_ROWS = 256  # the longest dimension of a TMA box


def step_tokens(group_size: int) -> int:
  """Tokens a step's TMA brings: 256, or a whole group of 512. Against 512-token
  steps (2026-12-04, H200, P1's shape; `benchmarks/NOTES.md`, "A third block an
  SM"): KIVI-4 0.511 ms against 0.702 at 128k (two buffers of 512 tokens took
  170 KiB of shared memory: one block an SM), KIVI-2 the same within 1%."""
  return max(UPDATE, group_size)


def max_group(k_bits, v_bits) -> int:
  """The largest group the kernel reads: a step of 512 tokens' 8-bit words would
  not fit in shared memory twice."""
  return UPDATE if 8 in (k_bits, v_bits) else STEP_TOKENS


def values_in_halves(k_bits, v_bits, head_dim: int) -> bool:
  """Whether V^T P^T runs as two products of 64 channels (half the dequantized
  V^T tile live): for 2-bit codes and 128-wide heads, whose 256-token steps
  take 61 KiB of shared memory, three blocks' worth of an SM; the halves bring
  the registers from 233 to 168 a thread, so a third block runs (ncu,
  2026-12-04). With wider codes shared memory holds two blocks anyway."""
  return head_dim == HEAD_DIM and k_bits == v_bits == 2


def applies(k_bits, v_bits, group_size: int, head_dim: int, rows: int, dtype,
            scale_dtype) -> bool:
  """Whether this kernel reads the block: 2-, 4- or 8-bit codes, groups of a power
  of two from 16 tokens to a step, head_dim 64 or 128, at most 16 query rows per kv
  head, a bf16 model with bf16 scales (the kernel's fma is bf16x2)."""
  g = group_size
  return (k_bits in BITS and v_bits in BITS and 16 <= g <= max_group(k_bits, v_bits)
          and not g & (g - 1) and head_dim in HEAD_DIMS and 1 <= rows <= 16
          and jnp.dtype(dtype) == jnp.bfloat16 and jnp.dtype(scale_dtype) == jnp.bfloat16)


def hopper() -> bool:
  """Whether the default device is a Hopper GPU (compute capability 9.x)."""
  dev = jax.devices()[0]
  return dev.platform == "gpu" and str(getattr(dev, "compute_capability", "")).startswith("9")


def default_splits(batch: int, kv_heads: int, n_steps: int, blocks_per_sm: int) -> int:
  """The most sequence splits that keep batch x heads x splits programs within one
  wave of the kernel's `blocks_per_sm` blocks on each SM (132 SMs on an H200;
  at least one split, at most one a step). The partials' writes and merge cost
  more than idle SMs: at P1's shape (64 rows x heads) the whole decode attention
  took 0.190, 0.186, 0.158, 0.153 and 0.151 ms at 32k with 64, 32, 16, 8 and 4
  splits, two blocks an SM (`benchmarks/results/pair_splits_h200.json`, 512-token
  steps); with three blocks an SM (2-bit codes) 6 splits took KIVI-2 0.148 ms at
  32k and 0.468 at 128k against 4 splits' 0.153 and 0.501, while KIVI-4's two
  blocks an SM went from 0.165 / 0.517 to 0.196 / 0.643 with 6
  (`benchmarks/results/pair_splits3_h200.json`)."""
  sms = getattr(jax.devices()[0], "core_count", None) or 132
  return max(1, min(sms * blocks_per_sm // (batch * kv_heads), n_steps))


def split_steps(split, n_valid, lo, steps_per_split: int, step: int):
  """`(first, count)`: the steps of `step` tokens split `split` reads, those of
  its range holding a live token (below `n_valid`, from `lo` on); none where
  the row has no live token."""
  first = jnp.maximum(split * steps_per_split, lo // step)
  last = jnp.minimum((split + 1) * steps_per_split, (n_valid + step - 1) // step)
  return first, jnp.where(n_valid > lo, jnp.maximum(last - first, 0), 0)


import os
WIDTH = int(os.environ.get("KIVI_EXP_LDS", "4"))


def _magic(bits: int):
  """`(mask, magic)`: the code of a 16-bit half moved to the top of an fp16
  mantissa (bits 10 - b to 9), `lop3`-ed with the exponent that makes the half
  2^b + code, exact (an fp16 mantissa holds 10 bits), for both halves of a word."""
  return (2**bits - 1) << (10 - bits) | (2**bits - 1) << (26 - bits), (15 + bits) * 0x04000400


def _dequant(words, conv_ref, bits: int, rows_per_scale: int):
  """Words in the WGMMA layout -> fp16 `[R, n]` = code * scale + zero in the
  WGMMA layout: uint32 `[R, 4 b]` (`pair_pack` of codes `[R, 128]`) for n = 128,
  or a 64-column row's `2 b` words as uint16 halves `[R, 4 b]` for n = 64. Per
  register: a shift, a `lop3` into the fp16 pair 2^b + code, one
  `fma.rn.f16x2` with the pair's scale and zero - 2^b scale (`_convert_scales`'
  words, row `r`'s at row `r // rows_per_scale` of `conv_ref` `[.., n]`, one
  128-bit load a thread for two column tiles). Rows `r` and `r + 8` of a thread
  lie in one group (groups of 16 rows or more)."""
  wg = plgpu.Layout.WGMMA
  rows = words.shape[0]
  cols = HEAD_DIM // 2 if words.dtype == jnp.uint16 else HEAD_DIM
  p = 16 // bits
  mask, magic = _magic(bits)

  @plgpu.inline_mgpu(arg_types=(wg, plgpu.RefType()),
                     return_type=plgpu.ShapeDtypeStruct((rows, cols), jnp.float16, wg))
  def dequant(ctx, w, conv):
    del ctx
    i32, index = ir.IntegerType.get_signless(32), ir.IndexType.get()
    pair, quad = ir.VectorType.get((2,), ir.F16Type.get()), ir.VectorType.get((4,), i32)
    layout = mgpu.WGMMA_LAYOUT
    out = np.empty(layout.registers_shape((rows, cols)), dtype=object)
    where = dict(zip(np.ndindex(out.shape), layout.thread_idxs((rows, cols))))
    loaded = {}
    for idx in np.ndindex(out.shape):
      rt, ct, half = idx[0], idx[1], idx[4]
      if cols < HEAD_DIM:  # column tile ct: word 4 (ct // p) + j, the halves 2 j, 2 j + 1
        word = mgpu_utils.bitcast(w.registers[rt, ct // p, 0, 0, half, 0, 0, 0, 0], i32)
        pos = ct % p
      else:  # k-step s = ct // 2, its column half h = ct % 2: word 8 (s // p) + 2 j + h
        s, h = ct // 2, ct % 2
        reg = w.registers[rt, s // p, 0, 0, half, 0, 0, 0, 0]
        word = mgpu_utils.bitcast(mgpu_utils.vector_slice(reg, slice(h, h + 1)), i32)
        pos = s % p
      key = (rt, ct // 2) if WIDTH == 4 else (rt, ct)
      if WIDTH == 1 and key not in loaded:  # scales' words, then zeros': word col / 2
        row, col = where[idx]
        r = arith.divui(row, mgpu_utils.c(rows_per_scale, index))
        half = arith.divui(col, mgpu_utils.c(2, index))
        one = ir.VectorType.get((1,), i32)
        loaded[key] = [mgpu_utils.bitcast(vector.load(one, conv, [r, w]), i32) for w in (
            half, arith.addi(half, mgpu_utils.c(cols // 2, index)))]
      if WIDTH == 1:
        scale, zero = loaded[key]
      elif key not in loaded:  # column tiles 2 k, 2 k + 1: words 16 k + 4 l ..
        row, col = where[idx]
        at = [arith.divui(row, mgpu_utils.c(rows_per_scale, index)),
              arith.addi(arith.muli(arith.andi(col, mgpu_utils.c(7, index)),
                                    mgpu_utils.c(2, index)),
                         mgpu_utils.c(16 * (ct // 2) + (0 if WIDTH == 4 else 2 * (ct % 2)), index))]
        loaded[key] = vector.load(quad if WIDTH == 4 else ir.VectorType.get((2,), i32), conv, at)
      if WIDTH > 1:
        vec = loaded[key]
        off = 2 * (ct % 2) if WIDTH == 4 else 0
        scale, zero = (mgpu_utils.bitcast(mgpu_utils.vector_slice(vec, slice(i, i + 1)), i32)
                       for i in (off, off + 1))
      up = 10 - bits * (pos + 1)  # code at bits b pos .. of the half, wanted at 10 - b ..
      shift = f"shl.b32 t, $1, {up};" if up > 0 else (
          f"shr.b32 t, $1, {-up};" if up else "mov.b32 t, $1;")
      x = llvm.inline_asm(i32, [word, scale, zero], f"""
          {{
          .reg .b32 t;
          {shift}
          lop3.b32 t, t, {mask:#x}, {magic:#x}, 0xea;
          fma.rn.f16x2 $0, t, $2, $3;
          }}""", "=r,r,r,r")
      out[idx] = mgpu_utils.bitcast(x, pair)
    return mgpu.FragmentedArray(_registers=out, _layout=layout, _is_signed=None)
  return dequant(words, conv_ref)


def _convert_scales(scale_ref, zero_ref, conv_ref, bits: int, source):
  """Writes `_dequant`'s words: for row `a` of `conv_ref` `[A, n]` (uint32),
  column tile `ct` and lane `l`, words `16 (ct // 2) + 4 l + 2 (ct % 2)` and
  `+ 1` = the fp16 pairs scale and zero - 2^b scale (rounded once, from float32)
  of the columns `8 ct + 2 l`, `+ 1`, read from `scale_ref`, `zero_ref` (bf16) at
  `source(a, column)` (static `a`, dynamic column). A thread converts the pairs
  of one column pair in rows `a0`, `a0 + 128 / (n / 2)`, .. (identical
  words written twice where the rows are fewer than a sweep)."""
  n_rows, cols = conv_ref.shape

  @plgpu.inline_mgpu(arg_types=(plgpu.RefType(), plgpu.RefType(), plgpu.RefType()))
  def convert(ctx, scales, zeros, conv):
    del ctx
    i32, index = ir.IntegerType.get_signless(32), ir.IndexType.get()
    bf_pair, two = ir.VectorType.get((2,), ir.BF16Type.get()), ir.VectorType.get((2,), i32)
    c = lambda v: mgpu_utils.c(v, index)  # noqa: E731
    tid = arith.index_cast(index, mgpu_utils.thread_idx())
    pairs = cols // 2  # column pairs a row: one a thread of each half
    col = arith.muli(arith.remui(tid, c(pairs)), c(2))  # 8 ct + 2 l
    ct, l2 = arith.divui(col, c(8)), arith.remui(col, c(8))
    dst = arith.addi(arith.addi(arith.muli(arith.divui(ct, c(2)), c(16)),
                                arith.muli(l2, c(2))),
                     arith.muli(arith.remui(ct, c(2)), c(2)))
    per = 128 // pairs  # rows a sweep of the warpgroup converts
    a0 = arith.divui(tid, c(pairs))
    minus = f"0f{np.float32(-2.0**bits).view(np.uint32):08X}"  # -2^b as PTX writes floats
    for i in range(-(-n_rows // per)):
      a = arith.addi(a0, c(per * i))
      if n_rows % per:  # fewer rows than a sweep: the rest convert the last row again
        a = arith.minui(a, c(n_rows - 1))
      at = source(a, col)
      s, z = (mgpu_utils.bitcast(vector.load(bf_pair, ref, at), i32) for ref in (scales, zeros))
      s16, z16 = (llvm.inline_asm(i32, [s, z], f"""
          {{
          .reg .b32 t;
          .reg .f32 s0, s1, z0, z1;
          shl.b32 t, $1, 16; mov.b32 s0, t;
          and.b32 t, $1, 0xffff0000; mov.b32 s1, t;
          shl.b32 t, $2, 16; mov.b32 z0, t;
          and.b32 t, $2, 0xffff0000; mov.b32 z1, t;
          {body}
          }}""", "=r,r,r") for body in (
              "cvt.rn.f16x2.f32 $0, s1, s0;",
              f"fma.rn.f32 z0, s0, {minus}, z0;\n"
              f"          fma.rn.f32 z1, s1, {minus}, z1;\n"
              "          cvt.rn.f16x2.f32 $0, z1, z0;"))
      if WIDTH == 1:
        one = ir.VectorType.get((1,), i32)
        half = arith.divui(col, c(2))
        for x, w in ((s16, half), (z16, arith.addi(half, c(cols // 2)))):
          vector.store(vector.from_elements(one, [x]), conv, [a, w])
      else:
        both = vector.from_elements(two, [s16, z16])
        vector.store(both, conv, [a, dst])
  convert(scale_ref, zero_ref, conv_ref)


def _with_columns(x, cols: int, layout, fill: float = 0.0):
  """`x` `[..., n]` in the WGMMA `layout` (or its column vector), n and `cols`
  multiples of 8, as `[..., cols]`: its first `cols` columns, or padded with
  `fill`. Registers are taken or made constant: no instruction a value."""
  shape = (*x.shape[:-1], cols)

  @plgpu.inline_mgpu(arg_types=(layout,),
                     return_type=plgpu.ShapeDtypeStruct(shape, x.dtype, layout))
  def resize(ctx, a):
    del ctx
    ty = {jnp.float16: ir.F16Type, jnp.float32: ir.F32Type}[x.dtype.type].get()
    regs = np.array(mgpu.FragmentedArray.splat(mgpu_utils.c(fill, ty), shape,
                                               a.layout).registers)
    col = len(shape) - 1  # the column-tile dimension of the registers
    n = min(regs.shape[col], a.registers.shape[col])
    at = (slice(None),) * col + (slice(0, n),)
    regs[at] = a.registers[at]
    return mgpu.FragmentedArray(_registers=regs, _layout=a.layout, _is_signed=None)
  return resize(x)


def _build(b: int, kh: int, capacity: int, splits: int, n_rows: int, k_bits: int,
           v_bits: int, group: int, d: int, step: int, upd: int, v_halves: bool):
  """The kernel over the grid (B, K, splits), `n_rows` (8 or 16) query rows,
  heads `d` wide."""
  per = -(-(capacity // step) // splits)
  cg = min(group, d)
  k_words = d * k_bits // 32      # a token's key words
  k_type = jnp.uint16 if d < HEAD_DIM else jnp.uint32  # 64-wide: read as halves
  k_cols = k_words * (2 if d < HEAD_DIM else 1)
  v_words = SPAN * v_bits // 32  # a channel's value words per V^T tile
  box = min(step, TMA_ROWS)  # tokens of one TMA box of value scales and zeros
  boxes = step // box
  tiles = step // SPAN  # V^T tiles a step
  n_cg = d // cg  # channel groups of the values
  sm_scale = 1 / math.sqrt(d)
  wg = plgpu.Layout.WGMMA

  def v_source(a, col):
    """Where `_convert_scales` reads row `a` (V^T tile `a // n_cg`, channel group
    `a % n_cg`), column `col` of the value scales and zeros."""
    c = lambda v: mgpu_utils.c(v, ir.IndexType.get())  # noqa: E731
    t = arith.addi(arith.muli(arith.divui(a, c(n_cg)), c(SPAN)), col)
    return [arith.divui(t, c(box)), arith.remui(a, c(n_cg)), arith.remui(t, c(box))]

  def kivi_pair_decode_attention(q_ref, kw_ref, ks_ref, kz_ref, vw_ref, vs_ref, vz_ref,
                                 n_ref, lo_ref, o_out, m_out, l_out, q_smem, kw_smem,
                                 ks_smem, kz_smem, vw_smem, vs_smem, vz_smem, conv_k, conv_v,
                                 p_smem, bar_q, bars):
    bi, h, s = lax.axis_index("b"), lax.axis_index("h"), lax.axis_index("s")
    n_valid, lo = n_ref[bi], lo_ref[bi]
    first, n_steps = split_steps(s, n_valid, lo, per, step)

    def fetch(i, slot):
      st = first + i
      bar = bars.at[slot]
      plgpu.copy_gmem_to_smem(vw_ref.at[bi, h, :, pl.ds(st * (step // SPAN) * v_words,
                                                         step // SPAN * v_words)],
                              vw_smem.at[slot], bar)
      for u in range(boxes):
        t0 = st * step + u * box
        plgpu.copy_gmem_to_smem(kw_ref.at[bi, h, pl.ds(t0, box)],
                                kw_smem.at[slot, pl.ds(u * box, box)], bar)
        plgpu.copy_gmem_to_smem(vs_ref.at[bi, h, :, pl.ds(t0, box)],
                                vs_smem.at[slot, u], bar)
        plgpu.copy_gmem_to_smem(vz_ref.at[bi, h, :, pl.ds(t0, box)],
                                vz_smem.at[slot, u], bar)
      groups = pl.ds(st * (step // group), step // group)
      plgpu.copy_gmem_to_smem(ks_ref.at[bi, h, groups], ks_smem.at[slot], bar)
      plgpu.copy_gmem_to_smem(kz_ref.at[bi, h, groups], kz_smem.at[slot], bar)

    plgpu.copy_gmem_to_smem(q_ref.at[bi, h], q_smem, bar_q)
    pl.when(n_steps > 0)(lambda: fetch(0, 0))
    plgpu.barrier_wait(bar_q)
    # Word tiles in the WGMMA layout (their rows' strides conflict on banks).
    load_words = lambda ref: plgpu.load(ref, (), layout=wg, optimized=False)  # noqa: E731
    tok_in = plgpu.broadcasted_iota(jnp.int32, (PAIR, n_rows), 0, layout=wg)

    def step_body(i, carry):
      slot = lax.rem(i, 2)
      plgpu.commit_smem()  # every warp is done reading the buffer refetched here

      @pl.when(i + 1 < n_steps)
      def _():
        fetch(i + 1, lax.rem(i + 1, 2))
      plgpu.barrier_wait(bars.at[slot])
      _convert_scales(ks_smem.at[slot], kz_smem.at[slot], conv_k, k_bits,
                      lambda a, col: [a, col])
      _convert_scales(vs_smem.at[slot], vz_smem.at[slot], conv_v, v_bits, v_source)
      plgpu.commit_smem()  # the words converted, for every warp
      t_step = (first + i) * step

      def scores(jp):
        """S^T [64 tokens, N] of tile `jp` of the step, scaled and masked."""
        k = _dequant(load_words(kw_smem.at[slot, pl.ds(PAIR * jp, PAIR)]),
                     conv_k.at[pl.ds(PAIR * jp // group, max(1, PAIR // group))],
                     k_bits, group)

        def qk(acc_ref):
          plgpu.wgmma(acc_ref, k, plgpu.transpose_ref(q_smem, (1, 0)))
          return acc_ref[...]
        st = pl.run_scoped(qk, plgpu.ACC((PAIR, n_rows), jnp.float32)) * sm_scale
        tok = t_step + PAIR * jp + tok_in
        return jnp.where((tok < n_valid) & (tok >= lo), st, _NEG)

      def values(c, ps, accs):
        """accs + V^T P^T over V^T tile `c` of the step (its probabilities `ps`,
        two S^T tiles'), in `len(accs)` parts of channels."""
        # Two buffers, alternating across steps too: the commit before one's
        # stores follows every warp's wait on the other's product.
        p_buf = p_smem.at[lax.rem(i * tiles + c, 2)]
        for u in range(2):
          pu = ps[u].astype(jnp.float16)
          p_buf[pl.ds(PAIR * u, PAIR)] = _with_columns(pu, 16, wg) if n_rows == 8 else pu
        plgpu.commit_smem()
        rows = d // len(accs)
        out = []
        for part, acc in enumerate(accs):
          vt = _dequant(
              load_words(vw_smem.at[slot, pl.ds(rows * part, rows), pl.ds(v_words * c, v_words)]),
              conv_v.at[pl.ds(c * n_cg + rows * part // cg, max(1, rows // cg))], v_bits, cg)

          def pv(acc_ref, vt=vt):
            plgpu.wgmma(acc_ref, vt, p_buf)
          out.append(pl.run_state(pv)(plgpu.ACC.init(acc)))
        return tuple(out)

      def update(c, carry):
        """The scores of `upd` tokens, one softmax update, their values."""
        m, l, acc = carry
        sts = [scores(upd // PAIR * c + u) for u in range(upd // PAIR)]
        m_new = jnp.maximum(m, functools.reduce(jnp.maximum, sts).max(axis=0))
        alpha = jnp.exp(m - m_new)
        ps = [jnp.exp(st - lax.broadcast_in_dim(m_new, st.shape, [1])) for st in sts]
        l = l * lax.broadcast_in_dim(alpha, l.shape, [1]) + functools.reduce(jnp.add, ps)
        alpha = _with_columns(alpha, 16, wg.reduce(0), 1.0) if n_rows == 8 else alpha
        acc = tuple(a * lax.broadcast_in_dim(alpha, a.shape, [1]) for a in acc)
        for u in range(upd // SPAN):
          acc = values(upd // SPAN * c + u, ps[2 * u:2 * u + 2], acc)
        return m_new, l, acc
      # Only the updates holding a live token: the first and last steps of a row
      # may hold dead ones (before `lo`, from `n_valid` on). Every step between
      # runs whole, so P^T's buffers keep alternating.
      first_update = jnp.maximum(lo - t_step, 0) // upd
      end_update = jnp.minimum((n_valid - t_step + upd - 1) // upd,
                               step // upd)
      return lax.fori_loop(first_update, end_update, update, carry)

    m0 = plgpu.layout_cast(jnp.full((n_rows,), _NEG, jnp.float32), wg.reduce(0))
    l0 = plgpu.layout_cast(jnp.full((PAIR, n_rows), 0.0, jnp.float32), wg)
    parts = 2 if v_halves else 1
    a0 = tuple(plgpu.layout_cast(jnp.full((d // parts, 16), 0.0, jnp.float32), wg)
               for _ in range(parts))
    m, l, acc = lax.fori_loop(0, n_steps, step_body, (m0, l0, a0))
    for part, a in enumerate(acc):  # the real rows
      o_out[bi, h, s, pl.ds(d // parts * part, d // parts)] = (
          _with_columns(a, 8, wg) if n_rows == 8 else a)
    m_out[bi, h, s] = m
    l_out[bi, h, s] = l.sum(axis=0)

  def swizzled(shape, swizzle):
    return plgpu.SMEM(shape, jnp.float16, transforms=(
        plgpu.TilingTransform((8, swizzle // 2)), plgpu.SwizzleTransform(swizzle)))

  scratch = [
      swizzled((n_rows, d), 128),
      plgpu.SMEM((2, step, k_cols), k_type),
      plgpu.SMEM((2, step // group, d), jnp.bfloat16),
      plgpu.SMEM((2, step // group, d), jnp.bfloat16),
      plgpu.SMEM((2, d, step // SPAN * v_words), jnp.uint32),
      plgpu.SMEM((2, boxes, d // cg, box), jnp.bfloat16),
      plgpu.SMEM((2, boxes, d // cg, box), jnp.bfloat16),
      plgpu.SMEM((step // group, d), jnp.uint32),
      plgpu.SMEM((step // SPAN * n_cg, SPAN), jnp.uint32),
      swizzled((2, 2 * PAIR, 16), 32),
      plgpu.Barrier(num_barriers=1),
      plgpu.Barrier(num_arrivals=3 + 3 * boxes, num_barriers=2),
  ]
  return plgpu.kernel(
      kivi_pair_decode_attention,  # the kernel's name in profiles
      out_type=[jax.ShapeDtypeStruct((b, kh, splits, d, n_rows), jnp.float32),
                jax.ShapeDtypeStruct((b, kh, splits, n_rows), jnp.float32),
                jax.ShapeDtypeStruct((b, kh, splits, n_rows), jnp.float32)],
      scratch_types=scratch,
      grid=(b, kh, splits), grid_names=("b", "h", "s"),
      compiler_params=plgpu.CompilerParams(approx_math=True, unsafe_no_auto_barriers=True))


@functools.partial(jax.jit, static_argnames=("k_bits", "v_bits", "group_size", "splits"))
def pair_decode_partials(q, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, n_valid,
                         lo, *, k_bits: int, v_bits: int, group_size: int,
                         splits: int | None = None):
  """Per-split partials `(acc [B, K, S, M, D], m [B, K, S, M], l [B, K, S, M])`
  (module docstring); `splits` programs share each row's sequence."""
  b, kh, m_rows, d = q.shape
  capacity = k_codes.shape[2]
  step = max(int(os.environ.get("KIVI_EXP_STEP", step_tokens(group_size))), group_size)
  update = min(int(os.environ.get("KIVI_EXP_UPDATE", UPDATE)), step)
  if not applies(k_bits, v_bits, group_size, d, m_rows, q.dtype, k_scale.dtype):
    raise ValueError(
        f"the pair kernel reads 2/4/8-bit codes in power-of-two groups of 16 to "
        f"{max_group(k_bits, v_bits)} "
        f"tokens, head_dim {HEAD_DIMS}, at most 16 bf16 query rows with bf16 scales; got "
        f"k_bits={k_bits}, v_bits={v_bits}, group_size={group_size}, head_dim={d}, "
        f"rows={m_rows}, q {q.dtype}, scales {k_scale.dtype}")
  if capacity % step:
    raise ValueError(f"the block's capacity ({capacity}) must be a multiple of {step}")
  n_rows = 8 if m_rows <= 8 else 16
  halves = d == HEAD_DIM and bool(int(os.environ.get("KIVI_EXP_HALVES", values_in_halves(k_bits, v_bits, d))))
  if splits is None:
    # Three blocks an SM where V^T goes in halves and a step's buffers take 61 KiB.
    third = halves and step == UPDATE
    blocks = int(os.environ.get("KIVI_EXP_BLOCKS", 3 if third else 2))
    splits = int(os.environ.get("KIVI_EXP_SPLITS", default_splits(b, kh, capacity // step, blocks)))
  q = jnp.pad(q, ((0, 0), (0, 0), (0, n_rows - m_rows), (0, 0))).astype(jnp.float16)
  if d < HEAD_DIM:  # a key row's words as the 16-bit halves the kernel reads
    k_codes = lax.bitcast_convert_type(k_codes, jnp.uint16).reshape(
        *k_codes.shape[:-1], 2 * k_codes.shape[-1])
  o, m, l = _build(b, kh, capacity, splits, n_rows, k_bits, v_bits, group_size, d, step,
                   update, halves)(
      q, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, n_valid.astype(jnp.int32),
      lo.astype(jnp.int32))
  return jnp.swapaxes(o, 3, 4)[..., :m_rows, :], m[..., :m_rows], l[..., :m_rows]
