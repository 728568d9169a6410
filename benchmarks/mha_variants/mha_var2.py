"""Variants of the product MHA kernels (pallas_kernels/decode_attention_mha.py):
codes made by the 2^23 magic number (or, bitcast, subtract) instead of an
int-to-float conversion; warps. Block attention (partials + merge) alone."""
import json, os, time, functools
import jax, jax.numpy as jnp, numpy as np
from kivi_jax import quantization, bench
from kivi_jax.pallas_kernels import decode_attention as da
from kivi_jax.pallas_kernels import decode_attention_mha as dm
from jax.experimental import pallas as pl

OUT = os.environ.get("OUT", "/tmp")
SMOKE = jax.default_backend() != "gpu"
res = {"jax": jax.__version__, "device": jax.devices()[0].device_kind,
       "date": time.strftime("%Y-%m-%d"), "commit": os.environ.get("KIVI_JAX_COMMIT"), "rows": []}
if not SMOKE:
  res["copy_tbps"] = bench.copy_bandwidth_tbps()
print(res, flush=True)
G = 32
orig_codes = dm._codes
orig_s, orig_v = dm._scores_kernel, dm._values_kernel


def magic_codes(words, slot, bits):
  x = ((words >> jnp.uint32(slot * bits)) & jnp.uint32(2**bits - 1)) | jnp.uint32(0x4B000000)
  return jax.lax.bitcast_convert_type(x, jnp.float32) - jnp.float32(8388608.0)


def scores_folded(q_ref, kw_ref, ks_ref, kz_ref, n_ref, lo_ref, s_ref, *, bits, sm_scale):
  # The zero term summed with the codes' products: one channel sum per slot.
  j = pl.program_id(2)
  slots, g = s_ref.shape
  live = dm._live(j, slots * g, n_ref, lo_ref)

  @pl.when(live)
  def _():
    q = q_ref[...].astype(jnp.float32) * sm_scale
    words = kw_ref[...]
    tok_in_group = jax.lax.broadcasted_iota(jnp.int32, (g,), 0)
    for slot in range(slots):
      qs = q * ks_ref[pl.ds(slot, 1), :].astype(jnp.float32)
      qz = q * kz_ref[pl.ds(slot, 1), :].astype(jnp.float32)
      s = jnp.sum(dm._codes(words, slot, bits) * qs + qz, axis=1)
      tok = (j * slots + slot) * g + tok_in_group
      s_ref[slot, :] = jnp.where((tok < n_ref[0]) & (tok >= lo_ref[0]), s, dm._NEG)

  @pl.when(~live)
  def _():
    s_ref[...] = jnp.full(s_ref.shape, dm._NEG, jnp.float32)


def values_split(s_ref, vw_ref, vs_ref, vz_ref, n_ref, lo_ref, acc_ref, m_ref, l_ref, *, bits):
  # One accumulator per channel group, each from its own column tile: no
  # broadcast-and-reshape of the folded probabilities.
  j = pl.program_id(2)
  slots, g = s_ref.shape
  d = vw_ref.shape[-1]
  n_cgroups = vs_ref.shape[-1]
  cg = d // n_cgroups
  live = dm._live(j, slots * g, n_ref, lo_ref)

  @pl.when(live)
  def _():
    scores = s_ref[...]
    m = jnp.max(scores)
    l = jnp.sum(jnp.where(scores > dm._NEG / 2, jnp.exp(scores - m), 0.0))
    tiles = [vw_ref[:, pl.ds(c * cg, cg)] for c in range(n_cgroups)]
    accs = [jnp.zeros((g, cg), jnp.float32) for _ in range(n_cgroups)]
    bias = jnp.zeros((g, n_cgroups), jnp.float32)
    for slot in range(slots):
      s = s_ref[pl.ds(slot, 1), :][0]
      p = jnp.where(s > dm._NEG / 2, jnp.exp(s - m), 0.0)
      for c in range(n_cgroups):
        ps = p[:, None] * vs_ref[slot, :, pl.ds(c, 1)].astype(jnp.float32)
        accs[c] = accs[c] + ps * dm._codes(tiles[c], slot, bits)
      bias = bias + p[:, None] * vz_ref[slot].astype(jnp.float32)
    bias = jnp.sum(bias, axis=0)
    for c in range(n_cgroups):
      acc_ref[:, pl.ds(c * cg, cg)] = (jnp.sum(accs[c], axis=0) + jnp.sum(jnp.where(
          jax.lax.broadcasted_iota(jnp.int32, (n_cgroups,), 0) == c, bias, 0.0)))[None, :]
    m_ref[...] = jnp.full((1,), m, jnp.float32)
    l_ref[...] = jnp.full((1,), l, jnp.float32)

  @pl.when(~live)
  def _():
    acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)
    m_ref[...] = jnp.full((1,), dm._NEG, jnp.float32)
    l_ref[...] = jnp.zeros((1,), jnp.float32)


