"""One launch of the shared-buffer one-stage kernel at 32k (64 splits), for ncu:
`ncu --launch-skip 2 --launch-count 1 ... python prof7.py [k_only]`."""
import os, sys
sys.path.insert(0, os.path.dirname(__file__))
import numpy as np, jax, jax.numpy as jnp
import k4

B, K, L, C = 8, 8, 32768, 33280
rng = np.random.default_rng(0)
args = (jnp.asarray(rng.normal(size=(B, K, 16, 128)), jnp.bfloat16),
        jnp.asarray(rng.integers(0, 2**32, (B, K, C // 16, 128), dtype=np.uint32)),
        jnp.asarray(rng.uniform(0.1, 1, (B, K, C // 32, 128)), jnp.bfloat16),
        jnp.asarray(rng.uniform(-1, 1, (B, K, C // 32, 128)), jnp.bfloat16),
        jnp.asarray(rng.integers(0, 2**32, (B, K, C // 16, 128), dtype=np.uint32)),
        jnp.asarray(rng.uniform(0.1, 1, (B, K, 4, C)), jnp.bfloat16),
        jnp.asarray(rng.uniform(-1, 1, (B, K, 4, C)), jnp.bfloat16),
        jnp.asarray(np.full((B,), L - 128), jnp.int32))
f = jax.jit(k4.build(B, K, C, 64, shared_dq=True, stages=1, k_only=sys.argv[1:] == ["k_only"]))
for _ in range(3):
  jax.block_until_ready(f(*args))
