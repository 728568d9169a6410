"""Cache-quantization configuration and the registry of named methods.

`KIVIConfig` is static configuration: frozen and hashable, so it can be a `jit`
static argument and a static field of the cache pytree. Every bad value raises a
`ValueError` that names the field and the values it accepts.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

ALLOWED_BITS = (2, 4, 8, 16)
"""Bit widths of a cached tensor; 16 means "not quantized, kept in the model dtype"."""

QuantAxis = Literal["channel", "token"]
_AXES = ("channel", "token")


def codes_per_word(bits: int) -> int:
  """How many `bits`-bit codes one 32-bit storage word holds."""
  return 32 // bits


def channel_group(group_size: int, head_dim: int) -> int:
  """Channels per group of a per-token-quantized tensor: `G`, or the whole head
  where `G` exceeds it."""
  return min(group_size, head_dim)


@dataclasses.dataclass(frozen=True)
class KIVIConfig:
  """How the KV cache quantizes keys and values (SPEC.md, "KIVI axes").

  Attributes:
    k_bits: bits per key code, one of 2, 4, 8, or 16 (keys stay in the model dtype).
    v_bits: bits per value code, same choices.
    group_size: `G`, how many elements share one scale and zero point. Keys
      quantized per channel group `G` consecutive tokens; values quantized per
      token group `G` consecutive channels (so `G` must divide the head dim), or
      all channels of the head where `G` exceeds the head dim.
    residual_length: `R`, the full-precision ring: the most recent `R - G + 1`
      to `R` tokens are never quantized. A multiple of `group_size`; 0 keeps
      only the group still being filled (0 to `G - 1` tokens) in full
      precision, the least per-channel keys allow (they are quantized a whole
      group of tokens at a time).
    key_axis: "channel" (KIVI) or "token" (the ablation that fails at 2 bits).
    value_axis: "token" (KIVI) or "channel".
    clip: SKVQ's clipped dynamic quantization, in (0, 1]: each group's min and
      max are multiplied by `clip` before its scale and zero are computed
      (SPEC.md, "SKVQ"); 1 (KIVI) quantizes the full range.
  """

  k_bits: int = 2
  v_bits: int = 2
  group_size: int = 32
  residual_length: int = 128
  key_axis: QuantAxis = "channel"
  value_axis: QuantAxis = "token"
  clip: float = 1.0

  def __post_init__(self):
    for name in ("k_bits", "v_bits"):
      bits = getattr(self, name)
      if isinstance(bits, bool) or bits not in ALLOWED_BITS:
        raise ValueError(f"{name} must be one of {ALLOWED_BITS}, got {bits!r}")
    g = self.group_size
    if isinstance(g, bool) or not isinstance(g, int) or g <= 0:
      raise ValueError(f"group_size must be a positive integer, got {g!r}")
    # Codes are packed along the token axis, so a flushed group of G tokens must
    # fill whole 32-bit words.
    for name in ("k_bits", "v_bits"):
      bits = getattr(self, name)
      if bits < 16 and g % codes_per_word(bits):
        raise ValueError(
            f"group_size must be a multiple of {codes_per_word(bits)} (the number "
            f"of {bits}-bit codes in a 32-bit word, from {name}={bits}), got {g}"
        )
    r = self.residual_length
    if isinstance(r, bool) or not isinstance(r, int) or r < 0 or r % g:
      raise ValueError(
          "residual_length must be 0 or a positive multiple of group_size "
          f"({g}), got {r!r}"
      )
    for name in ("key_axis", "value_axis"):
      if getattr(self, name) not in _AXES:
        raise ValueError(f"{name} must be one of {_AXES}, got {getattr(self, name)!r}")
    c = self.clip
    if isinstance(c, bool) or not isinstance(c, (int, float)) or not 0 < c <= 1:
      raise ValueError(f"clip must be a number in (0, 1], got {c!r}")

  @property
  def ring_size(self) -> int:
    """Slots of the full-precision ring: `R`, or `G` when `R = 0`."""
    return self.residual_length or self.group_size

  @property
  def quantizes_keys(self) -> bool:
    return self.k_bits < 16

  @property
  def quantizes_values(self) -> bool:
    return self.v_bits < 16

  def check_head_dim(self, head_dim: int) -> None:
    """Raises if a per-token-quantized tensor cannot be grouped over `head_dim`."""
    for name, bits, axis in (
        ("values", self.v_bits, self.value_axis),
        ("keys", self.k_bits, self.key_axis),
    ):
      g = self.group_size
      if bits < 16 and axis == "token" and g < head_dim and head_dim % g:
        raise ValueError(
            f"group_size={g} must divide the head dim ({head_dim}): {name} are "
            "quantized per token in groups of group_size channels (or of the "
            "whole head where group_size exceeds it)"
        )

  def bits_per_element(self, scale_bits: int, head_dim: int | None = None
                       ) -> tuple[float, float]:
    """Bits per key and per value element in the quantized block (SPEC.md).

    A per-token group spans `min(group_size, head_dim)` channels; without
    `head_dim`, `group_size`.
    """
    def one(bits, axis):
      if bits == 16:
        return float(bits)
      g = self.group_size
      if axis == "token" and head_dim is not None:
        g = channel_group(g, head_dim)
      return bits + 2 * scale_bits / g
    return one(self.k_bits, self.key_axis), one(self.v_bits, self.value_axis)


PRESETS: dict[str, KIVIConfig] = {
    "fp16": KIVIConfig(k_bits=16, v_bits=16),
    "kivi8": KIVIConfig(k_bits=8, v_bits=8, group_size=32, residual_length=128),
    "kivi4": KIVIConfig(k_bits=4, v_bits=4, group_size=32, residual_length=128),
    "kivi2": KIVIConfig(k_bits=2, v_bits=2, group_size=32, residual_length=128),
    "kivi2-g64": KIVIConfig(k_bits=2, v_bits=2, group_size=64, residual_length=128),
    "kivi2-g128": KIVIConfig(k_bits=2, v_bits=2, group_size=128, residual_length=128),
    "kivi2-r32": KIVIConfig(k_bits=2, v_bits=2, group_size=32, residual_length=32),
    "kivi2-r0": KIVIConfig(k_bits=2, v_bits=2, group_size=32, residual_length=0),
    # KIVI's bits with the axes swapped: the ablation of SPEC.md "KIVI axes".
    "kivi2-per-token-keys": KIVIConfig(
        k_bits=2, v_bits=2, group_size=32, residual_length=128,
        key_axis="token", value_axis="channel"),
}
"""Named cache methods; the CLI and the evals select from this one registry.
"fp16" keeps the cache in the model's own dtype (float32, bfloat16 or float16)."""


def get_preset(name: str) -> KIVIConfig:
  try:
    return PRESETS[name]
  except KeyError:
    raise ValueError(
        f"unknown cache method {name!r}; known methods: {', '.join(PRESETS)}"
    ) from None
