"""Constants and packing facts the kernels share (kernels do not import kivi_jax)."""

# A finite "minus infinity" for masked scores and empty running maxima, so that
# splits and programs that see no key merge without NaN (JAX's own decode
# attention uses 0.7 * the float32 minimum for the same reason).
MASK_VALUE = -1e30


def codes_per_word(bits: float) -> int:
  """As `kivi_jax.config.codes_per_word`: `bits`-bit codes per uint32 word
  (ternary: 5 base-3 digits per byte)."""
  return 20 if bits == 1.5 else 32 // bits


def levels(bits: float) -> int:
  """As `kivi_jax.config.levels`: the largest code, `2^bits - 1` (ternary: 2)."""
  return 2 if bits == 1.5 else 2**bits - 1
