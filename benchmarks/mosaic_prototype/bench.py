"""The prototype's versions on a GPU, main's Triton kernel beside them in the same run.

  python benchmarks/mosaic_prototype/bench.py           # checks, then every version
  python benchmarks/mosaic_prototype/bench.py only A,B  # the same for these versions
  python benchmarks/mosaic_prototype/bench.py ncu NAME  # three launches of one, for ncu

(from the repository root, `PYTHONPATH=$PWD`, `KIVI_JAX_COMMIT=<commit>` on the GPU
machine; JSON to $OUT/mosaic_decode.json).
P1's shape: B=8, Hq=32 (16 padded query rows per kv head), Hkv=8, d=128, bf16, KIVI-2
with group 32, 128 tokens in the ring, random codes. Times are the block kernel alone
(per-split partials, no merge), median of 30 batches of 10 calls after 3 warm-up
calls; the transpose of the value scales the prototype reads is timed apart;
cuDNN's flash attention on a bf16 cache of L tokens (B=8, Hq=32, Hkv=8) is the baseline.
"""
import functools
import json
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
import kernel  # noqa: E402
import reference  # noqa: E402
from kernel import Options  # noqa: E402
from kivi_jax import quantization  # noqa: E402
from kivi_jax.cli import run_metadata  # noqa: E402
from kivi_jax.pallas_kernels import decode_attention as da  # noqa: E402

