"""Cache-quantization configuration and the registry of named methods.

`KIVIConfig` is static configuration: frozen and hashable, so it can be a `jit`
static argument and a static field of the cache pytree. Every bad value raises a
`ValueError` that names the field and the values it accepts.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

ALLOWED_BITS = (1.5, 2, 4, 8, 16)
"""Bit widths of a cached tensor; 16 means "not quantized, kept in the model dtype",
1.5 means ternary codes (SKVQ's 1.5-bit values), stored 5 to a byte."""

SCALE_DTYPES = (None, "float8_e4m3fn")
"""Storage of scales and zeros: None keeps the cache dtype."""

QuantAxis = Literal["channel", "token"]
_AXES = ("channel", "token")

IMPLS = ("auto", "reference", "gpu", "tpu")
"""Values of `KVCache.impl`: which code reads (and, for "gpu", writes) the cache."""


def codes_per_word(bits: float) -> int:
  """How many `bits`-bit codes one 32-bit storage word holds (ternary: 5 per byte)."""
  return 20 if bits == 1.5 else 32 // bits


def levels(bits: float) -> int:
  """Largest code of a `bits`-bit quantizer: `2^bits - 1`, or 2 for ternary."""
  return 2 if bits == 1.5 else 2**bits - 1


def channel_group(group_size: int, head_dim: int) -> int:
  """Channels per group of a per-token-quantized tensor: `G`, or the whole head
  where `G` exceeds it."""
  return min(group_size, head_dim)


@dataclasses.dataclass(frozen=True)
class KIVIConfig:
  """How the KV cache quantizes keys and values (SPEC.md, "KIVI axes" and "SKVQ").

  Attributes:
    k_bits: bits per key code, one of 1.5 (ternary), 2, 4, 8, or 16 (keys stay
      in the model dtype).
    v_bits: bits per value code, same choices.
    group_size: `G`, tokens quantized together: the cache flushes whole groups
      of `G` tokens and packs codes in slots of `G` tokens. Keys quantized per
      channel share a scale over those `G` tokens; a tensor quantized per token
      groups `G` consecutive channels of a head (so `G` must divide the head
      dim), or all channels of the head where `G` exceeds it, unless
      `channel_group` is set.
    residual_length: `R`, the full-precision ring: the most recent `R - G + 1`
      to `R` tokens are never quantized. A multiple of `group_size`; 0 keeps
      only the group still being filled (0 to `G - 1` tokens) in full
      precision, the least per-channel keys allow (they are quantized a whole
      group of tokens at a time).
    key_axis: "channel" (KIVI) or "token" (SKVQ; at 2 bits per head, the
      ablation that fails).
    value_axis: "token" (KIVI, SKVQ) or "channel".
    clip: SKVQ's clipped dynamic quantization: each group's min and max are
      multiplied by a factor in (0, 1] before its scale and zero are computed
      (SPEC.md, "SKVQ"); 1 (KIVI) quantizes the full range. "calibrated" takes
      one factor per layer and tensor from a `kivi_jax.calibrate` result
      (needs `channel_group`).
    channel_group: SKVQ's groups: when set, keys and values (both per token)
      are grouped over the whole KV hidden dim (all KV heads' channels side
      by side) into `ceil(Hkv * D / channel_group)` groups; equal contiguous
      groups, or with `reorder` the calibrated clusters of unequal size.
    reorder: store channels in the calibrated order that puts channels of
      similar range in one group (needs `channel_group` and a calibration).
    sinks: `S`, the first tokens of each row kept in full precision
      (attention sinks); the rest of the cache holds tokens `S, S + 1, ...`.
    pre_rope: cache keys before RoPE and rotate them (dequantized) at
      attention time.
    scale_dtype: None (scales and zeros in the cache dtype) or
      "float8_e4m3fn".
  """

  k_bits: float = 2
  v_bits: float = 2
  group_size: int = 32
  residual_length: int = 128
  key_axis: QuantAxis = "channel"
  value_axis: QuantAxis = "token"
  clip: float | str = 1.0
  channel_group: int | None = None
  reorder: bool = False
  sinks: int = 0
  pre_rope: bool = False
  scale_dtype: str | None = None

  def __post_init__(self):
    for name in ("k_bits", "v_bits"):
      bits = getattr(self, name)
      if isinstance(bits, bool) or bits not in ALLOWED_BITS:
        raise ValueError(f"{name} must be one of {ALLOWED_BITS}, got {bits!r}")
    g = self.group_size
    if isinstance(g, bool) or not isinstance(g, int) or g <= 0:
      raise ValueError(f"group_size must be a positive integer, got {g!r}")
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
    if c != "calibrated" and (isinstance(c, bool) or not isinstance(c, (int, float))
                              or not 0 < c <= 1):
      raise ValueError(f"clip must be a number in (0, 1] or 'calibrated', got {c!r}")
    cg = self.channel_group
    if cg is not None:
      if isinstance(cg, bool) or not isinstance(cg, int) or cg <= 0:
        raise ValueError(f"channel_group must be None or a positive integer, got {cg!r}")
      if self.key_axis != "token" or self.value_axis != "token":
        raise ValueError(
            "channel_group groups per-token keys and values over the hidden dim; it "
            f"needs key_axis='token' and value_axis='token', got {self.key_axis!r} "
            f"and {self.value_axis!r}")
    for name in ("reorder", "pre_rope"):
      if not isinstance(getattr(self, name), bool):
        raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")
    if cg is None and (self.reorder or c == "calibrated"):
      raise ValueError(
          "reorder=True and clip='calibrated' need channel_group: the calibrated "
          "channel order and clip factors apply to groups over the hidden dim")
    s = self.sinks
    if isinstance(s, bool) or not isinstance(s, int) or s < 0:
      raise ValueError(f"sinks must be a non-negative integer, got {s!r}")
    if self.scale_dtype not in SCALE_DTYPES:
      raise ValueError(f"scale_dtype must be one of {SCALE_DTYPES}, got "
                       f"{self.scale_dtype!r}")

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

  @property
  def needs_calibration(self) -> bool:
    """Whether `init_cache` needs a `kivi_jax.calibrate` result."""
    return self.reorder or self.clip == "calibrated"

  def hidden_groups(self, hidden: int) -> int:
    """Groups over a hidden dim of `hidden` channels (`channel_group` set)."""
    return -(-hidden // self.channel_group)

  def check_head_dim(self, head_dim: int) -> None:
    """Raises if a per-token-quantized tensor cannot be grouped over `head_dim`."""
    if self.channel_group is not None:
      return
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

  def bits_per_element(self, scale_bits: int, head_dim: int | None = None,
                       num_kv_heads: int = 1) -> tuple[float, float]:
    """Bits per key and per value element in the quantized block (SPEC.md).

    `scale_bits` is the width of a stored scale or zero (8 whatever it says
    with fp8 `scale_dtype`). A per-token group spans `min(group_size,
    head_dim)` channels, or `hidden / hidden_groups(hidden)` on average with
    `channel_group` (`hidden = num_kv_heads * head_dim`); without `head_dim`,
    `group_size` and `channel_group`.
    """
    if self.scale_dtype is not None:
      scale_bits = 8

    def one(bits, axis):
      if bits == 16:
        return float(bits)
      g = self.group_size
      if axis == "token" and self.channel_group is not None:
        g = self.channel_group
        if head_dim is not None:
          hidden = num_kv_heads * head_dim
          g = hidden / self.hidden_groups(hidden)
      elif axis == "token" and head_dim is not None:
        g = channel_group(g, head_dim)
      # Storage bits: 1.6 for ternary codes, 5 to a byte.
      return 32 / codes_per_word(bits) + 2 * scale_bits / g
    return one(self.k_bits, self.key_axis), one(self.v_bits, self.value_axis)


PRESETS: dict[str, KIVIConfig] = {
    # Every token straight into the block (groups of one, no ring): a 16-bit
    # ring would only hold a copy of what the block holds as well.
    "fp16": KIVIConfig(k_bits=16, v_bits=16, group_size=1, residual_length=0),
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
    # SKVQ's reference configurations (SPEC.md, "SKVQ"): the window W = 128 is
    # the ring, flushed 32 tokens at a time; groups of about 128 channels over
    # the hidden dim (and, "-g32", of 32: KIVI-2's memory; "-g16-fp8", of 16
    # with fp8 scales: KIVI-2's memory again, finer groups).
    **{f"skvq-k2v{v}{g}{fp8}": KIVIConfig(
        k_bits=2, v_bits=v, group_size=32, residual_length=128, key_axis="token",
        value_axis="token", clip="calibrated", channel_group=int(g[2:] or 128),
        reorder=True, sinks=5, pre_rope=True,
        scale_dtype="float8_e4m3fn" if fp8 else None)
       for v in (2, 1.5) for g, fp8 in (("", ""), ("", "-fp8"), ("-g32", ""),
                                        ("-g32", "-fp8"), ("-g16", "-fp8"))},
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
