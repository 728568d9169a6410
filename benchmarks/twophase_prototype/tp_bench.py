import json, os, time, functools
import jax, jax.numpy as jnp, numpy as np
from kivi_jax import quantization, bench
from kivi_jax.pallas_kernels import decode_attention as da
import twophase
print(jax.__version__, jax.devices()[0].device_kind, flush=True)
OUT = os.environ.get("OUT", "/tmp")
SMOKE = jax.default_backend() != "gpu"
res = {"jax": jax.__version__, "device": jax.devices()[0].device_kind,
       "date": time.strftime("%Y-%m-%d"), "rows": []}
res["copy_tbps"] = 0 if SMOKE else bench.copy_bandwidth_tbps()
G = 32
def block(key, b, h, L, d, bits):
  k1, k2 = jax.random.split(key)
  @jax.jit
  def make(k1, k2):
    k = jax.random.normal(k1, (b, h, L, d), jnp.bfloat16)
    v = jax.random.normal(k2, (b, h, L, d), jnp.bfloat16)
    kc, ks, kz = quantization.quantize(k, bits, G, "channel", jnp.bfloat16)
    vc, vs, vz = quantization.quantize(v, bits, G, "token", jnp.bfloat16)
    return quantization.pack(kc, bits, G), ks, kz, quantization.pack(vc, bits, G), vs, vz
  return make(k1, k2)
def nbytes(blk, frac):
  return sum(x.size * x.dtype.itemsize for x in blk) * frac
shapes = [(2, 2, 1024, 960)] if SMOKE else [(32, 32, 1536, 1408), (256, 32, 1536, 1408), (1, 32, 131072, 131008)]
variants = [(4, 4, 0, tr, ns) for tr in (False, True) for ns in (16, 8)] if SMOKE else [(w1, 4, ph, tr, ns) for ph in (0,) for tr in (False, True) for ns in (16, 8, 4) for w1 in ((4, 8) if ns < 16 or tr else (8,))]
key = jax.random.key(0)
for (b, h, L, nv) in shapes:
  d = 128
  base = 2 * b * nv * h * d * 2
  ncopy = max(1, min(4, -(-512 * 2**20 // base)))
  qs = [jax.random.normal(jax.random.fold_in(key, c), (b, 1, h, d), jnp.bfloat16) for c in range(ncopy)]
  if not SMOKE:
    kvs = [(jax.random.normal(jax.random.fold_in(key, 10 + c), (b, nv, h, d), jnp.bfloat16),
            jax.random.normal(jax.random.fold_in(key, 20 + c), (b, nv, h, d), jnp.bfloat16)) for c in range(ncopy)]
    cudnn = jax.jit(functools.partial(jax.nn.dot_product_attention, implementation="cudnn"))
    ms = bench._time(cudnn, [(q, k, v) for q, (k, v) in zip(qs, kvs)], 20)
    del kvs
  else:
    ms = 1.0
  row0 = dict(B=b, H=h, L=nv, method="cudnn_bf16", ms=ms, tbps=base / ms / 1e9)
  res["rows"].append(row0); print(row0, flush=True)
  for bits in (2,):
    blk = block(jax.random.fold_in(key, 99), b, h, L, d, bits)
    kb = nbytes(blk, nv / L)
    nc = int(max(1, min(4, -(-512 * 2**20 // kb))))
    blks = [blk] + [block(jax.random.fold_in(key, 99 + c), b, h, L, d, bits) for c in range(1, nc)]
    n = jnp.full((b,), nv, jnp.int32); lo = jnp.zeros((b,), jnp.int32)
    q1 = [q.reshape(b, h, 1, d) for q in qs]
    q16 = [jnp.pad(q, ((0, 0), (0, 0), (0, 15), (0, 0))) for q in q1]
    kw = dict(k_bits=bits, v_bits=bits, group_size=G)
    main = jax.jit(lambda q, *a: da.quantized_decode_attention(q, *a, n, lo, **kw, interpret=SMOKE))
    ins16 = [(q16[i % len(q16)], *blks[i % nc]) for i in range(max(nc, len(q16)))]
    ms = bench._time(main, ins16, 20)
    o_main = np.asarray(main(*ins16[0])[0][:, :, :1], np.float32)
    r = dict(B=b, H=h, L=nv, bits=bits, method="main", ms=ms, tbps=kb / ms / 1e9, speedup=row0["ms"] / ms)
    res["rows"].append(r); print(r, flush=True)
    ins = [(q1[i % len(q1)], *blks[i % nc]) for i in range(max(nc, len(q1)))]
    ins_d = [(q16[i % len(q16)], *blks[i % nc]) for i in range(max(nc, len(q16)))]
    if b * h * L <= 32 * 32 * 1536:
      o_ref, _ = da.quantized_decode_attention_reference(ins[0][0], *ins[0][1:], n, lo, **kw)
      o_ref = np.asarray(o_ref, np.float32)
    for (w1, w2, ph, tr, ns) in variants:
      dot = False
      try:
        fn = jax.jit(lambda q, *a, w1=w1, w2=w2, ph=ph, tr=tr, ns=ns: twophase.twophase_attention(q, *a, n, lo, **kw, num_warps=w1, warps2=w2, interpret=SMOKE, phase=ph, transpose=tr, nslots=ns))
        use = ins_d if dot else ins
        ms = bench._time(fn, use, 20)
        r = dict(B=b, H=h, L=nv, bits=bits, method="twophase", warps=(w1, w2), phase=ph, transpose=tr, nslots=ns, ms=ms, tbps=kb / ms / 1e9,
                 speedup=row0["ms"] / ms)
        if ph == 0:
          o = np.asarray(fn(*use[0])[0][:, :, :1], np.float32)
          r["vs_main"] = float(np.abs(o - o_main).max() / np.abs(o_main).max())
        if ph == 0 and b * h * L <= 32 * 32 * 1536:
          r["err_vs_f32_ref"] = float(np.abs(o - o_ref).max() / np.abs(o_ref).max())
      except Exception as e:
        r = dict(B=b, L=nv, bits=bits, method="twophase", warps=(w1, w2), phase=ph, error=repr(e)[-600:])
      res["rows"].append(r); print(r, flush=True)
    del blks, ins, ins16
  json.dump(res, open(os.path.join(OUT, "tp_bench.json"), "w"), indent=1)
print("done", flush=True)