B, K = 8, 8
CAPACITY = {32768: 33280, 131072: 131584}  # bench._kivi_layer's block capacity
SHARED = dict(shared_dq=True, stages=1)  # 2 blocks per SM
# Keys and values in the pair layout, the softmax sum deferred; with two stages and
# a softmax update per 256 tokens; with Pallas's barriers off and ex2.approx.
PAIRS = dict(defer_sum=True, keys_pairs=True, values_pairs=True)
PAIRS4 = dict(**PAIRS, stages=2, chunk=4)
FAST = dict(**PAIRS4, manual_barriers=True, approx_math=True)
# name -> (L, splits, options)
VERSIONS = {
    "unrolled": (32768, 16, Options(unrolled=True)),
    "unrolled_keys_only": (32768, 16, Options(unrolled=True, keys_only=True)),
    "unrolled_const_scales": (32768, 16, Options(unrolled=True, const_scales=True)),
    "loop": (32768, 16, Options()),
    "loop_keys_only": (32768, 16, Options(keys_only=True)),
    "loop_const_scales": (32768, 16, Options(const_scales=True)),
    "shared_s16": (32768, 16, Options(**SHARED)),
    "shared_s32": (32768, 32, Options(**SHARED)),
    "shared": (32768, 64, Options(**SHARED)),
    "shared_magic": (32768, 64, Options(**SHARED, magic=True)),
    "shared_prealign": (32768, 64, Options(**SHARED, prealign=True)),
    "shared_magic_prealign": (32768, 64, Options(**SHARED, magic=True, prealign=True)),
    "shared_magic_prealign_const_scales": (
        32768, 64, Options(**SHARED, magic=True, prealign=True, const_scales=True)),
    "shared_magic_prealign_keys_only": (
        32768, 64, Options(**SHARED, magic=True, prealign=True, keys_only=True)),
    "shared_chunk2": (32768, 64, Options(**SHARED, chunk=2)),
    "shared_chunk4": (32768, 64, Options(**SHARED, chunk=4)),
    "shared_chunk8": (32768, 64, Options(**SHARED, chunk=8)),
    "shared_chunk2_defer": (32768, 64, Options(**SHARED, chunk=2, defer_sum=True)),
    "shared_chunk4_defer": (32768, 64, Options(**SHARED, chunk=4, defer_sum=True)),
    "shared_chunk8_defer": (32768, 64, Options(**SHARED, chunk=8, defer_sum=True)),
    "shared_reload": (32768, 64, Options(**SHARED, reload_words=True)),
    "shared_swizzled": (32768, 64, Options(**SHARED, swizzle_words=True)),
    "shared_swizzled_reload": (
        32768, 64, Options(**SHARED, swizzle_words=True, reload_words=True)),
    "128k_unrolled": (131072, 64, Options(unrolled=True)),
    "128k_shared": (131072, 64, Options(**SHARED)),
    "128k_shared_s128": (131072, 128, Options(**SHARED)),
    "128k_shared_chunk2_defer": (131072, 64, Options(**SHARED, chunk=2, defer_sum=True)),
    "128k_shared_swizzled": (131072, 64, Options(**SHARED, swizzle_words=True)),
    # NOTES.md "BitDecoding, read": keys as wgmma's A operand from registers.
    "shared_keys_regs": (32768, 64, Options(**SHARED, keys_in_registers=True)),
    "shared_magic_prealign_keys_regs": (
        32768, 64, Options(**SHARED, magic=True, prealign=True, keys_in_registers=True)),
    "shared_magic_prealign_keys_regs_keys_only": (
        32768, 64, Options(**SHARED, magic=True, prealign=True, keys_in_registers=True,
                           keys_only=True)),
    "128k_shared_keys_regs": (131072, 64, Options(**SHARED, keys_in_registers=True)),
    # ... and values too (their words passed channel-major).
    "shared_kv_regs": (32768, 64, Options(**SHARED, keys_in_registers=True,
                                          values_in_registers=True)),
    "shared_magic_prealign_kv_regs": (
        32768, 64, Options(**SHARED, magic=True, prealign=True, keys_in_registers=True,
                           values_in_registers=True)),
    "128k_shared_kv_regs": (131072, 64, Options(**SHARED, keys_in_registers=True,
                                                values_in_registers=True)),
    # Keys in the pair layout (kernel.key_pair_words), dequantized as bf16 pairs.
    "shared_kp": (32768, 64, Options(**SHARED, keys_pairs=True)),
    "shared_kp_keys_only": (32768, 64, Options(**SHARED, keys_pairs=True, keys_only=True)),
    "128k_shared_kp": (131072, 64, Options(**SHARED, keys_pairs=True)),
    "shared_kp_vp": (32768, 64, Options(**SHARED, chunk=2, keys_pairs=True,
                                        values_pairs=True)),
    "shared_kp_vp_defer": (32768, 64, Options(**SHARED, chunk=2, defer_sum=True,
                                              keys_pairs=True, values_pairs=True)),
    "shared2_kp_vp": (32768, 64, Options(stages=2, chunk=2, keys_pairs=True,
                                         values_pairs=True)),
    "shared_kp_vp_defer_s32": (32768, 32, Options(**SHARED, chunk=2, defer_sum=True,
                                                  keys_pairs=True, values_pairs=True)),
    "shared_kp_vp_defer_s128": (32768, 128, Options(**SHARED, chunk=2, defer_sum=True,
                                                    keys_pairs=True, values_pairs=True)),
    "128k_shared_kp_vp_defer": (131072, 64, Options(**SHARED, chunk=2, defer_sum=True,
                                                    keys_pairs=True, values_pairs=True)),
    "128k_shared_kp_vp_defer_s128": (131072, 128, Options(
        **SHARED, chunk=2, defer_sum=True, keys_pairs=True, values_pairs=True)),
    # No dequantized tile in shared memory: two stages (prefetch) fit two blocks an SM.
    "kp_vp_defer_st2": (32768, 64, Options(stages=2, chunk=2, defer_sum=True,
                                           keys_pairs=True, values_pairs=True)),
    "128k_kp_vp_defer_st2": (131072, 64, Options(stages=2, chunk=2, defer_sum=True,
                                                 keys_pairs=True, values_pairs=True)),
    # One softmax update (one cross-warp maximum) per 256 tokens, not 128.
    "kp_vp_chunk4_defer_st2": (32768, 64, Options(stages=2, chunk=4, defer_sum=True,
                                                  keys_pairs=True, values_pairs=True)),
    "shared_kp_vp_chunk4_defer": (32768, 64, Options(**SHARED, chunk=4, defer_sum=True,
                                                     keys_pairs=True, values_pairs=True)),
    # The eighth round's profile (NOTES.md): 15% of warp stalls at barriers, 53 a
    # step that Pallas inserts; and the exponentials' range reduction.
    "kp_vp_chunk8_defer_st2": (32768, 64, Options(**PAIRS, stages=2, chunk=8)),
    "kp_vp_chunk4_defer_st2_mb": (32768, 64, Options(**PAIRS4, manual_barriers=True)),
    "kp_vp_chunk4_defer_st2_approx": (32768, 64, Options(**PAIRS4, approx_math=True)),
    "kp_vp_chunk4_defer_st2_mb_approx": (32768, 64, Options(**FAST)),
    "kp_vp_chunk4_defer_st3_mb_approx": (32768, 64, Options(**{**FAST, "stages": 3})),
    "128k_kp_vp_chunk4_defer_st2_mb_approx": (131072, 64, Options(**FAST)),
    # Split counts that leave no split idle.
    "kp_vp_chunk4_mb_approx_s65": (32768, 65, Options(**FAST)),
    "kp_vp_chunk4_mb_approx_s22": (32768, 22, Options(**FAST)),
    "128k_kp_vp_chunk4_mb_approx_s86": (131072, 86, Options(**FAST)),
    # Scores and softmax over 8 query rows (GQA up to 8), P^T padded to 16.
    "kp_vp_chunk4_mb_approx_rows8": (32768, 64, Options(**FAST, rows8=True)),
    "kp_vp_chunk4_mb_approx_rows8_s65": (32768, 65, Options(**FAST, rows8=True)),
    "128k_kp_vp_chunk4_mb_approx_rows8": (131072, 64, Options(**FAST, rows8=True)),
    "128k_shared_kp_vp": (131072, 64, Options(**SHARED, chunk=2, keys_pairs=True,
                                              values_pairs=True)),
}
TIMING_ONLY = ("keys_only", "const_scales")


