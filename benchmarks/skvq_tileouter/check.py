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
