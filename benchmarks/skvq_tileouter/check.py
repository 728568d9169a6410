"""SKVQ scores kernel with tiles outer, groups inner (exp/skvq-tileouter): interpret-mode
checks of the variant through tests/test_decode_attention.py's _check_hidden_kernels.
Run from the repository root: python benchmarks/skvq_tileouter/check.py"""
import sys, itertools
sys.path.insert(0, "benchmarks/skvq_tileouter"); sys.path.insert(0, "."); sys.path.insert(0, "tests")
import hidden_tileouter
from tests import test_decode_attention as t
t.da_hidden = hidden_tileouter
n = 0
for (hidden, ng, tile, vt, vs, ch), (kb, vb, g), rope in itertools.product(
    [(64, 3, None, 1, None, None), (192, 12, None, 1, 2, 3), (256, 5, 32, 2, 5, 1), (128, 40, 16, 4, 1, 4)],
    [(2, 2, 16), (2, 1.5, 32), (4, 4, 128)], [False, True]):
  t._check_hidden_kernels(kb, vb, g, hidden, ng, tile, vt, vs, ch, rope); n += 1
for rope in (False, True):
  t._check_hidden_kernels(2, 2, 16, 128, 40, 16, 4, 1, 4, rope, fast_rope=False); n += 1
print("passed", n)
# Lowered for CUDA on a CPU (jax 0.10.2), as the product's lowering test does: the
# variant's first version (a cond whose branches returned the loop's carry) failed here.
import functools
import jax
import jax.numpy as jnp
for rope, off in ((False, 0), (True, 0), (True, 400_000)):
  args = t._hidden_inputs(0, 2, 192, 12, 16, 2, 2, jnp.bfloat16, rope=rope)
  f = jax.jit(functools.partial(hidden_tileouter.hidden_decode_attention.__wrapped__, k_bits=2,
                                v_bits=2, group_size=16, head_dim=64, rep=3, sm_scale=0.125,
                                pos_offset=off))
  text = f.trace(*args[:11], jnp.arange(192), *args[11:]).lower(
      lowering_platforms=("cuda",)).as_text()
  assert "skvq_decode_scores" in text
  assert ("sin.approx.f32" in text) == (rope and off < 400_000)
print("lowered for CUDA: 3 cases")
