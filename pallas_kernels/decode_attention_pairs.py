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

With one query row a kv head (`folds`: MHA, groups of 32, d = 128) the scales
and zeros are folded into the small operands instead, and the codes go to
`wgmma` as they are (a shift, a `lop3` and a subtraction a pair: no scale or
zero loaded, no `fma`):
  keys    S^T[t] = sum_c C[t, c] qp[g, c] + q . z_g, g the token's group:
          B = qp [128, 8], the step's 8 groups' bf16(q o s_g) side by side,
          the accumulator starting at q . z_g (float32, once a step); each
          row keeps its own group's column (`_pick_columns`: a select and a
          shuffle a row).
  values  O^T[c] = sum_t C[c, t] P'[t, g] + sum_t p[t] z[t, g], g the
          channel's group: P^T's columns are fp16(p o s_g) of the head's 4
          groups (codes and P' in fp16: one rounding of p s, 2^-11), the
          zeros' sums kept in float32 on CUDA cores and added at the end.
q's one row is read as it is (no padding) and the output's one row written
alone (`acc` `[B, K, S, D]` in the kernel). The folded form runs as two
kernels: `kivi_pair_scores` writes each token's scaled, masked score (4 bytes
a token and kv head through HBM) and each split's maximum, then
`kivi_pair_values` takes `p = exp(s - m)` with the split's maximum known: no
running maximum, no rescaling, each kernel holding half of what one kernel
held (9% fewer instructions; in a 256-row Llama-2-7B KIVI-2 step their launches
5% shorter than one kernel's, the step 2-4%, on an H100: `benchmarks/NOTES.md`,
"Scores, then values").

One warpgroup per (batch row, kv head, split); each split walks steps of
`step_tokens` tokens (word tiles, scales and zeros by TMA, two buffers), sums
of the softmax kept per element and reduced once, Pallas's automatic barriers
off (each step's `commit_smem` guards the buffer refetched; P^T alternates
between two buffers), exponentials by `ex2.approx`. The design and its
measurements: `benchmarks/NOTES.md`, "Codes in the operand's layout" and after.

