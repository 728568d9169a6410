"""Constants, packing facts, quantization arithmetic and inline PTX the kernels
share (kernels do not import kivi_jax)."""

import jax
import jax.numpy as jnp
from jax.experimental.pallas import triton as pltriton

# A finite "minus infinity" for masked scores and empty running maxima, so that
# splits and programs that see no key merge without NaN (JAX's own decode
# attention uses 0.7 * the float32 minimum for the same reason).
MASK_VALUE = -1e30

# Columns of one span of the pair layout (`kivi_jax.quantization.pair_pack`).
PAIR_SPAN = 128


def codes_per_word(bits: float) -> int:
  """As `kivi_jax.config.codes_per_word`: `bits`-bit codes per uint32 word
  (ternary: 5 base-3 digits per byte)."""
  return 20 if bits == 1.5 else 32 // bits


def levels(bits: float) -> int:
  """As `kivi_jax.config.levels`: the largest code, `2^bits - 1` (ternary: 2)."""
  return 2 if bits == 1.5 else 2**bits - 1


def round_half_even(y):
  """`jnp.round` (nearest integer, ties to even) from floor, which Triton and
  Mosaic have. `y - floor(y)` is exact, so the tie test is too."""
  f = jnp.floor(y)
  frac = y - f
  odd = f - 2.0 * jnp.floor(f * 0.5)
  return jnp.where(frac > 0.5, f + 1.0, jnp.where(frac < 0.5, f, f + odd))


def ptx_f32(instruction: str, *args):
  """PTX's `instruction` (`$0` its float32 result, `$1`... `args`) on each
  element of `args`, float32 broadcast together: inline assembly for Pallas's
  Triton backend, so compiled GPU kernels only."""
  shape = jnp.broadcast_shapes(*(jnp.shape(x) for x in args))
  args = [jnp.broadcast_to(jnp.asarray(x, jnp.float32), shape) for x in args]
  [y] = pltriton.elementwise_inline_asm(
      instruction, args=args, constraints="=f" + ",f" * len(args), pack=1,
      result_shape_dtypes=[jax.ShapeDtypeStruct(shape, jnp.float32)])
  return y


def ieee_divide(a, b):
  """`a / b` (`b` broadcast to `a`'s shape) as IEEE float32 division under XLA.

  XLA rewrites a division by a broadcast into a multiplication by the
  broadcast reciprocal, which rounds the quotient differently near half-steps
  (a code one level off). The barrier keeps the divisor a full array, so XLA
  divides element by element. For the jnp reference and for kernels in
  interpret mode; a compiled kernel divides by its own means."""
  return a / jax.lax.optimization_barrier(jnp.broadcast_to(b, a.shape))


def quantize_tile(x, axis: str, bits: float, clip: float, scale_dtype, divide):
  """Quantizes one group `x` `[G, W]` float32 as `kivi_jax.quantization.quantize`:
  per channel (axis "channel", one scale per column) or per token over the
  tile's columns (axis "token"). `divide(a, b)` must be IEEE float32 division
  (the reference's). Returns `(codes uint32 [G, W], scale, zero)` with scale,
  zero `[1, W]` or `[G, 1]` in `scale_dtype`, rounded before the codes are
  computed (as the reference)."""
  red = 0 if axis == "channel" else 1
  lo = jnp.min(x, axis=red, keepdims=True)
  hi = jnp.max(x, axis=red, keepdims=True)
  if clip != 1:
    spread = hi > lo
    lo, hi = jnp.where(spread, lo * clip, lo), jnp.where(spread, hi * clip, hi)
  top = levels(bits)
  scale = ((hi - lo) * (1.0 / top)).astype(scale_dtype)  # as the reference
  zero = lo.astype(scale_dtype)
  s32, z32 = scale.astype(jnp.float32), zero.astype(jnp.float32)
  safe = jnp.where(s32 > 0, s32, 1.0)
  y = jnp.where(s32 > 0, divide(x - z32, safe), 0.0)
  codes = jnp.clip(round_half_even(y), 0, top).astype(jnp.int32).astype(jnp.uint32)
  return codes, scale, zero
