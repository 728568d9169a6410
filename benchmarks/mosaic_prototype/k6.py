"""Prototype: KIVI-2 decode block attention as a Mosaic GPU kernel (keys and values).

S^T = Kdq Q^T per 64 tokens (two groups), online softmax over the token axis,
O^T += Vdq^T P^T. Word tiles arrive by TMA (double-buffered), each loaded twice
into a 64-row buffer so that one WGMMA-layout array holds two slots.
"""
import math
import jax, jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

G, D, N = 32, 128, 16
W = 16  # 2-bit codes per word
PB = W * G  # tokens per packing block
NEG = -1e30


def build(B, K, C, splits, interpret=None, stages=2, unroll=1, shared_dq=False,
          reload_words=False, magic=False, prealign=False, chunk=1,
          defer_sum=False, swizzle_words=False):
  n_pb = C // PB
  pb_per_split = -(-n_pb // splits)
  sm_scale = 1 / math.sqrt(D)
  WG = plgpu.Layout.WGMMA
  interp = interpret is not None

  def lc(x, layout):
    return x if interp else plgpu.layout_cast(x, layout)

  def iota(shape, dim):
    if interp:
      return lax.broadcasted_iota(jnp.int32, shape, dim)
    return plgpu.broadcasted_iota(jnp.int32, shape, dim, layout=WG)

  def ld(ref, layout, optimized=False):
    return ref[...] if interp else plgpu.load(ref, (), layout=layout, optimized=optimized)

  def to_f32(c):
    # Codes (u32, < 2^23) to float32: exact, without an int-to-float conversion.
    if not magic:
      return c.astype(jnp.float32)
    return lax.bitcast_convert_type(c | jnp.uint32(0x4B000000), jnp.float32) - 8388608.0

  def T(ref):
    return ref if interp else plgpu.transpose_ref(ref, (1, 0))

  def kernel(q_ref, kw_ref, ks_ref, kz_ref, vw_ref, vs_ref, vz_ref, n_ref,
             o_out, m_out, l_out,
             q_smem, kw_smem, ks_smem, kz_smem, vw_smem, vs_smem, vz_smem,
             kdq_smem, *rest):
    if shared_dq:
      p_smem, bar_q, bars = rest
      vdq_smem = kdq_smem
    else:
      vdq_smem, p_smem, bar_q, bars = rest
    b, h, s = lax.axis_index("b"), lax.axis_index("h"), lax.axis_index("s")
    pb0 = s * pb_per_split
    n_valid = n_ref[b]
    n_steps = jnp.clip((n_valid + PB - 1) // PB - pb0, 0, pb_per_split)

    def fetch(i, slot):
      pb = pb0 + i
      bar = bars.at[slot]
      for half in range(2):
        plgpu.copy_gmem_to_smem(kw_ref.at[b, h, pl.ds(pb * G, G)],
                                kw_smem.at[slot, pl.ds(half * G, G)], bar)
        plgpu.copy_gmem_to_smem(vw_ref.at[b, h, pl.ds(pb * G, G)],
                                vw_smem.at[slot, pl.ds(half * G, G)], bar)
        plgpu.copy_gmem_to_smem(vs_ref.at[b, h, :, pl.ds(pb * PB + half * 256, 256)],
                                vs_smem.at[slot, half], bar)
        plgpu.copy_gmem_to_smem(vz_ref.at[b, h, :, pl.ds(pb * PB + half * 256, 256)],
                                vz_smem.at[slot, half], bar)
      plgpu.copy_gmem_to_smem(ks_ref.at[b, h, pl.ds(pb * W, W)], ks_smem.at[slot], bar)
      plgpu.copy_gmem_to_smem(kz_ref.at[b, h, pl.ds(pb * W, W)], kz_smem.at[slot], bar)

    plgpu.copy_gmem_to_smem(q_ref.at[b, h], q_smem, bar_q)
    for i in range(min(stages - 1, pb_per_split)):
      pl.when(i < n_steps)(lambda i=i: fetch(i, i))
    plgpu.barrier_wait(bar_q)
    row = iota((2 * G, D), 0)
    upper = row < G
    cgrp = iota((2 * G, D), 1) // G
    tok_in = iota((2 * G, N), 0)
    bc_col = lambda v: lax.broadcast_in_dim(v, (2 * G, D), [1])
    bc_row = lambda v: lax.broadcast_in_dim(v, (2 * G, D), [0])

    def step(i, carry):
      slot = lax.rem(i, stages)
      @pl.when(i + stages - 1 < n_steps)
      def _():
        fetch(i + stages - 1, lax.rem(i + stages - 1, stages))
      plgpu.barrier_wait(bars.at[slot])
      kwords = vwords = None
      if not reload_words:
        kwords = ld(kw_smem.at[slot], WG, swizzle_words)
        vwords = ld(vw_smem.at[slot], WG, swizzle_words)
        if prealign:  # the lower half's slot is the pair's second: shift it once
          kwords = jnp.where(upper, kwords, kwords >> 2)
          vwords = jnp.where(upper, vwords, vwords >> 2)
      def keys(jp):
        """Scores S^T [64 tokens, N] of slot pair `jp`, masked and scaled."""
        if prealign:
          shift = (4 * jp).astype(jnp.uint32)
        else:
          shift = jnp.where(upper, 4 * jp, 4 * jp + 2).astype(jnp.uint32)
        kws = ld(kw_smem.at[slot], WG, swizzle_words) if reload_words else kwords
        kc = to_f32((kws >> shift) & 3)
        sk = [ld(ks_smem.at[slot, 2 * jp + u], WG.reduce(0)).astype(jnp.float32)
              for u in (0, 1)]
        zk = [ld(kz_smem.at[slot, 2 * jp + u], WG.reduce(0)).astype(jnp.float32)
              for u in (0, 1)]
        k = kc * jnp.where(upper, bc_col(sk[0]), bc_col(sk[1])) + jnp.where(
            upper, bc_col(zk[0]), bc_col(zk[1]))
        kdq_smem[...] = k.astype(jnp.bfloat16)
        plgpu.commit_smem()

        def qk(acc_ref):
          plgpu.wgmma(acc_ref, kdq_smem, T(q_smem))
          return acc_ref[...]
        st = pl.run_scoped(qk, plgpu.ACC((2 * G, N), jnp.float32)) * sm_scale
        tok = (pb0 + i) * PB + 2 * G * jp + tok_in
        return jnp.where(tok < n_valid, st, NEG), shift

      def values(jp, shift, p, acc):
        vws = ld(vw_smem.at[slot], WG, swizzle_words) if reload_words else vwords
        vc = to_f32((vws >> shift) & 3)
        pick = lambda xs: jnp.where(cgrp == 0, xs[0], jnp.where(
            cgrp == 1, xs[1], jnp.where(cgrp == 2, xs[2], xs[3])))
        vsg = [bc_row(ld(vs_smem.at[slot, jp // 4, g, pl.ds(2 * G * (jp % 4), 2 * G)],
                         WG.reduce(1)).astype(jnp.float32)) for g in range(D // G)]
        vzg = [bc_row(ld(vz_smem.at[slot, jp // 4, g, pl.ds(2 * G * (jp % 4), 2 * G)],
                         WG.reduce(1)).astype(jnp.float32)) for g in range(D // G)]
        v = vc * pick(vsg) + pick(vzg)
        if interp:
          vdq_smem[...] = v.astype(jnp.bfloat16).T
        else:
          vdq_smem[...] = v.astype(jnp.bfloat16)
        p_smem[...] = p.astype(jnp.bfloat16)
        plgpu.commit_smem()

        def pv(acc_ref):
          plgpu.wgmma(acc_ref, T(vdq_smem), p_smem)
        if interp:
          def pv_new(acc_ref):
            plgpu.wgmma(acc_ref, vdq_smem, p_smem)
            return acc_ref[...]
          return acc + pl.run_scoped(pv_new, plgpu.ACC((D, N), jnp.float32))
        return pl.run_state(pv)(plgpu.ACC.init(acc))

      def pairs(c, carry):
        """`chunk` slot pairs: their scores, one softmax update, their values."""
        m, l, acc = carry
        jps = [c * chunk + u for u in range(chunk)]
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
        if defer_sum:
          l = l * lax.broadcast_in_dim(alpha, l.shape, [1]) + psum
        else:
          l = l * alpha + psum.sum(axis=0)
        acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [1])
        for jp, shift, p in zip(jps, shifts, ps):
          acc = values(jp, shift, p, acc)
        return m_new, l, acc
      return lax.fori_loop(0, W // 2 // chunk, pairs, carry, unroll=unroll)

    m0 = lc(jnp.full((N,), NEG, jnp.float32), WG.reduce(0))
    l0 = (lc(jnp.full((2 * G, N), 0.0, jnp.float32), WG) if defer_sum
          else lc(jnp.full((N,), 0.0, jnp.float32), WG.reduce(0)))
    a0 = lc(jnp.full((D, N), 0.0, jnp.float32), WG)
    m, l, acc = lax.fori_loop(0, n_steps, step, (m0, l0, a0))
    if defer_sum:
      l = l.sum(axis=0)
    o_out[b, h, s] = acc
    m_out[b, h, s] = m
    l_out[b, h, s] = l

  def tiled(shape, dt, swz=128):
    if interp:
      return plgpu.SMEM(shape, dt)
    return plgpu.SMEM(shape, dt, transforms=(
        plgpu.TilingTransform((8, swz // 2)), plgpu.SwizzleTransform(swz)))
  kswz = 32 if shared_dq else 128
  scratch = [
      tiled((D, N), jnp.bfloat16) if interp else tiled((N, D), jnp.bfloat16, kswz),
      plgpu.SMEM((stages, 2 * G, D), jnp.uint32, transforms=(
          plgpu.TilingTransform((8, 32)), plgpu.SwizzleTransform(128)))
      if swizzle_words and not interp else plgpu.SMEM((stages, 2 * G, D), jnp.uint32),
      plgpu.SMEM((stages, W, D), jnp.bfloat16), plgpu.SMEM((stages, W, D), jnp.bfloat16),
      plgpu.SMEM((stages, 2 * G, D), jnp.uint32, transforms=(
          plgpu.TilingTransform((8, 32)), plgpu.SwizzleTransform(128)))
      if swizzle_words and not interp else plgpu.SMEM((stages, 2 * G, D), jnp.uint32),
      plgpu.SMEM((stages, 2, D // G, PB // 2), jnp.bfloat16),
      plgpu.SMEM((stages, 2, D // G, PB // 2), jnp.bfloat16),
      tiled((2 * G, D), jnp.bfloat16, kswz),
      *([] if shared_dq else [
          tiled((D, 2 * G), jnp.bfloat16) if interp else tiled((2 * G, D), jnp.bfloat16, 32)]),
      tiled((2 * G, N), jnp.bfloat16, 32),
      plgpu.Barrier(num_barriers=1),
      plgpu.Barrier(num_arrivals=10, num_barriers=stages),
  ]
  return plgpu.kernel(
      kernel,
      out_type=[jax.ShapeDtypeStruct((B, K, splits, D, N), jnp.float32),
                jax.ShapeDtypeStruct((B, K, splits, N), jnp.float32),
                jax.ShapeDtypeStruct((B, K, splits, N), jnp.float32)],
      scratch_types=scratch,
      grid=(B, K, splits), grid_names=("b", "h", "s"),
      **({} if interpret is None else dict(interpret=interpret)))


def example_args(B, K, C):
  return (jax.ShapeDtypeStruct((B, K, N, D), jnp.bfloat16),
          jax.ShapeDtypeStruct((B, K, C // W, D), jnp.uint32),
          jax.ShapeDtypeStruct((B, K, C // G, D), jnp.bfloat16),
          jax.ShapeDtypeStruct((B, K, C // G, D), jnp.bfloat16),
          jax.ShapeDtypeStruct((B, K, C // W, D), jnp.uint32),
          jax.ShapeDtypeStruct((B, K, D // G, C), jnp.bfloat16),
          jax.ShapeDtypeStruct((B, K, D // G, C), jnp.bfloat16),
          jax.ShapeDtypeStruct((B,), jnp.int32))


if __name__ == "__main__":
  B, K, C, S = 1, 1, 1024, 1
  txt = jax.jit(build(B, K, C, S)).trace(*example_args(B, K, C)).lower(
      lowering_platforms=("cuda",)).as_text()
  print("lowered", len(txt))
