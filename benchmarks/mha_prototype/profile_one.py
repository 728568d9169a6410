import sys
import jax, jax.numpy as jnp
from kivi_jax import quantization
from kivi_jax.pallas_kernels import decode_attention as da
import kernel as mha
which = sys.argv[1]
b, h, L, d, G, bits = 32, 32, 1536, 128, 32, 2
k = jax.random.normal(jax.random.key(1), (b, h, L, d), jnp.bfloat16)
v = jax.random.normal(jax.random.key(2), (b, h, L, d), jnp.bfloat16)
kc, ks, kz = quantization.quantize(k, bits, G, "channel", jnp.bfloat16)
vc, vs, vz = quantization.quantize(v, bits, G, "token", jnp.bfloat16)
blk = (quantization.pack(kc, bits, G), ks, kz, quantization.pack(vc, bits, G), vs, vz)
n = jnp.full((b,), L, jnp.int32); lo = jnp.zeros_like(n)
kw = dict(k_bits=bits, v_bits=bits, group_size=G)
for _ in range(3):
  if which == "main":
    q = jax.random.normal(jax.random.key(0), (b, h, 16, d), jnp.bfloat16)
    jax.block_until_ready(da.quantized_decode_partials(q, *blk, n, lo, **kw))
  else:
    q = jax.random.normal(jax.random.key(0), (b, h, 1, d), jnp.bfloat16)
    jax.block_until_ready(mha.mha_decode_partials(q, *blk, n, lo, **kw, hold=False, lazy=True, num_warps=4))