Shapes (B batch, K kv heads, M <= 16 query rows per kv head, D = 128 or 64 (a
64-wide key row packs alone and is read as 16-bit halves: `pair_pack`), C block
capacity, whole spans of 128 tokens and groups, at least a step: a last step
that runs past C is read as zeros (TMA fills what lies out of bounds) and
masked, being past every row's `n_valid`; G group size, cg = min(G, D)):
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
import os

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
MAX_STEP = 512  # the longest step: one group of 512 tokens
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
  return UPDATE if 8 in (k_bits, v_bits) else MAX_STEP


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


def folds(k_bits, v_bits, group_size: int, head_dim: int, rows: int) -> bool:
  """Whether the kernel folds the scales and zeros into the query and the
  probabilities (the module docstring): one query row a kv head (MHA),
  128-wide heads, groups of 32 tokens and channels (a step's 8 key groups
  side by side in N = 8, a head's 4 value groups in P^T's columns), codes
  below 8 bits. 19% fewer instructions at 168 registers; the whole decode
  attention 4.9% faster at B=256, L=1536, the 512-row Llama-2-7B KIVI-2 step
  3.6% (H200, `benchmarks/NOTES.md`, "Folded scales"); as two kernels
  (`_build_scores`, `_build_values`) since 2026-12-06."""
  gqa = 1 < rows <= 4 and os.environ.get("KIVI_EXP_GQA2", "0") == "1"  # exp/gqa2
  return ((rows == 1 or gqa) and head_dim == HEAD_DIM and group_size == 32
          and max(k_bits, v_bits) < 8)


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


def unpack_plan(bits: int, fp16: bool) -> tuple[tuple[int, int, int], ...]:
  """How `_dequant` takes each code of a 16-bit half to a bf16 (or fp16) pair.

  For place `i` of a half (code at bit `bits * i`, both halves alike) a triple
  `(shift, mask, base)`: the word shifted right by `shift`, then `lop3` keeps
  `mask`'s bits and sets `base`'s, and subtracting `base` leaves the code, exact.
  The code needs only to lie inside the mantissa (7 bits for bf16, 10 for fp16),
  not at its bottom: a code at mantissa bit `k` under the exponent of
  `2^(mantissa - k)` counts whole units, so `base` is that power of two. Places
  share a shift while they fit one mantissa: 2-bit codes in bf16 take shifts of 0,
  6 and 12 (two a word where each place but the first had one), in fp16 of 0 and
  10. 8-bit codes have no plan (`cvt`)."""
  mantissa, bias = (10, 15) if fp16 else (7, 127)
  plan, start = [], None
  for i in range(16 // bits):
    at = bits * i
    if start is None or at - start + bits > mantissa:
      start = at
    k = at - start
    base = (bias + mantissa - k) << mantissa
    plan.append((start, ((2**bits - 1) << k) * 0x10001, base * 0x10001))
  return tuple(plan)


def _dequant(words, scale_ref, zero_ref, bits: int, rows_per_scale: int,
             dtype=jnp.bfloat16):
  """Words in the WGMMA layout -> bf16 `[R, n]` = code * scale + zero in the
  WGMMA layout, row `r`'s scales and zeros at row `r // rows_per_scale` of
  `scale_ref`, `zero_ref` `[.., n]`: uint32 `[R, 4 b]` (`pair_pack` of codes
  `[R, 128]`) for n = 128, or a 64-column row's `2 b` words as uint16 halves
  `[R, 4 b]` for n = 64. Rows `r` and `r + 8` of a thread lie in one group
  (groups of 16 rows or more). With no `scale_ref` (folded scales): the codes
  themselves, exact, in `dtype` (bf16, or fp16). Codes below 8 bits by
  `unpack_plan` (each shifted word shared by the places it serves)."""
  wg = plgpu.Layout.WGMMA
  rows = words.shape[0]
  cols = HEAD_DIM // 2 if words.dtype == jnp.uint16 else HEAD_DIM
  p = 16 // bits
  codes_only = scale_ref is None
  refs = () if codes_only else (plgpu.RefType(), plgpu.RefType())
  fp16 = jnp.dtype(dtype) == jnp.float16
  kind = "f16x2" if fp16 else "bf16x2"
  plan = unpack_plan(bits, fp16) if bits < 8 else tuple((8 * i, 0, 0) for i in range(2))

  @plgpu.inline_mgpu(arg_types=(wg, *refs),
                     return_type=plgpu.ShapeDtypeStruct((rows, cols), dtype, wg))
  def dequant(ctx, w, scales=None, zeros=None):
    del ctx
    i32, index = ir.IntegerType.get_signless(32), ir.IndexType.get()
    pair = ir.VectorType.get((2,), ir.F16Type.get() if fp16 else ir.BF16Type.get())
    layout = mgpu.WGMMA_LAYOUT
    out = np.empty(layout.registers_shape((rows, cols)), dtype=object)
    where = dict(zip(np.ndindex(out.shape), layout.thread_idxs((rows, cols))))
    loaded, shifted = {}, {}
    for idx in np.ndindex(out.shape):
      rt, ct, half = idx[0], idx[1], idx[4]
      if cols < HEAD_DIM:  # column tile ct: word 4 (ct // p) + j, the halves 2 j, 2 j + 1
        at, place = (rt, ct // p, half), ct % p
      else:  # k-step s = ct // 2, its column half h = ct % 2: word 8 (s // p) + 2 j + h
        s, h = ct // 2, ct % 2
        at, place = (rt, s // p, half, h), s % p
      shift, mask, base = plan[place]
      if (at, shift) not in shifted:
        reg = w.registers[at[0], at[1], 0, 0, at[2], 0, 0, 0, 0]
        if len(at) == 4:
          reg = mgpu_utils.vector_slice(reg, slice(at[3], at[3] + 1))
        word = mgpu_utils.bitcast(reg, i32)
        shifted[at, shift] = arith.shrui(word, mgpu_utils.c(shift, i32)) if shift else word
      word = shifted[at, shift]
      if not codes_only and (rt, ct) not in loaded:
        row, col = where[idx]
        ix = [arith.divui(row, mgpu_utils.c(rows_per_scale, index)), col]
        loaded[rt, ct] = [mgpu_utils.bitcast(vector.load(pair, ref, ix), i32)
                          for ref in (scales, zeros)]
      if bits < 8:
        body = f"""
            lop3.b32 t, $1, {mask:#x}, {base:#x}, 0xea;
            mov.b32 m, {base:#x};
            sub.{kind} t, t, m;"""
      else:
        body = """
            and.b32 m, $1, 0xff;
            cvt.rn.f32.u32 lo, m;
            shr.b32 m, $1, 16;
            and.b32 m, m, 0xff;
            cvt.rn.f32.u32 hi, m;
            cvt.rn.bf16x2.f32 t, hi, lo;"""
      if codes_only:
        x = llvm.inline_asm(i32, [word], f"""
            {{
            .reg .b32 t, m;
            .reg .f32 lo, hi;
            {body}
            mov.b32 $0, t;
            }}""", "=r,r")
      else:
        x = llvm.inline_asm(i32, [word, *loaded[rt, ct]], f"""
            {{
            .reg .b32 t, m;
            .reg .f32 lo, hi;
            {body}
            fma.rn.bf16x2 $0, t, $2, $3;
            }}""", "=r,r,r,r")
      out[idx] = mgpu_utils.bitcast(x, pair)
    return mgpu.FragmentedArray(_registers=out, _layout=layout, _is_signed=None)
  return dequant(words) if codes_only else dequant(words, scale_ref, zero_ref)


def _with_columns(x, cols: int, layout, fill: float = 0.0):
  """`x` `[..., n]` in the WGMMA `layout` (or its column vector), n and `cols`
  multiples of 8, as `[..., cols]`: its first `cols` columns, or padded with
  `fill`. Registers are taken or made constant: no instruction a value."""
  shape = (*x.shape[:-1], cols)

  @plgpu.inline_mgpu(arg_types=(layout,),
                     return_type=plgpu.ShapeDtypeStruct(shape, x.dtype, layout))
  def resize(ctx, a):
    del ctx
    ty = ir.BF16Type.get() if x.dtype == jnp.bfloat16 else ir.F32Type.get()
    regs = np.array(mgpu.FragmentedArray.splat(mgpu_utils.c(fill, ty), shape,
                                               a.layout).registers)
    col = len(shape) - 1  # the column-tile dimension of the registers
    n = min(regs.shape[col], a.registers.shape[col])
    at = (slice(None),) * col + (slice(0, n),)
    regs[at] = a.registers[at]
    return mgpu.FragmentedArray(_registers=regs, _layout=a.layout, _is_signed=None)
  return resize(x)


def _lane_warp():
  """`(lane, warp)` i32 of this thread, the warp within its warpgroup."""
  i32 = ir.IntegerType.get_signless(32)
  tid = mgpu_utils.thread_idx()
  return (arith.andi(tid, mgpu_utils.c(31, i32)),
          arith.andi(arith.shrui(tid, mgpu_utils.c(5, i32)), mgpu_utils.c(3, i32)))


def _by_warp(warp, values):
  """`values[warp]` for a list of four i32 values (or ints) by selects, one
  where the value changes from warp w - 1 to w."""
  i32 = ir.IntegerType.get_signless(32)
  as_val = lambda v: mgpu_utils.c(v, i32) if isinstance(v, int) else v  # noqa: E731
  out = as_val(values[0])
  for w in range(1, 4):
    if not (values[w] is values[w - 1] or isinstance(values[w], int)
            and values[w] == values[w - 1]):
      out = arith.select(arith.cmpi(arith.CmpIPredicate.uge, warp, mgpu_utils.c(w, i32)),
                         as_val(values[w]), out)
  return out


def _pick_columns(x, cols):
  """`x` float32 `[64, n]` in the WGMMA layout -> `[64, 8]` whose every column
  holds row t's value at column `cols[t // 16]` of `x` (a column a warp): the
  warp's register and element by selects, then one `shfl.sync.idx` a row from
  the lane of the thread's quad that holds the column."""
  wg = plgpu.Layout.WGMMA

  @plgpu.inline_mgpu(arg_types=(wg,),
                     return_type=plgpu.ShapeDtypeStruct((PAIR, 8), jnp.float32, wg))
  def pick(ctx, a):
    del ctx
    i32, f32 = ir.IntegerType.get_signless(32), ir.F32Type.get()
    lane, warp = _lane_warp()
    quad = arith.andi(lane, mgpu_utils.c(0x1C, i32))
    regs = np.array(a.registers)
    out = np.empty(regs.shape[:1] + (1,) + regs.shape[2:], dtype=object)
    for idx in np.ndindex(out.shape):
      def elem(col, idx=idx):
        at = idx[:1] + (col // 8,) + idx[2:]
        return mgpu_utils.bitcast(
            mgpu_utils.vector_slice(regs[at], slice(col % 2, col % 2 + 1)), i32)
      got = {}  # one extract a distinct register element (`_by_warp` skips repeats)
      for col in cols:
        if (col // 8, col % 2) not in got:
          got[col // 8, col % 2] = elem(col)
      mine = [got[col // 8, col % 2] for col in cols]
      src = arith.ori(quad, _by_warp(warp, [col % 8 // 2 for col in cols]))
      v = llvm.inline_asm(i32, [_by_warp(warp, mine), src],
                          "shfl.sync.idx.b32 $0, $1, $2, 0x1f, 0xffffffff;", "=r,r,r")
      v = mgpu_utils.bitcast(v, ir.VectorType.get((1,), f32))
      out[idx] = mgpu_utils.vector_concat([v, v])
    return mgpu.FragmentedArray(_registers=out, _layout=a.layout, _is_signed=None)
  return pick(x)


def _scale_query(scales, zeros, q_smem, qp_smem, corr_smem):
  """The folded scores' operands for the step's 8 key groups (`scales`,
  `zeros` `[8, 128]` bf16), q `q_smem` `[1, 128]`: `qp[g] = bf16(q o s_g)`,
  `wgmma`'s B (`qp_smem` `[8, 128]` with 128-byte swizzle, tiles of 8 x 64),
  and `corr[g] = sum_c q_c z_gc` in float32 (`corr_smem` `[8]`). Thread t
  takes 8 channels (a 16-byte chunk) of group t // 16; the 16 threads of a
  group sum by shuffles."""
  swz = plgpu.RefType((plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128)))

  @plgpu.inline_mgpu(arg_types=(plgpu.RefType(), plgpu.RefType(), plgpu.RefType(), swz,
                                plgpu.RefType()))
  def build(ctx, sc, zr, q, qp, corr):
    del ctx
    i32, f32, index = ir.IntegerType.get_signless(32), ir.F32Type.get(), ir.IndexType.get()
    vec = ir.VectorType.get((8,), ir.BF16Type.get())
    words = ir.VectorType.get((4,), i32)
    tid = mgpu_utils.thread_idx()
    ci = lambda v: mgpu_utils.c(v, i32)  # noqa: E731
    ix = lambda v: arith.index_cast(index, v)  # noqa: E731
    g = arith.andi(arith.shrui(tid, ci(4)), ci(7))
    part = arith.andi(tid, ci(15))
    tile, chunk = arith.shrui(part, ci(3)), arith.andi(part, ci(7))
    zero = mgpu_utils.c(0, index)
    word = lambda v, e: vector.extract(v, dynamic_position=[], static_position=[e])  # noqa: E731
    at = [ix(g), ix(arith.shli(part, ci(3)))]
    q8 = mgpu_utils.bitcast(vector.load(vec, q, [zero, at[1]]), words)
    s8 = mgpu_utils.bitcast(vector.load(vec, sc, at), words)
    out = [llvm.inline_asm(i32, [word(q8, e), word(s8, e)], "mul.rn.bf16x2 $0, $1, $2;",
                           "=r,r,r") for e in range(4)]
    # Row g's 16-byte chunk c of its 8 x 64 tile sits at c ^ g (128-byte swizzle).
    vector.store(mgpu_utils.bitcast(vector.from_elements(words, out), vec), qp,
                 [zero, ix(tile), ix(g), ix(arith.shli(arith.xori(chunk, g), ci(3)))])
    z8 = mgpu_utils.bitcast(vector.load(vec, zr, at), words)
    total = mgpu_utils.c(0.0, f32)
    for e in range(4):  # bf16 pairs to float32: the high half, the low half shifted up
      qw, zw = word(q8, e), word(z8, e)
      for lo in (True, False):
        f = lambda x, lo=lo: mgpu_utils.bitcast(  # noqa: E731
            arith.shli(x, ci(16)) if lo else arith.andi(x, ci(-65536)), f32)
        total = arith.addf(total, arith.mulf(f(qw), f(zw)))
    for dist in (1, 2, 4, 8):
      total = arith.addf(total, mgpu_utils.shfl_bfly(total, dist))
    with mgpu_utils.when(arith.cmpi(arith.CmpIPredicate.eq, part, ci(0))):
      vector.store(vector.from_elements(ir.VectorType.get((1,), f32), [total]), corr, [ix(g)])
  build(scales, zeros, q_smem, qp_smem, corr_smem)


def _broadcast(ref, axis: int):
  """`[64, 8]` float32 in the WGMMA layout from float32 `ref` in shared memory:
  axis 1, column g holding `ref[g]` in every row (`corr`, the scores'
  accumulator before the codes' product); axis 0, row t holding `ref[t]` in
  every column (64 tokens' scores)."""
  wg = plgpu.Layout.WGMMA

  @plgpu.inline_mgpu(arg_types=(plgpu.RefType(),),
                     return_type=plgpu.ShapeDtypeStruct((PAIR, 8), jnp.float32, wg))
  def broadcast(ctx, r):
    del ctx
    layout = mgpu.WGMMA_LAYOUT
    out = np.empty(layout.registers_shape((PAIR, 8)), dtype=object)
    where = dict(zip(np.ndindex(out.shape), layout.thread_idxs((PAIR, 8))))
    for idx in np.ndindex(out.shape):
      if axis:  # a register's two columns, side by side in `ref`
        out[idx] = vector.load(ir.VectorType.get((2,), ir.F32Type.get()), r,
                               [where[idx][axis]])
      else:  # a register's one row, twice
        v = vector.load(ir.VectorType.get((1,), ir.F32Type.get()), r, [where[idx][axis]])
        out[idx] = mgpu_utils.vector_concat([v, v])
    return mgpu.FragmentedArray(_registers=out, _layout=layout, _is_signed=None)
  return broadcast(ref)


def _scaled_probabilities(p, sz_ref, zsum, ng: int):
  """The folded values' operands for 64 tokens: `p` float32 `[64, 8]` (every
  column the row's probability), `sz_ref` `[2 ng, 64]` (the tokens' value
  scales of the `ng` channel groups, then their zeros). Returns `(P', zsum')`:
  P' fp16 `[64, 16]` in the WGMMA layout, column `g < ng` holding
  `fp16(p * s_g)` (one rounding, 2^-11; columns 4-7 p times the zeros, unused;
  8-15 zero); and `zsum` (float32 `[64, 8]` in the WGMMA layout) plus `p z_g`
  in float32, lane j of a quad summing group j (`ng` = 4) of each of its two
  rows in that row's first element."""
  wg = plgpu.Layout.WGMMA

  @plgpu.inline_mgpu(arg_types=(wg, plgpu.RefType(), wg),
                     return_type=(plgpu.ShapeDtypeStruct((PAIR, 16), jnp.float16, wg),
                                  plgpu.ShapeDtypeStruct((PAIR, 8), jnp.float32, wg)))
  def scaled(ctx, a, sz, zs):
    del ctx
    i32, f32, index = ir.IntegerType.get_signless(32), ir.F32Type.get(), ir.IndexType.get()
    f16_pair = ir.VectorType.get((2,), ir.F16Type.get())
    half = ir.VectorType.get((1,), ir.BF16Type.get())
    layout = mgpu.WGMMA_LAYOUT
    shape = (PAIR, 16)
    out = np.empty(layout.registers_shape(shape), dtype=object)
    where = dict(zip(np.ndindex(out.shape), layout.thread_idxs(shape)))
    lane, _ = _lane_warp()
    j = arith.index_cast(index, arith.andi(lane, mgpu_utils.c(3, i32)))
    zero = mgpu_utils.bitcast(mgpu_utils.c(0, i32), f16_pair)
    zregs = np.array(zs.registers)
    for idx in np.ndindex(out.shape):
      if idx[1]:  # columns 8-15
        out[idx] = zero
        continue
      row, col = where[idx]
      pf = mgpu_utils.vector_slice(a.registers[idx], slice(0, 1))
      pr = mgpu_utils.bitcast(pf, i32)
      s0, s1 = (vector.load(half, sz, [arith.addi(col, mgpu_utils.c(e, index)), row])
                for e in (0, 1))
      pair = mgpu_utils.bitcast(mgpu_utils.vector_concat([s0, s1]), i32)
      x = llvm.inline_asm(i32, [pr, pair], """
          {
          .reg .b32 lo, hi;
          shl.b32 lo, $2, 16;
          and.b32 hi, $2, 0xffff0000;
          mul.f32 lo, $1, lo;
          mul.f32 hi, $1, hi;
          cvt.rn.f16x2.f32 $0, hi, lo;
          }""", "=r,r,r")
      out[idx] = mgpu_utils.bitcast(x, f16_pair)
      # The zeros' term in float32: z of group j at this row.
      zb = vector.load(half, sz, [arith.addi(j, mgpu_utils.c(ng, index)), row])
      zf = mgpu_utils.bitcast(arith.shli(arith.extui(i32, mgpu_utils.bitcast(
          zb, ir.IntegerType.get_signless(16))), mgpu_utils.c(16, i32)), f32)
      acc = zregs[idx]
      first = vector.extract(acc, dynamic_position=[], static_position=[0])
      p0 = vector.extract(a.registers[idx], dynamic_position=[], static_position=[0])
      zregs[idx] = vector.insert(arith.addf(first, arith.mulf(p0, zf)), acc,
                                 dynamic_position=[], static_position=[0])
    return (mgpu.FragmentedArray(_registers=out, _layout=layout, _is_signed=None),
            mgpu.FragmentedArray(_registers=zregs, _layout=zs.layout, _is_signed=None))
  return scaled(p, sz_ref, zsum)


def _store_row(x, o_ref):
  """`x` float32 `[64, 8]` in the WGMMA layout, every column equal, into the
  GMEM row `o_ref` `[64]`: each thread stores its two rows' first element (a
  quad's four lanes the same value to the same address; predicating the store
  on the quad's first lane hung the kernel on the H200, benchmarks/NOTES.md)."""
  wg = plgpu.Layout.WGMMA

  @plgpu.inline_mgpu(arg_types=(wg, plgpu.RefType()))
  def store(ctx, a, o):
    del ctx
    rows = mgpu.WGMMA_LAYOUT.thread_idxs((PAIR, 8))
    for idx, (row, _) in zip(np.ndindex(a.registers.shape), rows):
      vector.store(mgpu_utils.vector_slice(a.registers[idx], slice(0, 1)), o, [row])
  store(x, o_ref)


def _zero_totals(zsum, red_smem, ng: int, parts):
  """The values' zero term of each group: `zsum` (`_scaled_probabilities`'
  partial sums) summed over a warp's quads by shuffles and over the warps in
  `red_smem` (`[4, ng]` float32). For each list `cols` of `parts`, `[64, 8]`
  float32 in the WGMMA layout, row t holding the total of group
  `cols[t // 16]` in every column."""
  wg = plgpu.Layout.WGMMA
  shape = plgpu.ShapeDtypeStruct((PAIR, 8), jnp.float32, wg)

  @plgpu.inline_mgpu(arg_types=(wg, plgpu.RefType()), return_type=(shape,) * len(parts))
  def totals(ctx, zs, red):
    del ctx
    i32, f32, index = ir.IntegerType.get_signless(32), ir.F32Type.get(), ir.IndexType.get()
    lane, warp = _lane_warp()
    ix = lambda v: arith.index_cast(index, v)  # noqa: E731
    regs = np.array(zs.registers)
    total = mgpu_utils.c(0.0, f32)
    for idx in np.ndindex(regs.shape):  # the thread's two rows
      total = arith.addf(total, vector.extract(regs[idx], dynamic_position=[],
                                               static_position=[0]))
    for dist in (4, 8, 16):  # the warp's 8 quads
      total = arith.addf(total, mgpu_utils.shfl_bfly(total, dist))
    j = arith.andi(lane, mgpu_utils.c(3, i32))
    one = ir.VectorType.get((1,), f32)
    with mgpu_utils.when(arith.cmpi(arith.CmpIPredicate.ult, lane, mgpu_utils.c(ng, i32))):
      vector.store(vector.from_elements(one, [total]), red, [ix(warp), ix(j)])
    mgpu_utils.warpgroup_barrier()
    outs = []
    for cols in parts:
      g = ix(_by_warp(warp, cols))
      t = mgpu_utils.c(0.0, f32)
      for w in range(4):
        t = arith.addf(t, vector.extract(vector.load(one, red, [mgpu_utils.c(w, index), g]),
                                         dynamic_position=[], static_position=[0]))
      out = np.empty(regs.shape, dtype=object)
      out[...] = vector.from_elements(ir.VectorType.get((2,), f32), [t, t])
      outs.append(mgpu.FragmentedArray(_registers=out, _layout=zs.layout, _is_signed=None))
    return tuple(outs)
  return totals(zsum, red_smem)


# exp/gqa2: the folded form for R <= 4 query rows a kv head as two kernels (the
# helpers from exp/gqafold, 2680fbf, whose float64 checks passed on an H200 in its one
# kernel). Column `c(r, g) = 8 (g // 2) + 2 r + g % 2` of the scores' and the values'
# products holds query row r's group g: lane j of a quad holds columns 8 k + 2 j + e,
# so each lane's own registers hold row j's every group, no shuffle.
ROW_COLS = 32  # 4 rows x 8 key groups


def _pick_own(x, gs):
  """`x` float32 `[64, n]` in the WGMMA layout (columns `c(r, g)`) -> `[64, 8]`
  whose columns 2 j, 2 j + 1 hold row j's value at group `gs[t // 16]` (a group
  a warp): each thread's own register, chosen by selects among the warps'."""
  wg = plgpu.Layout.WGMMA

  @plgpu.inline_mgpu(arg_types=(wg,),
                     return_type=plgpu.ShapeDtypeStruct((PAIR, 8), jnp.float32, wg))
  def pick(ctx, a):
    del ctx
    i32, f32 = ir.IntegerType.get_signless(32), ir.F32Type.get()
    _, warp = _lane_warp()
    regs = np.array(a.registers)
    out = np.empty(regs.shape[:1] + (1,) + regs.shape[2:], dtype=object)
    for idx in np.ndindex(out.shape):
      got = {}
      for g in gs:
        if g not in got:
          reg = regs[idx[:1] + (g // 2,) + idx[2:]]
          got[g] = mgpu_utils.bitcast(
              mgpu_utils.vector_slice(reg, slice(g % 2, g % 2 + 1)), i32)
      v = mgpu_utils.bitcast(_by_warp(warp, [got[g] for g in gs]),
                             ir.VectorType.get((1,), f32))
      out[idx] = mgpu_utils.vector_concat([v, v])
    return mgpu.FragmentedArray(_registers=out, _layout=a.layout, _is_signed=None)
  return pick(x)


def _scale_query_rows(scales, zeros, q_smem, qp_smem, corr_smem, rows: int):
  """`_scale_query` for `rows` <= 4 query rows (`q_smem` `[rows, 128]`):
  `qp_smem` `[32, 128]` (128-byte swizzle, tiles of 8 x 64) row `c(r, g)`
  holds bf16(q_r o s_g), `corr_smem` `[32]` q_r . z_g; rows r >= `rows` zero."""
  swz = plgpu.RefType((plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128)))

  @plgpu.inline_mgpu(arg_types=(plgpu.RefType(), plgpu.RefType(), plgpu.RefType(), swz,
                                plgpu.RefType()))
  def build(ctx, sc, zr, q, qp, corr):
    del ctx
    i32, f32, index = ir.IntegerType.get_signless(32), ir.F32Type.get(), ir.IndexType.get()
    vec = ir.VectorType.get((8,), ir.BF16Type.get())
    words = ir.VectorType.get((4,), i32)
    one = ir.VectorType.get((1,), f32)
    tid = mgpu_utils.thread_idx()
    ci = lambda v: mgpu_utils.c(v, i32)  # noqa: E731
    ix = lambda v: arith.index_cast(index, v)  # noqa: E731
    g = arith.andi(arith.shrui(tid, ci(4)), ci(7))
    part = arith.andi(tid, ci(15))
    tile, chunk = arith.shrui(part, ci(3)), arith.andi(part, ci(7))
    word = lambda v, e: vector.extract(v, dynamic_position=[], static_position=[e])  # noqa: E731
    at = [ix(g), ix(arith.shli(part, ci(3)))]
    s8 = mgpu_utils.bitcast(vector.load(vec, sc, at), words)
    z8 = mgpu_utils.bitcast(vector.load(vec, zr, at), words)
    g_tile, g_odd = arith.shrui(g, ci(1)), arith.andi(g, ci(1))
    is_first = arith.cmpi(arith.CmpIPredicate.eq, part, ci(0))
    for r in range(4):
      in_tile = arith.addi(ci(2 * r), g_odd)  # c(r, g) % 8; c // 8 = g // 2
      if r < rows:
        q8 = mgpu_utils.bitcast(vector.load(vec, q, [mgpu_utils.c(r, index), at[1]]), words)
        out = [llvm.inline_asm(i32, [word(q8, e), word(s8, e)], "mul.rn.bf16x2 $0, $1, $2;",
                               "=r,r,r") for e in range(4)]
        total = mgpu_utils.c(0.0, f32)
        for e in range(4):  # bf16 pairs to float32: the high half, the low half shifted up
          qw, zw = word(q8, e), word(z8, e)
          for lo in (True, False):
            f = lambda x, lo=lo: mgpu_utils.bitcast(  # noqa: E731
                arith.shli(x, ci(16)) if lo else arith.andi(x, ci(-65536)), f32)
            total = arith.addf(total, arith.mulf(f(qw), f(zw)))
        for dist in (1, 2, 4, 8):
          total = arith.addf(total, mgpu_utils.shfl_bfly(total, dist))
      else:  # a padded row: zero operand, zero correction
        out = [ci(0)] * 4
        total = mgpu_utils.c(0.0, f32)
      # Row c's 16-byte chunk k of its 8 x 64 tile sits at k ^ (c % 8) (128-byte swizzle).
      vector.store(mgpu_utils.bitcast(vector.from_elements(words, out), vec), qp,
                   [ix(g_tile), ix(tile), ix(in_tile),
                    ix(arith.shli(arith.xori(chunk, in_tile), ci(3)))])
      c = arith.addi(arith.shli(g_tile, ci(3)), in_tile)
      with mgpu_utils.when(is_first):
        vector.store(vector.from_elements(one, [total]), corr, [ix(c)])
  build(scales, zeros, q_smem, qp_smem, corr_smem)


def _corr_cols(corr_smem):
  """`[64, n]` float32 in the WGMMA layout, column c holding `corr[c]` in every
  row (`corr_smem` `[n]`)."""
  wg = plgpu.Layout.WGMMA
  n = corr_smem.shape[0]

  @plgpu.inline_mgpu(arg_types=(plgpu.RefType(),),
                     return_type=plgpu.ShapeDtypeStruct((PAIR, n), jnp.float32, wg))
  def rows(ctx, corr):
    del ctx
    layout = mgpu.WGMMA_LAYOUT
    out = np.empty(layout.registers_shape((PAIR, n)), dtype=object)
    where = dict(zip(np.ndindex(out.shape), layout.thread_idxs((PAIR, n))))
    pair = ir.VectorType.get((2,), ir.F32Type.get())
    for idx in np.ndindex(out.shape):
      out[idx] = vector.load(pair, corr, [where[idx][1]])
    return mgpu.FragmentedArray(_registers=out, _layout=layout, _is_signed=None)
  return rows(corr_smem)


def _scaled_probabilities_rows(p, sz_ref, zsum):
  """`_scaled_probabilities` for 4 value groups and R <= 4 rows: `p` float32
  `[64, 8]` (lane j: row j's probability), `sz_ref` `[8, 64]` (scales of the 4
  groups, then zeros). P' fp16 `[64, 16]`, column `c(j, g)` = fp16(p_j s_g);
  `zsum` float32 `[64, 16]` plus p_j z_g at the same column."""
  wg = plgpu.Layout.WGMMA

  @plgpu.inline_mgpu(arg_types=(wg, plgpu.RefType(), wg),
                     return_type=(plgpu.ShapeDtypeStruct((PAIR, 16), jnp.float16, wg),
                                  plgpu.ShapeDtypeStruct((PAIR, 16), jnp.float32, wg)))
  def scaled(ctx, a, sz, zs):
    del ctx
    i32, f32, index = ir.IntegerType.get_signless(32), ir.F32Type.get(), ir.IndexType.get()
    f16_pair = ir.VectorType.get((2,), ir.F16Type.get())
    half = ir.VectorType.get((1,), ir.BF16Type.get())
    layout = mgpu.WGMMA_LAYOUT
    shape = (PAIR, 16)
    out = np.empty(layout.registers_shape(shape), dtype=object)
    where = dict(zip(np.ndindex(out.shape), layout.thread_idxs(shape)))
    zregs = np.array(zs.registers)
    as_f32 = lambda b: mgpu_utils.bitcast(arith.shli(arith.extui(i32, mgpu_utils.bitcast(  # noqa: E731
        b, ir.IntegerType.get_signless(16))), mgpu_utils.c(16, i32)), f32)
    for idx in np.ndindex(out.shape):
      row, _ = where[idx]
      k = idx[1]  # column tile: groups 2 k, 2 k + 1
      p_reg = a.registers[idx[:1] + (0,) + idx[2:]]
      pf = mgpu_utils.vector_slice(p_reg, slice(0, 1))
      s0, s1 = (vector.load(half, sz, [mgpu_utils.c(2 * k + e, index), row]) for e in (0, 1))
      pair = mgpu_utils.bitcast(mgpu_utils.vector_concat([s0, s1]), i32)
      x = llvm.inline_asm(i32, [mgpu_utils.bitcast(pf, i32), pair], """
          {
          .reg .b32 lo, hi;
          shl.b32 lo, $2, 16;
          and.b32 hi, $2, 0xffff0000;
          mul.f32 lo, $1, lo;
          mul.f32 hi, $1, hi;
          cvt.rn.f16x2.f32 $0, hi, lo;
          }""", "=r,r,r")
      out[idx] = mgpu_utils.bitcast(x, f16_pair)
      p0 = vector.extract(p_reg, dynamic_position=[], static_position=[0])
      acc = zregs[idx]
      for e in (0, 1):  # the zeros' term in float32: z of group 2 k + e at this row
        zb = vector.load(half, sz, [mgpu_utils.c(4 + 2 * k + e, index), row])
        sum_e = vector.extract(acc, dynamic_position=[], static_position=[e])
        acc = vector.insert(arith.addf(sum_e, arith.mulf(p0, as_f32(zb))), acc,
                            dynamic_position=[], static_position=[e])
      zregs[idx] = acc
    return (mgpu.FragmentedArray(_registers=out, _layout=layout, _is_signed=None),
            mgpu.FragmentedArray(_registers=zregs, _layout=zs.layout, _is_signed=None))
  return scaled(p, sz_ref, zsum)


def _zero_totals_rows(zsum, red_smem, parts):
  """`_zero_totals` for R <= 4 rows: `zsum` float32 `[64, 16]` (columns
  `c(j, g)`), summed over a warp's quads by shuffles and over the warps in
  `red_smem` (`[4, 16]` float32). For each list `groups` of `parts`, `[64, 8]`
  float32 whose columns 2 j, 2 j + 1 hold row j's total of group
  `groups[t // 16]`."""
  wg = plgpu.Layout.WGMMA
  shape = plgpu.ShapeDtypeStruct((PAIR, 8), jnp.float32, wg)

  @plgpu.inline_mgpu(arg_types=(wg, plgpu.RefType()), return_type=(shape,) * len(parts))
  def totals(ctx, zs, red):
    del ctx
    i32, f32, index = ir.IntegerType.get_signless(32), ir.F32Type.get(), ir.IndexType.get()
    ci = lambda v: mgpu_utils.c(v, i32)  # noqa: E731
    ix = lambda v: arith.index_cast(index, v)  # noqa: E731
    lane, warp = _lane_warp()
    j = arith.andi(lane, ci(3))
    regs = np.array(zs.registers)
    one = ir.VectorType.get((1,), f32)
    sums = {}
    for idx in np.ndindex(regs.shape):  # the thread's two rows, both column tiles
      for e in (0, 1):
        key = (idx[1], e)
        v = vector.extract(regs[idx], dynamic_position=[], static_position=[e])
        sums[key] = arith.addf(sums[key], v) if key in sums else v
    for (k, e), total in sums.items():
      for dist in (4, 8, 16):  # the warp's 8 quads
        total = arith.addf(total, mgpu_utils.shfl_bfly(total, dist))
      col = arith.addi(ci(8 * k + e), arith.shli(j, ci(1)))
      with mgpu_utils.when(arith.cmpi(arith.CmpIPredicate.ult, lane, ci(4))):
        vector.store(vector.from_elements(one, [total]), red, [ix(warp), ix(col)])
    mgpu_utils.warpgroup_barrier()
    outs = []
    for groups in parts:
      g = _by_warp(warp, groups)
      col = arith.addi(arith.addi(arith.shli(arith.shrui(g, ci(1)), ci(3)),
                                  arith.shli(j, ci(1))), arith.andi(g, ci(1)))
      t = mgpu_utils.c(0.0, f32)
      for w in range(4):
        t = arith.addf(t, vector.extract(vector.load(one, red, [mgpu_utils.c(w, index), ix(col)]),
                                         dynamic_position=[], static_position=[0]))
      out = np.empty(np.array(zs.registers)[:, :1].shape, dtype=object)
      out[...] = vector.from_elements(ir.VectorType.get((2,), f32), [t, t])
      outs.append(mgpu.FragmentedArray(_registers=out, _layout=zs.layout, _is_signed=None))
    return tuple(outs)
  return totals(zsum, red_smem)


def _store_rows(x, o_ref):
  """`x` float32 `[64, 8]` in the WGMMA layout, columns 2 j and 2 j + 1 holding row
  j's value (`_pick_own`), into the GMEM rows `o_ref` `[4, 64]`: each thread stores
  its two tokens' first element at row j (every lane stores: no predicate)."""
  wg = plgpu.Layout.WGMMA

  @plgpu.inline_mgpu(arg_types=(wg, plgpu.RefType()))
  def store(ctx, a, o):
    del ctx
    index = ir.IndexType.get()
    where = mgpu.WGMMA_LAYOUT.thread_idxs((PAIR, 8))
    for idx, (row, col) in zip(np.ndindex(a.registers.shape), where):
      j = arith.divui(col, mgpu_utils.c(2, index))
      vector.store(mgpu_utils.vector_slice(a.registers[idx], slice(0, 1)), o, [j, row])
  store(x, o_ref)


def _row_scores(ref):
  """`[64, 8]` float32 in the WGMMA layout from `ref` `[4, 64]` (a step's scores, a
  row a query row): columns 2 j and 2 j + 1 of row t holding `ref[j, t]`."""
  wg = plgpu.Layout.WGMMA

  @plgpu.inline_mgpu(arg_types=(plgpu.RefType(),),
                     return_type=plgpu.ShapeDtypeStruct((PAIR, 8), jnp.float32, wg))
  def load(ctx, r):
    del ctx
    index = ir.IndexType.get()
    layout = mgpu.WGMMA_LAYOUT
    out = np.empty(layout.registers_shape((PAIR, 8)), dtype=object)
    where = dict(zip(np.ndindex(out.shape), layout.thread_idxs((PAIR, 8))))
    for idx in np.ndindex(out.shape):
      row, col = where[idx]
      v = vector.load(ir.VectorType.get((1,), ir.F32Type.get()), r,
                      [arith.divui(col, mgpu_utils.c(2, index)), row])
      out[idx] = mgpu_utils.vector_concat([v, v])
    return mgpu.FragmentedArray(_registers=out, _layout=layout, _is_signed=None)
  return load(ref)


def _next_step(i, n_steps, fetch, bars):
  """Step `i`'s start over two buffers, returning its slot `i % 2`: once every
  warp is done reading the buffers refetched (`commit_smem`: Pallas's
  automatic barriers are off), step `i + 1`'s fetch into the other slot, then
  the wait on this step's (`bars`, one barrier a slot)."""
  slot = lax.rem(i, 2)
  plgpu.commit_smem()

  @pl.when(i + 1 < n_steps)
  def _():
    fetch(i + 1, lax.rem(i + 1, 2))
  plgpu.barrier_wait(bars.at[slot])
  return slot


def _build_scores(b: int, kh: int, capacity: int, splits: int, k_bits: int, group: int,
                  d: int, step: int, rows: int = 1):
  """Two kernels for one query row (`folds`), the first: each token's scaled,
  masked score (`[B, K, steps x step]` float32; tokens of steps a split does
  not read are left unwritten) and each split's maximum (`[B, K, S, 8]`, the
  columns equal). The keys folded (module docstring): no softmax here."""
  steps = -(-capacity // step)
  per = -(-steps // splits)
  k_words = d * k_bits // 32
  boxes = step // TMA_ROWS
  sm_scale = 1 / math.sqrt(d)
  wg = plgpu.Layout.WGMMA
  gqa = rows > 1  # exp/gqa2: scores `[B, K, 4, steps x step]`, row j at columns 2 j, 2 j + 1
  n_qp = ROW_COLS if gqa else step // group

  def kivi_pair_scores(q_ref, kw_ref, ks_ref, kz_ref, n_ref, lo_ref, s_out, m_out, q_smem,
                       kw_smem, ks_smem, kz_smem, qp_smem, corr_smem, bar_q, bars):
    bi, h, s = lax.axis_index("b"), lax.axis_index("h"), lax.axis_index("s")
    n_valid, lo = n_ref[bi], lo_ref[bi]
    first, n_steps = split_steps(s, n_valid, lo, per, step)

    def fetch(i, slot):
      st = first + i
      bar = bars.at[slot]
      for u in range(boxes):
        t0 = st * step + u * TMA_ROWS
        plgpu.copy_gmem_to_smem(kw_ref.at[bi, h, pl.ds(t0, TMA_ROWS)],
                                kw_smem.at[slot, pl.ds(u * TMA_ROWS, TMA_ROWS)], bar)
      groups = pl.ds(st * (step // group), step // group)
      plgpu.copy_gmem_to_smem(ks_ref.at[bi, h, groups], ks_smem.at[slot], bar)
      plgpu.copy_gmem_to_smem(kz_ref.at[bi, h, groups], kz_smem.at[slot], bar)

    plgpu.copy_gmem_to_smem(q_ref.at[bi, h], q_smem, bar_q)
    pl.when(n_steps > 0)(lambda: fetch(0, 0))
    plgpu.barrier_wait(bar_q)
    load_words = lambda ref: plgpu.load(ref, (), layout=wg, optimized=False)  # noqa: E731
    tok_in = plgpu.broadcasted_iota(jnp.int32, (PAIR, 8), 0, layout=wg)

    def step_body(i, mx):
      slot = _next_step(i, n_steps, fetch, bars)
      t_step = (first + i) * step
      if gqa:
        _scale_query_rows(ks_smem.at[slot], kz_smem.at[slot], q_smem, qp_smem, corr_smem,
                          rows)
      else:
        _scale_query(ks_smem.at[slot], kz_smem.at[slot], q_smem, qp_smem, corr_smem)
      plgpu.commit_smem()
      corr = _corr_cols(corr_smem) if gqa else _broadcast(corr_smem, 1)
      for jp in range(step // PAIR):
        k = _dequant(load_words(kw_smem.at[slot, pl.ds(PAIR * jp, PAIR)]), None, None,
                     k_bits, group)

        def qk(acc_ref, k=k):
          plgpu.wgmma(acc_ref, k, plgpu.transpose_ref(qp_smem, (1, 0)))
        # q . z_g + codes against q o s_g; warp w's rows of tile jp keep their
        # group's column, the step's (64 jp + 16 w) // G.
        pick = _pick_own if gqa else _pick_columns
        st = pick(pl.run_state(qk)(plgpu.ACC.init(corr)),
                  [(PAIR * jp + 16 * w) // group for w in range(4)]) * sm_scale
        tok = t_step + PAIR * jp + tok_in
        st = jnp.where((tok < n_valid) & (tok >= lo), st, _NEG)
        if gqa:
          _store_rows(st, s_out.at[bi, h, :, pl.ds(t_step + PAIR * jp, PAIR)])
        else:
          _store_row(st, s_out.at[bi, h, pl.ds(t_step + PAIR * jp, PAIR)])
        mx = jnp.maximum(mx, st)
      return mx

    mx0 = plgpu.layout_cast(jnp.full((PAIR, 8), _NEG, jnp.float32), wg)
    mx = lax.fori_loop(0, n_steps, step_body, mx0)
    m_out[bi, h, s] = mx.max(axis=0)

  scratch = [
      plgpu.SMEM((rows, d), jnp.bfloat16),
      plgpu.SMEM((2, step, k_words), jnp.uint32),
      plgpu.SMEM((2, step // group, d), jnp.bfloat16),
      plgpu.SMEM((2, step // group, d), jnp.bfloat16),
      plgpu.SMEM((n_qp, d), jnp.bfloat16, transforms=(
          plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))),
      plgpu.SMEM((n_qp,), jnp.float32),
      plgpu.Barrier(num_barriers=1),
      plgpu.Barrier(num_arrivals=2 + boxes, num_barriers=2),
  ]
  return plgpu.kernel(
      kivi_pair_scores,  # the kernel's name in profiles
      out_type=[jax.ShapeDtypeStruct((b, kh, 4, steps * step) if gqa else
                                     (b, kh, steps * step), jnp.float32),
                jax.ShapeDtypeStruct((b, kh, splits, 8), jnp.float32)],
      scratch_types=scratch, grid=(b, kh, splits), grid_names=("b", "h", "s"),
      compiler_params=plgpu.CompilerParams(approx_math=True, unsafe_no_auto_barriers=True))


def _build_values(b: int, kh: int, capacity: int, splits: int, v_bits: int, group: int,
                  d: int, step: int, rows: int = 1):
  """The second of the two kernels: per split, `p = exp(s - m)` with the
  split's maximum from the first (no running maximum, no rescaling), `l` and
  the folded values' `acc` `[B, K, S, D]` (module docstring)."""
  steps = -(-capacity // step)
  per = -(-steps // splits)
  cg = min(group, d)
  ng = d // cg
  v_words = SPAN * v_bits // 32
  boxes = step // TMA_ROWS
  wg = plgpu.Layout.WGMMA
  gqa = rows > 1  # exp/gqa2: P^T's columns c(j, g), the output `[B, K, S, D, 8]`

  def kivi_pair_values(s_ref, m_ref, vw_ref, vs_ref, vz_ref, n_ref, lo_ref, o_out, l_out,
                       sc_smem, vw_smem, vs_smem, p0_smem, p1_smem, red_smem, bars):
    bi, h, s = lax.axis_index("b"), lax.axis_index("h"), lax.axis_index("s")
    n_valid, lo = n_ref[bi], lo_ref[bi]
    first, n_steps = split_steps(s, n_valid, lo, per, step)
    # gqa: columns 2 j, 2 j + 1 of every row hold row j's maximum.
    m = _corr_cols(m_ref.at[bi, h, s]) if gqa else m_ref[bi, h, s, 0]

    def fetch(i, slot):
      st = first + i
      bar = bars.at[slot]
      plgpu.copy_gmem_to_smem(vw_ref.at[bi, h, :, pl.ds(st * (step // SPAN) * v_words,
                                                         step // SPAN * v_words)],
                              vw_smem.at[slot], bar)
      for u in range(boxes):
        t0 = st * step + u * TMA_ROWS
        if gqa:
          plgpu.copy_gmem_to_smem(s_ref.at[bi, h, :, pl.ds(t0, TMA_ROWS)],
                                  sc_smem.at[slot, u], bar)
        else:
          plgpu.copy_gmem_to_smem(s_ref.at[bi, h, pl.ds(t0, TMA_ROWS)],
                                  sc_smem.at[slot, pl.ds(u * TMA_ROWS, TMA_ROWS)], bar)
        plgpu.copy_gmem_to_smem(vs_ref.at[bi, h, :, pl.ds(t0, TMA_ROWS)],
                                vs_smem.at[slot, u, pl.ds(0, ng)], bar)
        plgpu.copy_gmem_to_smem(vz_ref.at[bi, h, :, pl.ds(t0, TMA_ROWS)],
                                vs_smem.at[slot, u, pl.ds(ng, ng)], bar)

    pl.when(n_steps > 0)(lambda: fetch(0, 0))
    load_words = lambda ref: plgpu.load(ref, (), layout=wg, optimized=False)  # noqa: E731

    def step_body(i, carry):
      slot = _next_step(i, n_steps, fetch, bars)
      l, *acc, zsum = carry
      for c in range(step // SPAN):  # V^T tiles of the step
        p_buf = (p0_smem, p1_smem)[c % 2]  # no index closed over by run_state
        for u in range(SPAN // PAIR):
          t = SPAN * c + PAIR * u
          if gqa:
            sc = _row_scores(sc_smem.at[slot, t // TMA_ROWS, :, pl.ds(t % TMA_ROWS, PAIR)])
          else:
            sc = _broadcast(sc_smem.at[slot, pl.ds(t, PAIR)], 0)
          p = jnp.exp(sc - m)
          l = l + p
          sz = vs_smem.at[slot, c // 2, :, pl.ds(SPAN * (c % 2) + PAIR * u, PAIR)]
          p_buf[pl.ds(PAIR * u, PAIR)], zsum = (
              _scaled_probabilities_rows(p, sz, zsum) if gqa else
              _scaled_probabilities(p, sz, zsum, ng))
        plgpu.commit_smem()
        rows = d // len(acc)
        out = []
        for part, a in enumerate(acc):
          words = load_words(
              vw_smem.at[slot, pl.ds(rows * part, rows), pl.ds(v_words * c, v_words)])
          vt = _dequant(words, None, None, v_bits, cg, jnp.float16)

          def pv(acc_ref, vt=vt):
            plgpu.wgmma(acc_ref, vt, p_buf)
          out.append(pl.run_state(pv)(plgpu.ACC.init(a)))
        acc = out
      return (l, *acc, zsum)

    l0 = plgpu.layout_cast(jnp.full((PAIR, 8), 0.0, jnp.float32), wg)
    a0 = tuple(plgpu.layout_cast(jnp.full((d // 2, 16), 0.0, jnp.float32), wg)
               for _ in range(2))
    z0 = plgpu.layout_cast(jnp.full((PAIR, 16 if gqa else 8), 0.0, jnp.float32), wg)
    l, *acc, zsum = lax.fori_loop(0, n_steps, step_body, (l0, *a0, z0))
    groups = [[(PAIR * part + 16 * w) // cg for w in range(4)] for part in range(2)]
    if gqa:  # each row's own group's column (row j at columns 2 j, 2 j + 1)
      zeros = _zero_totals_rows(zsum, red_smem, groups)
      for part, a in enumerate(acc):
        o_out[bi, h, s, pl.ds(PAIR * part, PAIR)] = _pick_own(a, groups[part]) + zeros[part]
    else:
      zeros = _zero_totals(zsum, red_smem, ng, groups)
      for part, a in enumerate(acc):
        _store_row(_pick_columns(a, groups[part]) + zeros[part],
                   o_out.at[bi, h, s, pl.ds(PAIR * part, PAIR)])
    l_out[bi, h, s] = l.sum(axis=0)

  scratch = [
      plgpu.SMEM((2, boxes, 4, TMA_ROWS) if gqa else (2, step), jnp.float32),
      plgpu.SMEM((2, d, step // SPAN * v_words), jnp.uint32),
      plgpu.SMEM((2, boxes, 2 * ng, TMA_ROWS), jnp.bfloat16),
      *[plgpu.SMEM((2 * PAIR, 16), jnp.float16, transforms=(
          plgpu.TilingTransform((8, 16)), plgpu.SwizzleTransform(32))) for _ in range(2)],
      plgpu.SMEM((4, 16 if gqa else ng), jnp.float32),
      plgpu.Barrier(num_arrivals=1 + 3 * boxes, num_barriers=2),
  ]
  return plgpu.kernel(
      kivi_pair_values,  # the kernel's name in profiles
      out_type=[jax.ShapeDtypeStruct((b, kh, splits, d, 8) if gqa else (b, kh, splits, d),
                                     jnp.float32),
                jax.ShapeDtypeStruct((b, kh, splits, 8), jnp.float32)],
      scratch_types=scratch, grid=(b, kh, splits), grid_names=("b", "h", "s"),
      compiler_params=plgpu.CompilerParams(approx_math=True, unsafe_no_auto_barriers=True))


def _build(b: int, kh: int, capacity: int, splits: int, n_rows: int, k_bits: int,
           v_bits: int, group: int, d: int, step: int, v_halves: bool):
  """The kernel over the grid (B, K, splits), `n_rows` (8 or 16) query rows,
  heads `d` wide."""
  steps = -(-capacity // step)  # the last may run past the block (read as zeros)
  per = -(-steps // splits)
  cg = min(group, d)
  k_words = d * k_bits // 32      # a token's key words
  k_type = jnp.uint16 if d < HEAD_DIM else jnp.uint32  # 64-wide: read as halves
  k_cols = k_words * (2 if d < HEAD_DIM else 1)
  v_words = SPAN * v_bits // 32  # a channel's value words per V^T tile
  boxes = step // TMA_ROWS
  sm_scale = 1 / math.sqrt(d)
  wg = plgpu.Layout.WGMMA
  ng = d // cg  # value channel groups a head

  def kivi_pair_decode_attention(q_ref, kw_ref, ks_ref, kz_ref, vw_ref, vs_ref, vz_ref,
                                 n_ref, lo_ref, o_out, m_out, l_out, q_smem, kw_smem,
                                 ks_smem, kz_smem, vw_smem, vs_smem, vz_smem, p_smem, bar_q,
                                 bars):
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
        t0 = st * step + u * TMA_ROWS
        plgpu.copy_gmem_to_smem(kw_ref.at[bi, h, pl.ds(t0, TMA_ROWS)],
                                kw_smem.at[slot, pl.ds(u * TMA_ROWS, TMA_ROWS)], bar)
        plgpu.copy_gmem_to_smem(vs_ref.at[bi, h, :, pl.ds(t0, TMA_ROWS)], vs_smem.at[slot, u],
                                bar)
        plgpu.copy_gmem_to_smem(vz_ref.at[bi, h, :, pl.ds(t0, TMA_ROWS)], vz_smem.at[slot, u],
                                bar)
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
      slot = _next_step(i, n_steps, fetch, bars)
      t_step = (first + i) * step

      def scores(jp):
        """S^T [64 tokens, N] of tile `jp` of the step, scaled and masked."""
        words = load_words(kw_smem.at[slot, pl.ds(PAIR * jp, PAIR)])
        k = _dequant(words,
                     ks_smem.at[slot, pl.ds(PAIR * jp // group, max(1, PAIR // group))],
                     kz_smem.at[slot, pl.ds(PAIR * jp // group, max(1, PAIR // group))],
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
        # Two buffers: the commit before one's stores follows every warp's wait
        # on the other's product.
        p_buf = p_smem.at[lax.rem(c, 2)]
        for u in range(2):
          pu = ps[u].astype(jnp.bfloat16)
          p_buf[pl.ds(PAIR * u, PAIR)] = _with_columns(pu, 16, wg) if n_rows == 8 else pu
        plgpu.commit_smem()
        rows = d // len(accs)
        out = []
        for part, acc in enumerate(accs):
          at = pl.ds(rows * part // cg, max(1, rows // cg))
          words = load_words(
              vw_smem.at[slot, pl.ds(rows * part, rows), pl.ds(v_words * c, v_words)])
          vt = _dequant(words, vs_smem.at[slot, c // 2, at, pl.ds(SPAN * (c % 2), SPAN)],
                        vz_smem.at[slot, c // 2, at, pl.ds(SPAN * (c % 2), SPAN)], v_bits, cg)

          def pv(acc_ref, vt=vt):
            plgpu.wgmma(acc_ref, vt, p_buf)
          out.append(pl.run_state(pv)(plgpu.ACC.init(acc)))
        return tuple(out)

      def update(c, carry):
        """The scores of `UPDATE` tokens, one softmax update, their values."""
        m, l, acc = carry
        sts = [scores(UPDATE // PAIR * c + u) for u in range(UPDATE // PAIR)]
        m_new = jnp.maximum(m, functools.reduce(jnp.maximum, sts).max(axis=0))
        alpha = jnp.exp(m - m_new)
        ps = [jnp.exp(st - lax.broadcast_in_dim(m_new, st.shape, [1])) for st in sts]
        l = l * lax.broadcast_in_dim(alpha, l.shape, [1]) + functools.reduce(jnp.add, ps)
        alpha = _with_columns(alpha, 16, wg.reduce(0), 1.0) if n_rows == 8 else alpha
        acc = tuple(a * lax.broadcast_in_dim(alpha, a.shape, [1]) for a in acc)
        for u in range(UPDATE // SPAN):
          acc = values(UPDATE // SPAN * c + u, ps[2 * u:2 * u + 2], acc)
        return m_new, l, acc
      # Only the updates holding a live token: the first and last steps of a row
      # may hold dead ones (before `lo`, from `n_valid` on). Every step between
      # runs whole, so P^T's buffers keep alternating.
      first_update = jnp.maximum(lo - t_step, 0) // UPDATE
      end_update = jnp.minimum((n_valid - t_step + UPDATE - 1) // UPDATE,
                               step // UPDATE)
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

  def swizzled(shape, swizzle, dtype=jnp.bfloat16):
    return plgpu.SMEM(shape, dtype, transforms=(
        plgpu.TilingTransform((8, swizzle // 2)), plgpu.SwizzleTransform(swizzle)))

  scratch = [
      swizzled((n_rows, d), 128),
      plgpu.SMEM((2, step, k_cols), k_type),
      plgpu.SMEM((2, step // group, d), jnp.bfloat16),
      plgpu.SMEM((2, step // group, d), jnp.bfloat16),
      plgpu.SMEM((2, d, step // SPAN * v_words), jnp.uint32),
      plgpu.SMEM((2, boxes, ng, TMA_ROWS), jnp.bfloat16),
      plgpu.SMEM((2, boxes, ng, TMA_ROWS), jnp.bfloat16),
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
  step = step_tokens(group_size)
  if not applies(k_bits, v_bits, group_size, d, m_rows, q.dtype, k_scale.dtype):
    raise ValueError(
        f"the pair kernel reads 2/4/8-bit codes in power-of-two groups of 16 to "
        f"{max_group(k_bits, v_bits)} "
        f"tokens, head_dim {HEAD_DIMS}, at most 16 bf16 query rows with bf16 scales; got "
        f"k_bits={k_bits}, v_bits={v_bits}, group_size={group_size}, head_dim={d}, "
        f"rows={m_rows}, q {q.dtype}, scales {k_scale.dtype}")
  if capacity % math.lcm(SPAN, group_size) or capacity < step:
    raise ValueError(f"the block's capacity ({capacity}) must be a multiple of "
                     f"{math.lcm(SPAN, group_size)} tokens and at least a step, {step}")
  n_rows = 8 if m_rows <= 8 else 16
  halves = values_in_halves(k_bits, v_bits, d)
  folded = folds(k_bits, v_bits, group_size, d, m_rows)
  n_valid, lo = n_valid.astype(jnp.int32), lo.astype(jnp.int32)
  if splits is None:
    # Three blocks an SM where V^T goes in halves and a step's buffers take 61
    # KiB, and for either of the folded kernels (as measured).
    third = folded or halves and step == UPDATE
    splits = default_splits(b, kh, -(-capacity // step), 3 if third else 2)
  if folded:  # the rows as they are: the scores, then the values
    sc, m = _build_scores(b, kh, capacity, splits, k_bits, group_size, d, step, m_rows)(
        q, k_codes, k_scale, k_zero, n_valid, lo)
    o, l = _build_values(b, kh, capacity, splits, v_bits, group_size, d, step, m_rows)(
        sc, m, v_codes, v_scale, v_zero, n_valid, lo)
    if m_rows > 1:  # exp/gqa2: row r at columns 2 r, 2 r + 1
      return (jnp.swapaxes(o, 3, 4)[..., 0:2 * m_rows:2, :], m[..., 0:2 * m_rows:2],
              l[..., 0:2 * m_rows:2])
    return o[..., None, :], m[..., :1], l[..., :1]
  q = jnp.pad(q, ((0, 0), (0, 0), (0, n_rows - m_rows), (0, 0)))
  if d < HEAD_DIM:  # a key row's words as the 16-bit halves the kernel reads
    k_codes = lax.bitcast_convert_type(k_codes, jnp.uint16).reshape(
        *k_codes.shape[:-1], 2 * k_codes.shape[-1])
  o, m, l = _build(b, kh, capacity, splits, n_rows, k_bits, v_bits, group_size, d, step,
                   halves)(q, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, n_valid, lo)
  return jnp.swapaxes(o, 3, 4)[..., :m_rows, :], m[..., :m_rows], l[..., :m_rows]
