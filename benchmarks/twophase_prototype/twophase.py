"""Prototype: MHA decode over the KIVI block in two Pallas Triton kernels.

Phase 1 (scores): one program per (row, kv head, packing block): the word tile
[G, D] once, then per slot (one group) codes * (q * scale) summed over channels
on CUDA cores. Phase 2 (values): per (row, head, packing block) the block's
max, p = exp(s - m), acc[d] = sum_t p_t (vs_t code_td + vz_t). Partials merged
by merge_partials. No loop-carried state: occupancy hides latency.
"""
import functools, math
import jax, jax.numpy as jnp
from jax.experimental import pallas as pl
from kivi_jax.pallas_kernels.decode_attention import merge_partials, pallas_call
from kivi_jax.pallas_kernels.common import MASK_VALUE as NEG, codes_per_word


def _scores_kernel(q_ref, kw_ref, ks_ref, kz_ref, n_ref, s_ref, *, bits, g, sm_scale, dot, transpose, nslots):
  j = pl.program_id(2)
  w = 32 // bits
  half = j % (w // nslots)
  q = q_ref[...].astype(jnp.float32) * sm_scale  # [1, D]
  words = kw_ref[...]  # [G, D]
  if transpose:
    words = words.T  # [D, G]
    qT = q.T
  n = n_ref[0]
  tok_r = jax.lax.broadcasted_iota(jnp.int32, (g,), 0)
  for si in range(nslots):
    s = si  # slot within this program's share
    slot_global = half * nslots + si
    qz = jnp.sum(q * kz_ref[pl.ds(si, 1), :].astype(jnp.float32))
    shift = (slot_global * bits).astype(jnp.uint32) if nslots < w else jnp.uint32(si * bits)
    codes = ((words >> shift) & jnp.uint32(2**bits - 1)).astype(jnp.float32)
    if transpose:
      qs = qT * ks_ref[pl.ds(si, 1), :].astype(jnp.float32).T  # [D, 1]
      sc = jnp.sum(codes * qs, axis=0) + qz
    else:
      qs = q * ks_ref[pl.ds(si, 1), :].astype(jnp.float32)  # [1, D]
      sc = jnp.sum(codes * qs, axis=1) + qz  # [G]
    tok = (j // (w // nslots)) * (w * g) + slot_global * g + tok_r
    s_ref[si, :] = jnp.where(tok < n, sc, NEG)


def _values_kernel(s_ref, vw_ref, vs_ref, vz_ref, acc_ref, m_ref, l_ref, *, bits, g, cg):
  w = 32 // bits
  d = vw_ref.shape[-1]
  ncg = d // cg
  sc = s_ref[...]  # [w, G]
  m = jnp.max(sc)
  l = jnp.sum(jnp.where(sc > NEG / 2, jnp.exp(sc - m), 0.0))
  words = vw_ref[...]  # [G, D]
  acc = jnp.zeros((g, d), jnp.float32)
  bias = jnp.zeros((g, ncg), jnp.float32)
  for s in range(w):
    s_s = s_ref[pl.ds(s, 1), :][0]  # [G]
    p_s = jnp.where(s_s > NEG / 2, jnp.exp(s_s - m), 0.0)
    vs = vs_ref[s].astype(jnp.float32)  # [G, ncg]
    vz = vz_ref[s].astype(jnp.float32)
    pv = jnp.broadcast_to((p_s[:, None] * vs)[:, :, None], (g, ncg, cg)).reshape(g, d)
    codes = ((words >> jnp.uint32(s * bits)) & jnp.uint32(2**bits - 1)).astype(jnp.float32)
    acc = acc + pv * codes
    bias = bias + p_s[:, None] * vz
  b = jnp.broadcast_to(jnp.sum(bias, axis=0)[:, None], (ncg, cg)).reshape(d)
  acc_ref[...] = jnp.sum(acc, axis=0) + b
  m_ref[...] = jnp.full((1,), m, jnp.float32)
  l_ref[...] = jnp.full((1,), l, jnp.float32)


@functools.partial(jax.jit, static_argnames=("k_bits", "v_bits", "group_size", "num_warps", "interpret", "warps2", "phase", "dot", "transpose", "nslots"))
def twophase_attention(q, kw, ks, kz, vw, vs, vz, n_valid, lo, *, k_bits, v_bits, group_size,
                       num_warps=4, warps2=4, interpret=False, phase=0, dot=False, transpose=False, nslots=None):
  """q [B, K, 1, D]; returns (o [B,K,1,D], lse [B,K,1])."""
  assert k_bits == v_bits
  bits, g = k_bits, group_size
  b, kh, mrows, d = q.shape
  w = 32 // bits
  nblk = kw.shape[2] // g
  cg = min(g, d)
  ncg = d // cg
  ns = w if nslots is None else nslots
  per = w // ns
  slab = lambda shape, idx: pl.BlockSpec(shape, idx)
  scores = pallas_call(
      functools.partial(_scores_kernel, bits=bits, g=g, sm_scale=1 / math.sqrt(d), dot=dot, transpose=transpose, nslots=ns),
      [q, kw, ks, kz, n_valid.astype(jnp.int32)],
      [pl.BlockSpec((None, None, mrows, d), lambda i, h, j: (i, h, 0, 0)),
       pl.BlockSpec((None, None, g, d), lambda i, h, j: (i, h, j // per, 0)),
       pl.BlockSpec((None, None, ns, d), lambda i, h, j: (i, h, j, 0)),
       pl.BlockSpec((None, None, ns, d), lambda i, h, j: (i, h, j, 0)),
       pl.BlockSpec((1,), lambda i, h, j: (i,))],
      [pl.BlockSpec((None, None, None, ns, g), lambda i, h, j: (i, h, j, 0, 0))],
      [jax.ShapeDtypeStruct((b, kh, nblk * per, ns, g), jnp.float32)],
      grid=(b, kh, nblk * per), poison=False, num_warps=num_warps, num_stages=1,
      interpret=interpret, name="tp_scores")[0]
  scores = scores.reshape(b, kh, nblk, w, g)
  if phase == 1:
    return scores
  if phase == 2:
    scores = jnp.zeros((b, kh, nblk, w, g), jnp.float32)
  vs6 = vs.reshape(b, kh, nblk, w, g, ncg)
  vz6 = vz.reshape(b, kh, nblk, w, g, ncg)
  acc, m, l = pallas_call(
      functools.partial(_values_kernel, bits=bits, g=g, cg=cg),
      [scores, vw, vs6, vz6],
      [pl.BlockSpec((None, None, None, w, g), lambda i, h, j: (i, h, j, 0, 0)),
       pl.BlockSpec((None, None, g, d), lambda i, h, j: (i, h, j, 0)),
       pl.BlockSpec((None, None, None, w, g, ncg), lambda i, h, j: (i, h, j, 0, 0, 0)),
       pl.BlockSpec((None, None, None, w, g, ncg), lambda i, h, j: (i, h, j, 0, 0, 0))],
      [pl.BlockSpec((None, None, None, d), lambda i, h, j: (i, h, j, 0)),
       pl.BlockSpec((None, None, None, 1), lambda i, h, j: (i, h, j, 0)),
       pl.BlockSpec((None, None, None, 1), lambda i, h, j: (i, h, j, 0))],
      [jax.ShapeDtypeStruct((b, kh, nblk, d), jnp.float32),
       jax.ShapeDtypeStruct((b, kh, nblk, 1), jnp.float32),
       jax.ShapeDtypeStruct((b, kh, nblk, 1), jnp.float32)],
      grid=(b, kh, nblk), poison=False, num_warps=warps2, num_stages=1,
      interpret=interpret, name="tp_values")
  o, lse = merge_partials(acc[:, :, :, None, :], m, l)
  return o, lse
