"""PTX's `sin.approx.f32` and `cos.approx.f32` (`decode_attention_hidden._ptx`)
compiled in a Pallas kernel, against float64 on every float32 `x` with
`2^-4 <= |x| <= pi + 0.004` (the range of `_reduce`'s angles; below 2^-4 the
results are near x and 1): the largest absolute error on [-pi, pi], where PTX's
documentation bounds it by 2^-20.9, and on the whole range. A GPU only (inline
PTX has no interpret mode). Writes JSON with device, jax version, date and
commit (`benchmarks/results/ptx_sincos_error_h100.json`).

  python scripts/ptx_sincos_error.py --out F
"""

import argparse
import json

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

from kivi_jax.cli import run_metadata
from kivi_jax.pallas_kernels import decode_attention_hidden as da_hidden


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--out", required=True)
  args = parser.parse_args()
  if jax.default_backend() != "gpu":
    raise SystemExit("PTX runs on an NVIDIA GPU: jax sees none here")
  hi = np.float32(np.pi + 0.004)
  a = np.arange(np.float32(2**-4).view(np.int32), hi.view(np.int32) + 1,
                dtype=np.int32).view(np.float32)
  x = np.concatenate([a, -a])
  x = np.pad(x, (0, -len(x) % 8192)).reshape(-1, 1024)

  def kernel(x_ref, sin_ref, cos_ref):
    sin_ref[...] = da_hidden._ptx("sin", x_ref[...])
    cos_ref[...] = da_hidden._ptx("cos", x_ref[...])

  spec = pl.BlockSpec((8, 1024), lambda i: (i, 0))
  out = jax.ShapeDtypeStruct(x.shape, jnp.float32)
  sin, cos = pl.pallas_call(kernel, grid=(len(x) // 8,), in_specs=[spec],
                            out_specs=[spec, spec], out_shape=[out, out])(jnp.asarray(x))
  x64 = x.astype(np.float64)
  inside = np.abs(x64) <= np.pi
  result = {**run_metadata(), "device": jax.devices()[0].device_kind, "floats": int(a.size * 2)}
  for name, y, exact in (("sin", sin, np.sin), ("cos", cos, np.cos)):
    err = np.abs(np.asarray(y, np.float64) - exact(x64))
    result[name] = {"max_error_within_pi": float(err[inside].max()),
                    "log2": float(np.log2(err[inside].max())),
                    "max_error": float(err.max()), "at": float(x64.flat[np.argmax(err)])}
  print(json.dumps(result, indent=1))
  with open(args.out, "w") as f:
    json.dump(result, f, indent=1)


if __name__ == "__main__":
  main()
