"""KIVIConfig validation: every bad value names its parameter and the allowed values."""

import pytest

import kivi_jax
from kivi_jax.config import KIVIConfig


@pytest.mark.parametrize("kwargs, match", [
    (dict(k_bits=3), r"k_bits must be one of \(1.5, 2, 4, 8, 16\), got 3"),
    (dict(v_bits=1), r"v_bits must be one of \(1.5, 2, 4, 8, 16\)"),
    (dict(k_bits=True), r"k_bits must be one of"),
    (dict(group_size=0), r"group_size must be a positive integer"),
    (dict(residual_length=100),
     r"residual_length must be 0 or a positive multiple of group_size \(32\)"),
    (dict(residual_length=-32), r"residual_length must be 0 or a positive multiple"),
    (dict(key_axis="head"), r"key_axis must be one of \('channel', 'token'\)"),
    (dict(value_axis="row"), r"value_axis must be one of"),
    (dict(clip=0.0), r"clip must be a number in \(0, 1\] or .calibrated., got 0.0"),
    (dict(clip=1.2), r"clip must be a number in \(0, 1\]"),
    (dict(clip=True), r"clip must be a number"),
    (dict(clip="auto"), r"clip must be a number in \(0, 1\] or 'calibrated', got 'auto'"),
    (dict(channel_group=0, key_axis="token"), r"channel_group must be None or a positive"),
    (dict(channel_group=128), r"channel_group .* needs key_axis='token'"),
    (dict(reorder=True), r"reorder=True and clip='calibrated' need channel_group"),
    (dict(clip="calibrated"), r"need channel_group"),
    (dict(reorder=1), r"reorder must be a bool"),
    (dict(pre_rope="yes"), r"pre_rope must be a bool"),
    (dict(sinks=-1), r"sinks must be a non-negative integer, got -1"),
    (dict(scale_dtype="float8"), r"scale_dtype must be one of \(None, 'float8_e4m3fn'\)"),
])
def test_bad_values_raise_naming_the_field(kwargs, match):
  with pytest.raises(ValueError, match=match):
    KIVIConfig(**kwargs)


def test_frozen_and_hashable():
  a, b = KIVIConfig(), KIVIConfig(2, 2, 32, 128)
  assert a == b and hash(a) == hash(b)
  with pytest.raises(Exception):
    a.k_bits = 4  # type: ignore[misc]


def test_residual_zero_rings_only_the_group_being_filled():
  assert KIVIConfig(residual_length=0).ring_size == 32
  assert KIVIConfig(residual_length=64).ring_size == 64


def test_any_group_size_packs():
  # Codes sit in group slots, so a group need not fill whole words (ternary: 20).
  KIVIConfig(k_bits=16, v_bits=16, group_size=8, residual_length=8)
  KIVIConfig(k_bits=2, v_bits=1.5, group_size=24, residual_length=48)


def test_bits_per_element_counts_storage():
  # Ternary codes take 1.6 bits (5 to a byte); fp8 scales 8 bits; SKVQ's groups
  # span the hidden dim (3 heads x 64 = 192 channels in 2 groups of 96).
  skvq = kivi_jax.get_preset("skvq-k2v1.5")
  assert skvq.bits_per_element(16, 64, 3) == (2 + 32 / 96, 1.6 + 32 / 96)
  fp8 = kivi_jax.get_preset("skvq-k2v1.5-fp8")
  assert fp8.bits_per_element(16, 64, 3) == (2 + 16 / 96, 1.6 + 16 / 96)
  assert kivi_jax.get_preset("kivi2").bits_per_element(16, 64) == (3.0, 3.0)


def test_presets_registry():
  assert kivi_jax.get_preset("kivi2") == KIVIConfig(2, 2, 32, 128)
  with pytest.raises(ValueError, match="unknown cache method 'kivi3'.*kivi2"):
    kivi_jax.get_preset("kivi3")