def block(key, b, h, L, d, bits):
  @jax.jit
  def make(key):
    k1, k2 = jax.random.split(key)
    k = jax.random.normal(k1, (b, h, L, d), jnp.bfloat16)
    v = jax.random.normal(k2, (b, h, L, d), jnp.bfloat16)
    kc, ks, kz = quantization.quantize(k, bits, G, "channel", jnp.bfloat16)
    vc, vs, vz = quantization.quantize(v, bits, G, "token", jnp.bfloat16)
    return quantization.pack(kc, bits, G), ks, kz, quantization.pack(vc, bits, G), vs, vz
  return make(key)


def make_fn(kernels, sw, vw, n, lo, kw):
  dm._scores_kernel, dm._values_kernel = kernels
  raw = dm.mha_decode_partials.__wrapped__
  part = jax.jit(functools.partial(raw, score_warps=sw, value_warps=vw, interpret=SMOKE, **kw))
  fn = jax.jit(lambda q, *a: da.merge_partials(*part(q, *a, n, lo)))
  return fn


variants = [("product", (orig_s, orig_v), 8, 4), ("scores_folded", (scores_folded, orig_v), 8, 4),
            ("scores_folded", (scores_folded, orig_v), 4, 4),
            ("values_split", (orig_s, values_split), 8, 4), ("values_split", (orig_s, values_split), 8, 2),
            ("both", (scores_folded, values_split), 8, 4), ("product", (orig_s, orig_v), 8, 4)]
shapes = [(2, 2, 1024)] if SMOKE else [(32, 32, 1536), (256, 32, 1536), (1, 32, 131072)]
key = jax.random.key(0)
d = 128
for (b, h, L) in shapes:
  base = 2 * b * L * h * d * 2
  q1 = [jax.random.normal(jax.random.fold_in(key, c), (b, h, 1, d), jnp.bfloat16) for c in range(4)]
  if not SMOKE:
    kvs = [(jax.random.normal(jax.random.fold_in(key, 10 + c), (b, L, h, d), jnp.bfloat16),
            jax.random.normal(jax.random.fold_in(key, 20 + c), (b, L, h, d), jnp.bfloat16))
           for c in range(max(1, min(4, -(-512 * 2**20 // base))))]
    cudnn = jax.jit(functools.partial(jax.nn.dot_product_attention, implementation="cudnn"))
    ms = bench._time(cudnn, [(q.reshape(b, 1, h, d), k, v) for q, (k, v) in zip(q1, kvs)], 20)
    del kvs
    row0 = dict(B=b, H=h, L=L, method="cudnn_bf16", ms=ms, tbps=base / ms / 1e9)
    res["rows"].append(row0); print(row0, flush=True)
  for bits in (2, 4):
    blk = block(jax.random.fold_in(key, 99), b, h, L, d, bits)
    kb = sum(x.size * x.dtype.itemsize for x in blk)
    nc = max(1, min(4, -(-512 * 2**20 // kb)))
    blks = [blk] + [block(jax.random.fold_in(key, 99 + c), b, h, L, d, bits) for c in range(1, nc)]
    n = jnp.full((b,), L - 64, jnp.int32); lo = jnp.zeros((b,), jnp.int32)
    kw = dict(k_bits=bits, v_bits=bits, group_size=G)
    ins = [(q1[i % 4], *blks[i % nc]) for i in range(max(nc, 4))]
    o_ref = None
    if b * h * L <= 32 * 32 * 1536:
      o_ref = np.asarray(da.quantized_decode_attention_reference(ins[0][0], *ins[0][1:], n, lo, **kw)[0], np.float32)
    for name, kernels, sw, vw in variants:
      r = dict(B=b, H=h, L=L, bits=bits, variant=name, score_warps=sw, value_warps=vw)
      try:
        fn = make_fn(kernels, sw, vw, n, lo, kw)
        r["ms"] = bench._time(fn, ins, 3 if SMOKE else 20)
        r["tbps"] = kb / r["ms"] / 1e9
        if not SMOKE:
          r["vs_cudnn"] = row0["ms"] / r["ms"]
        if o_ref is not None:
          o = np.asarray(fn(*ins[0])[0], np.float32)
          r["err_vs_f32_ref"] = float(np.abs(o - o_ref).max() / np.abs(o_ref).max())
      except Exception as e:
        r["error"] = repr(e)[-600:]
      res["rows"].append(r); print(r, flush=True)
    del blks, ins
  json.dump(res, open(os.path.join(OUT, "mha_var2.json"), "w"), indent=1)
print("done", flush=True)