def med(fn, args, reps=30):
  for _ in range(3):
    jax.block_until_ready(fn(*args))
  ts = []
  for _ in range(reps):
    t0 = time.perf_counter()
    for _ in range(10):
      out = fn(*args)
    jax.block_until_ready(out)
    ts.append((time.perf_counter() - t0) / 10 * 1e3)
  return statistics.median(ts)


def inputs(L):
  """Cache arrays in the layout of main's kernel (value scales [B, K, C, D/G])."""
  C = CAPACITY[L]
  rng = np.random.default_rng(0)
  return (jnp.asarray(rng.normal(size=(B, K, kernel.N, kernel.D)), jnp.bfloat16),
          jnp.asarray(rng.integers(0, 2**32, (B, K, C // kernel.W, kernel.D), np.uint32)),
          jnp.asarray(rng.uniform(0.1, 1, (B, K, C // kernel.G, kernel.D)), jnp.bfloat16),
          jnp.asarray(rng.uniform(-1, 1, (B, K, C // kernel.G, kernel.D)), jnp.bfloat16),
          jnp.asarray(rng.integers(0, 2**32, (B, K, C // kernel.W, kernel.D), np.uint32)),
          jnp.asarray(rng.uniform(0.1, 1, (B, K, C, kernel.D // kernel.G)), jnp.bfloat16),
          jnp.asarray(rng.uniform(-1, 1, (B, K, C, kernel.D // kernel.G)), jnp.bfloat16),
          jnp.asarray(np.full((B,), L - 128), jnp.int32))


def transposed(args, opts):
  """The value scales transposed, the value words too for `values_in_registers`,
  the key words in the pair layout for `keys_pairs`, the value words transposed
  in the pair layout for `values_pairs`."""
  kw = args[1]
  if opts.keys_pairs:
    kw = jax.jit(lambda w: kernel.key_pair_words(
        quantization.unpack(w, 2, kernel.G)))(kw)
  vw = jnp.swapaxes(args[4], 2, 3) if opts.values_in_registers else args[4]
  if opts.values_pairs:
    vw = jax.jit(lambda w: kernel.key_pair_words(
        jnp.swapaxes(quantization.unpack(w, 2, kernel.G), 2, 3)))(args[4])
  return (args[0], kw, *args[2:4], vw, jnp.swapaxes(args[5], 2, 3),
          jnp.swapaxes(args[6], 2, 3), args[7])


def main():
  if sys.argv[1:2] == ["ncu"]:
    L, splits, opts = VERSIONS[sys.argv[2]]
    f = jax.jit(kernel.build(B, K, CAPACITY[L], splits, opts))
    margs = transposed(inputs(L), opts)
    for _ in range(3):
      jax.block_until_ready(f(*margs))
    return
  versions = VERSIONS
  if sys.argv[1:2] == ["only"]:
    versions = {name: VERSIONS[name] for name in sys.argv[2].split(",")}
  res = {**run_metadata(), "checks": {},
         "cudnn_bf16_ms": {}, "triton_ms": {}, "transpose_ms": {}, "versions": {}}
  # Compiled checks against float64 numpy: one row with 1000 of 2048 tokens live.
  q, kc, vc, kw, vw, ks, kz, vs, vz = reference.make(2, 2, 2048)
  nv = jnp.asarray([2048, 1000], jnp.int32)
  ref = reference.reference(q, kc, vc, ks, kz, vs, vz, nv, 2)
  for name, (_, _, opts) in versions.items():
    if name.startswith("128k") or any(t in name for t in TIMING_ONLY):
      continue
    f = kernel.build(2, 2, 2048, 2, opts)
    words = np.swapaxes(vw, 2, 3) if opts.values_in_registers else vw
    if opts.values_pairs:
      words = kernel.key_pair_words(np.swapaxes(vc, 2, 3))
    kwords = kernel.key_pair_words(kc) if opts.keys_pairs else kw
    try:
      out = reference.run(f, q, kwords, ks, kz, words, vs, vz, nv, False)
      if opts.rows8:  # the first 8 query rows
        out, want8 = (out[0][..., :8], *out[1:]), tuple(r[..., :8] for r in ref)
      res["checks"][name] = reference.check(out, want8 if opts.rows8 else ref)
    except Exception as e:  # a version that does not compile: recorded, not timed
      res["checks"][name] = {"error": f"{type(e).__name__}: {e}"[:2000]}
      print(name, res["checks"][name], flush=True)
  for L in CAPACITY:
    ks = jax.random.split(jax.random.key(L), 3)
    res["cudnn_bf16_ms"][L] = med(
        jax.jit(functools.partial(jax.nn.dot_product_attention, implementation="cudnn")),
        [jax.random.normal(k, s, jnp.bfloat16) for k, s in
         zip(ks, [(B, 1, 4 * K, kernel.D)] + 2 * [(B, L, K, kernel.D)])])
    args = inputs(L)
    tri = jax.jit(lambda *a: da.quantized_decode_partials(
        *a, jnp.zeros_like(a[-1]), k_bits=2, v_bits=2, group_size=32))
    res["triton_ms"][L] = med(tri, args)
    want = da.merge_partials(*tri(*args))[0]
    res["transpose_ms"][L] = med(jax.jit(lambda vs, vz: (jnp.swapaxes(vs, 2, 3),
                                                         jnp.swapaxes(vz, 2, 3))),
                                 args[5:7])
    print(L, "cudnn", res["cudnn_bf16_ms"][L], "triton", res["triton_ms"][L], "transpose", res["transpose_ms"][L], flush=True)
    for name, (length, splits, opts) in versions.items():
      if length != L or "error" in res["checks"].get(name, {}):
        continue
      f = jax.jit(kernel.build(B, K, CAPACITY[L], splits, opts))
      margs = transposed(args, opts)
      o, m, l = f(*margs)
      rows = m.shape[-1]  # 8 with rows8: compared on those
      got = da.merge_partials(jnp.swapaxes(o, 3, 4)[..., :rows, :], m, l)[0]
      row = {"L": L, "splits": splits, "options": {
          k: v for k, v in vars(opts).items() if v != getattr(Options(), k)},
          "ms": med(f, margs)}
      if not any(t in name for t in TIMING_ONLY):
        w = want[..., :rows, :]
        row["err_vs_triton"] = float(jnp.max(jnp.abs(got - w)) / jnp.max(jnp.abs(w)))
      res["versions"][name] = row
      print(name, row, flush=True)
  out = os.path.join(os.environ.get("OUT", "/tmp"), "mosaic_decode.json")
  json.dump(res, open(out, "w"), indent=1)


if __name__ == "__main__":
  main()
