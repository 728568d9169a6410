"""Checks for kernel.py against exact attention in float64 (`prototype_inputs`).

`python benchmarks/magic_prototype/check.py` runs the kernel in interpret mode on
the CPU (jnp ops in place of the inline PTX).
"""
import os
import sys

import jax

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
import kernel  # noqa: E402
from prototype_inputs import exact, main_args, make, rel  # noqa: E402
from kivi_jax.pallas_kernels import decode_attention as da  # noqa: E402


def prototype_args(x, n_valid):
  """main_args without the query's padding rows and the window starts."""
  q, *rest, n, _ = main_args(x, n_valid)
  return (q[:, :, :kernel.H], *rest, n)


def check(asm: bool, interpret: bool, B=2, K=2, C=2048, n_valid=(2048, 992), splits=2,
          **opts):
  """The prototype and main's kernel against exact attention."""
  x = make(B, K, C)
  got = da.merge_partials(*kernel.partials(*prototype_args(x, n_valid), splits=splits,
                                           asm=asm, interpret=interpret, **opts))[0]
  main = da.merge_partials(*da.quantized_decode_partials(
      *main_args(x, n_valid), k_bits=2, v_bits=2, group_size=kernel.G,
      interpret=interpret))[0]
  want = exact(x, n_valid)
  return {"vs_exact": rel(got, want), "main_vs_exact": rel(main[:, :, :kernel.H], want)}


if __name__ == "__main__":
  jax.config.update("jax_platforms", "cpu")
  print(check(asm=False, interpret=True, C=1024, n_valid=(1024, 480)))
  print(check(asm=False, interpret=True, C=1024, n_valid=(1000, 33), splits=1))
