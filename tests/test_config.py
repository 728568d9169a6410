"""KIVIConfig validation: every bad value names its parameter and the allowed values."""

import pytest

import kivi_jax
from kivi_jax.config import KIVIConfig


@pytest.mark.parametrize("kwargs, match", [
    (dict(k_bits=3), r"k_bits must be one of \(2, 4, 8, 16\), got 3"),
    (dict(v_bits=1), r"v_bits must be one of \(2, 4, 8, 16\)"),
    (dict(k_bits=True), r"k_bits must be one of"),
    (dict(group_size=0), r"group_size must be a positive integer"),
    (dict(group_size=24), r"group_size must be a multiple of 16"),
    (dict(k_bits=4, v_bits=4, group_size=12, residual_length=24),
     r"group_size must be a multiple of 8"),
    (dict(residual_length=100),
     r"residual_length must be 0 or a positive multiple of group_size \(32\)"),
    (dict(residual_length=-32), r"residual_length must be 0 or a positive multiple"),
    (dict(key_axis="head"), r"key_axis must be one of \('channel', 'token'\)"),
    (dict(value_axis="row"), r"value_axis must be one of"),
    (dict(clip=0.0), r"clip must be a number in \(0, 1\], got 0.0"),
    (dict(clip=1.2), r"clip must be a number in \(0, 1\]"),
    (dict(clip=True), r"clip must be a number"),
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


def test_sixteen_bits_needs_no_word_alignment():
  KIVIConfig(k_bits=16, v_bits=16, group_size=8, residual_length=8)


def test_presets_registry():
  assert kivi_jax.get_preset("kivi2") == KIVIConfig(2, 2, 32, 128)
  with pytest.raises(ValueError, match="unknown cache method 'kivi3'.*kivi2"):
    kivi_jax.get_preset("kivi3")
