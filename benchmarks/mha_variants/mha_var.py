"""Variants of the product MHA kernels (pallas_kernels/decode_attention_mha.py):
codes made by the 2^23 magic number (or, bitcast, subtract) instead of an
int-to-float conversion; warps. Block attention (partials + merge) alone."""
import json, os, time, functools
import jax, jax.numpy as jnp, numpy as np
from kivi_jax import quantization, bench
from kivi_jax.pallas_kernels import decode_attention as da
from kivi_jax.pallas_kernels import decode_attention_mha as dm

OUT = os.environ.get("OUT", "/tmp")
SMOKE = jax.default_backend() != "gpu"
res = {"jax": jax.__version__, "device": jax.devices()[0].device_kind,
       "date": time.strftime("%Y-%m-%d"), "commit": os.environ.get("KIVI_JAX_COMMIT"), "rows": []}
if not SMOKE:
  res["copy_tbps"] = bench.copy_bandwidth_tbps()
print(res, flush=True)
G = 32
orig_codes = dm._codes


def magic_codes(words, slot, bits):
  x = ((words >> jnp.uint32(slot * bits)) & jnp.uint32(2**bits - 1)) | jnp.uint32(0x4B000000)
  return jax.lax.bitcast_convert_type(x, jnp.float32) - jnp.float32(8388608.0)


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


def make_fn(codes, sw, vw, n, lo, kw):
  dm._codes = codes
  raw = dm.mha_decode_partials.__wrapped__
  part = jax.jit(functools.partial(raw, score_warps=sw, value_warps=vw, interpret=SMOKE, **kw))
  fn = jax.jit(lambda q, *a: da.merge_partials(*part(q, *a, n, lo)))
  return fn


variants = [("i2f", orig_codes, 8, 4), ("magic", magic_codes, 8, 4), ("magic", magic_codes, 4, 4),
            ("magic", magic_codes, 16, 4), ("magic", magic_codes, 8, 8), ("i2f", orig_codes, 8, 4)]
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
    for name, codes, sw, vw in variants:
      r = dict(B=b, H=h, L=L, bits=bits, variant=name, score_warps=sw, value_warps=vw)
      try:
        fn = make_fn(codes, sw, vw, n, lo, kw)
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
  json.dump(res, open(os.path.join(OUT, "mha_var.json"), "w"), indent=1)
dm._codes = orig_codes
print("done", flush=True)
