"""On the GPU: the decode kernel compiled for real against the jnp reference, in
bf16, then the block kernel alone over a sweep of launch parameters."""

import time

import jax
import jax.numpy as jnp

from kivi_jax import bench
from kivi_jax.cache import n_quantized
from kivi_jax.config import KIVIConfig
from kivi_jax.pallas_kernels import decode_attention as da


def check(config, b, hkv, rep, d, length):
  layer, lens = bench._kivi_layer(jax.random.key(1), config, b, hkv, length, d, jnp.bfloat16)
  nq = n_quantized(lens, config)
  m = max(16, 1 << (rep - 1).bit_length())
  q = jax.random.normal(jax.random.key(2), (b, hkv, m, d), jnp.bfloat16)
  args = (q, layer.k.codes, layer.k.scale, layer.k.zero, layer.v.codes, layer.v.scale,
          layer.v.zero, nq, jnp.zeros_like(nq))
  kw = dict(k_bits=config.k_bits, v_bits=config.v_bits, group_size=config.group_size)
  o, lse = da.quantized_decode_attention(*args, **kw)
  o_ref, lse_ref = da.quantized_decode_attention_reference(*args, **kw)
  rel = float(jnp.linalg.norm(o - o_ref) / jnp.linalg.norm(o_ref))
  return rel, float(jnp.abs(lse - lse_ref).max())


t0 = time.time()
for cfg in [KIVIConfig(2, 2, 32, 128), KIVIConfig(4, 4, 32, 128), KIVIConfig(8, 2, 64, 128),
            KIVIConfig(2, 4, 128, 128)]:
  for (b, hkv, rep, d, length) in [(3, 2, 7, 128, 5000), (1, 8, 4, 64, 20000)]:
    if d % cfg.group_size:
      continue
    rel, dl = check(cfg, b, hkv, rep, d, length)
    print(f"check k{cfg.k_bits}v{cfg.v_bits} g{cfg.group_size} b{b} rep{rep} d{d} "
          f"L{length}: rel {rel:.2e} lse {dl:.2e} ({time.time() - t0:.0f}s)", flush=True)

# Block kernel alone, Llama-3-8B heads, B=8: launch parameters around the defaults.
for length in (32768, 131072):
  for name, cfg in (("kivi2", KIVIConfig(2, 2, 32, 128)), ("kivi4", KIVIConfig(4, 4, 32, 128))):
    layer, lens = bench._kivi_layer(jax.random.key(1), cfg, 8, 8, length, 128, jnp.bfloat16)
    nq = lens - 128
    q = jax.random.normal(jax.random.key(2), (8, 8, 16, 128), jnp.bfloat16)
    args = (q, layer.k.codes, layer.k.scale, layer.k.zero, layer.v.codes, layer.v.scale,
            layer.v.zero, nq, jnp.zeros_like(nq))
    nbytes = bench._kivi_bytes(layer, cfg, length, 8, 8, 128)
    for splits in (None, 32, 64):
      for warps in (1, 2):
        for stages in (2, 4):
          f = jax.jit(lambda *a, sp=splits, w=warps, st=stages: da.quantized_decode_attention(
              *a, k_bits=cfg.k_bits, v_bits=cfg.v_bits, group_size=32, splits=sp,
              num_warps=w, num_stages=st))
          try:
            ms = bench._time(f, [args], 20)
          except Exception as e:  # a launch configuration the compiler refuses
            print(f"{name} L{length} splits{splits} warps{warps} stages{stages}: "
                  f"{type(e).__name__}")
            continue
          print(f"{name} L{length} splits{splits} warps{warps} stages{stages}: {ms:.3f} ms "
                f"{nbytes / ms / 1e9:.2f} TB/s", flush=True)
