"""SKVQ's hidden-layout kernels as `generate` calls them (`cache_attention`), Llama-2-7B
heads, B rows, L tokens, three calls (ncu_sass.sh profiles one): ncu_target.py B L."""
import sys
import jax
import jax.numpy as jnp
sys.path.insert(0, "scripts")
from gpu_skvq_decode import SKVQ, random_layer
from kivi_jax.attention import cache_attention

b, length = int(sys.argv[1]), int(sys.argv[2])
hq = hkv = 32
d = 128
key = jax.random.key(0)
layer, lens = random_layer(key, SKVQ, b, hkv, length - 1, d, jnp.bfloat16)
inv_freq = 1.0 / 10000.0 ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d)
step = jax.jit(lambda q, lay, kn, vn, ln: cache_attention(
    q, lay, kn, vn, ln, jnp.ones_like(ln), SKVQ, None, "gpu", inv_freq))
ks = jax.random.split(key, 3)
args = (jax.random.normal(ks[0], (b, 1, hq, d), jnp.bfloat16), layer,
        jax.random.normal(ks[1], (b, hkv, 1, d), jnp.bfloat16),
        jax.random.normal(ks[2], (b, hkv, 1, d), jnp.bfloat16), lens)
for _ in range(3):
  jax.block_until_ready(step(*args))
print("done", flush=True)
