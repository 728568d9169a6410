"""The jnp quantization reference against SPEC.md's formulas (float64 numpy)."""

import functools

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from kivi_jax import quantization
import spec_reference

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


@st.composite
def cases(draw):
  bits = draw(st.sampled_from([2, 4, 8]))
  g = draw(st.sampled_from([32, 64, 128]))
  axis = draw(st.sampled_from(["channel", "token"]))
  dtype = draw(st.sampled_from(list(DTYPES)))
  heads = draw(st.integers(1, 3))
  if axis == "channel":
    t, d = g * draw(st.integers(1, 3)), draw(st.sampled_from([8, 64, 128]))
  else:
    t, d = draw(st.integers(1, 40)), g * draw(st.integers(1, 2))
  kind = draw(st.sampled_from(["normal", "constant", "outliers", "wide"]))
  rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
  x = rng.standard_normal((heads, t, d))
  if kind == "constant":
    x = np.full_like(x, rng.standard_normal())
  elif kind == "outliers":
    # A few channels 50x larger, as KIVI reports for keys.
    x[..., rng.choice(d, max(1, d // 16), replace=False)] *= 50
  elif kind == "wide":
    x = x * 1e3 + 1e4
  return bits, g, axis, dtype, x


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4))
def _round_trip(x, bits, g, axis, dtype):
  # Jitted as the cache runs it (one compile per example's shape, not one per
  # operation as op by op).
  codes, scale, zero = quantization.quantize(x, bits, g, axis, dtype)
  return codes, scale, zero, quantization.dequantize(codes, scale, zero, g, axis, jnp.float32)


@settings(max_examples=150, deadline=None)
@given(cases())
def test_round_trip_error_within_half_a_step(case):
  bits, g, axis, dtype_name, x = case
  dtype = DTYPES[dtype_name]
  xj = jnp.asarray(x, dtype)
  x_in = np.asarray(xj.astype(jnp.float32), np.float64)  # the values actually quantized
  codes, scale, zero, deq = _round_trip(xj, bits, g, axis, dtype)
  deq = np.asarray(deq, np.float64)
  _, s_ref, lo_ref, _ = spec_reference.quantize(x_in, bits, g, axis)
  # Scale is computed in float32 (subtract, divide: up to three roundings of
  # 2^-24 when XLA multiplies by the reciprocal), then rounded once to `dtype`
  # (half its eps); zero is the minimum rounded once.
  eps = float(jnp.finfo(dtype).eps)
  f32_ops = 3 * 2.0**-24
  np.testing.assert_allclose(np.asarray(scale, np.float64), s_ref,
                             rtol=eps / 2 + f32_ops, atol=0)
  np.testing.assert_allclose(np.asarray(zero, np.float64), lo_ref, rtol=eps / 2, atol=0)
  # Bound: scale/2 per element, plus the storage rounding of zero (|lo| eps/2) and
  # of scale (up to 2^b - 1 steps of |scale| eps/2), plus float32 arithmetic.
  red = -2 if axis == "channel" else -1
  expand = lambda a: np.repeat(a, g, axis=red)
  bound = (expand(s_ref) / 2 + expand(np.abs(lo_ref)) * eps
           + (2**bits - 1) * expand(s_ref) * eps + np.abs(x_in) * 1e-6)
  assert np.all(np.abs(deq - x_in) <= bound)
  assert np.asarray(codes).max() <= 2**bits - 1


@pytest.mark.parametrize("g", [32, 128])  # 128 > head dim: one group per token
@pytest.mark.parametrize("axis", ["channel", "token"])
@pytest.mark.parametrize("bits", [1.5, 2, 4, 8])
def test_codes_match_spec_in_float32(bits, axis, g):
  rng = np.random.default_rng(int(2 * bits))
  x = rng.standard_normal((2, 128, 64)).astype(np.float32)
  codes, scale, zero = quantization.quantize(jnp.asarray(x), bits, g, axis, jnp.float32)
  q_ref, s_ref, z_ref, deq_ref = spec_reference.quantize(x, bits, g, axis)
  assert scale.shape == ((2, 128 // g, 64) if axis == "channel" else (2, 128, 64 // min(g, 64)))
  # Codes may differ from float64 only where (x - lo) / scale sits on a .5 tie
  # within float32 rounding: allow one step on a vanishing fraction.
  diff = np.abs(np.asarray(codes, np.int64) - q_ref)
  assert diff.max() <= 1 and diff.mean() < 1e-3
  np.testing.assert_allclose(np.asarray(scale), s_ref, rtol=1e-6)
  np.testing.assert_array_equal(np.asarray(zero), z_ref)


@pytest.mark.parametrize("axis,groups", [
    ("channel", None), ("token", None), ("token", np.repeat(np.arange(4), [5, 1, 20, 6]))],
    ids=["channel", "token", "token-explicit-groups"])
def test_codes_divide_as_ieee_float32(axis, groups):
  """Codes are `round((x - zero) / scale)` with the float32 division correctly
  rounded (SPEC.md; the GPU kernel divides so): values placed on and next to
  half-steps, where multiplying by the reciprocal instead moves codes a level."""
  rng = np.random.default_rng(7)
  n, g, top = 4096, 32, 3
  lo = rng.standard_normal((n, 1)).astype(np.float32)
  hi = lo + rng.uniform(0.1, 3.0, (n, 1)).astype(np.float32)
  step = (hi - lo) * np.float32(1 / top)
  tie = lo + (rng.integers(0, top, (n, g)) + 0.5) * step
  x = np.where(rng.random((n, g)) < 0.5, tie,
               np.nextafter(tie, np.where(rng.random((n, g)) < 0.5, -np.inf, np.inf)))
  x[:, :1], x[:, 1:2] = lo, hi
  x = np.asarray(x, np.float32)
  if axis == "channel":
    x = x.T  # [T = G, D]: one group per channel
  grp = None if groups is None else (jnp.asarray(groups, jnp.int32), 4)
  codes, scale, zero = quantization.quantize(jnp.asarray(x), 2, g, axis, jnp.float32,
                                             groups=grp)
  scale, zero = np.asarray(scale), np.asarray(zero)
  if groups is not None:
    scale, zero = scale[:, groups], zero[:, groups]
  elif axis == "channel":
    scale, zero = np.repeat(scale, g, axis=0), np.repeat(zero, g, axis=0)
  else:
    scale, zero = np.repeat(scale, g, axis=1), np.repeat(zero, g, axis=1)
  num = (x - zero).astype(np.float32)
  safe = np.where(scale > 0, scale, np.float32(1))
  # A float32 quotient computed in float64 and rounded once is correctly rounded.
  y = (num.astype(np.float64) / safe).astype(np.float32)
  want = np.where(scale > 0, np.clip(np.round(y), 0, top), 0)
  shortcut = np.clip(np.round(num * (np.float32(1) / safe)), 0, top)
  assert np.count_nonzero(shortcut != want) > 100  # the inputs do sit on ties
  np.testing.assert_array_equal(np.asarray(codes), want)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_constant_groups_dequantize_exactly(bits):
  x = jnp.full((1, 64, 64), -3.140625, jnp.bfloat16)
  for axis in ("channel", "token"):
    codes, scale, zero = quantization.quantize(x, bits, 32, axis, jnp.bfloat16)
    out = quantization.dequantize(codes, scale, zero, 32, axis, jnp.bfloat16)
    assert not np.isnan(np.asarray(out, np.float32)).any()
    np.testing.assert_array_equal(np.asarray(out), np.asarray(x))


@settings(max_examples=60, deadline=None)
@given(bits=st.sampled_from([1.5, 2, 4, 8]), g=st.sampled_from([8, 24, 32, 64]),
       blocks=st.integers(1, 3), d=st.integers(1, 9), seed=st.integers(0, 2**32 - 1))
def test_pack_unpack_is_exact(bits, g, blocks, d, seed):
  w = 20 if bits == 1.5 else 32 // bits
  t = blocks * w * g
  codes = np.random.default_rng(seed).integers(0, spec_reference.levels(bits) + 1, (2, t, d))
  packed = quantization.pack(jnp.asarray(codes), bits, g)
  assert packed.dtype == jnp.uint32 and packed.shape == (2, t // w, d)
  np.testing.assert_array_equal(np.asarray(quantization.unpack(packed, bits, g)), codes)
  # The layout itself: token t of group k = t // g sits in word row
  # (k // w) * g + t % g, slot k % w: bits [(k % w) b, (k % w + 1) b), or for
  # ternary codes base-3 digit (k % w) % 5 of byte (k % w) // 5.
  words = np.asarray(packed, np.int64)
  for tok in range(t):
    k = tok // g
    row = (k // w) * g + tok % g
    if bits == 1.5:
      byte = (words[:, row] >> (8 * (k % w // 5))) & 255
      assert (byte < 243).all()
      got = byte // 3 ** (k % w % 5) % 3
    else:
      got = (words[:, row] >> ((k % w) * bits)) & (2**bits - 1)
    np.testing.assert_array_equal(got, codes[:, tok])


def test_pack_rejects_partial_blocks():
  with pytest.raises(ValueError, match="multiple of 512"):
    quantization.pack(jnp.zeros((1, 32, 4), jnp.uint8), 2, 32)


@pytest.mark.parametrize("axis", ["channel", "token"])
def test_clip_one_is_plain_quantization(axis):
  x = jnp.asarray(np.random.default_rng(3).standard_normal((2, 64, 64)), jnp.float32)
  plain = quantization.quantize(x, 2, 32, axis, jnp.float32)
  clipped = quantization.quantize(x, 2, 32, axis, jnp.float32, clip=1.0)
  for a, b in zip(plain, clipped):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("axis", ["channel", "token"])
@pytest.mark.parametrize("bits", [2, 4])
def test_clipped_quantization_matches_spec(bits, axis):
  rng = np.random.default_rng(bits)
  x = rng.standard_normal((2, 64, 64)).astype(np.float32)
  x[:, :, 5] = 0.25  # constant groups (per token: not whole groups, per channel: yes)
  codes, scale, zero = quantization.quantize(jnp.asarray(x), bits, 32, axis, jnp.float32,
                                             clip=0.9)
  q_ref, s_ref, z_ref, deq_ref = spec_reference.quantize(x, bits, 32, axis, clip=0.9)
  diff = np.abs(np.asarray(codes, np.int64) - q_ref)
  assert diff.max() <= 1 and diff.mean() < 1e-3
  np.testing.assert_allclose(np.asarray(scale), s_ref, rtol=1e-6)
  np.testing.assert_allclose(np.asarray(zero), z_ref, rtol=1e-6)
  plain_scale = spec_reference.quantize(x, bits, 32, axis)[1]
  spread = plain_scale > 0
  # Finer steps for every group with a spread.
  np.testing.assert_allclose(s_ref[spread], 0.9 * plain_scale[spread], rtol=1e-12)
  deq = np.asarray(quantization.dequantize(codes, scale, zero, 32, axis, jnp.float32))
  # Nothing dequantizes beyond the clipped range (x's extremes are of both signs).
  assert 0.9 * x.min() - 1e-6 <= deq.min() and deq.max() <= 0.9 * x.max() + 1e-6
  if axis == "channel":  # channel 5 is constant per group: exact despite clipping
    np.testing.assert_array_equal(deq[:, :, 5], 0.25)


@pytest.mark.parametrize("bits", [1.5, 2, 4])
def test_unequal_channel_groups_match_spec(bits):
  # SKVQ's groups: given per channel, unequal, one of a single channel.
  rng = np.random.default_rng(7)
  x = rng.standard_normal((2, 40, 24)).astype(np.float32)
  x[..., 3] *= 30
  ids = np.repeat(np.arange(4), [10, 1, 8, 5]).astype(np.int32)
  codes, scale, zero = quantization.quantize(jnp.asarray(x), bits, 0, "token", jnp.float32,
                                             0.9, (jnp.asarray(ids), 4))
  assert scale.shape == (2, 40, 4)
  q_ref, s_ref, z_ref, deq_ref = spec_reference.quantize(x, bits, 0, "token", 0.9, ids)
  diff = np.abs(np.asarray(codes, np.int64) - q_ref)
  assert diff.max() <= 1 and diff.mean() < 1e-3
  np.testing.assert_allclose(np.asarray(scale), s_ref, rtol=1e-6)
  np.testing.assert_allclose(np.asarray(zero), z_ref, rtol=1e-6)
  deq = quantization.dequantize(codes, scale, zero, 0, "token", jnp.float32,
                                (jnp.asarray(ids), 4))
  np.testing.assert_allclose(np.asarray(deq), deq_ref, rtol=1e-5, atol=1e-5)
  # Equal groups given explicitly are the plain per-token groups.
  plain = quantization.quantize(jnp.asarray(x), bits, 8, "token", jnp.float32)
  explicit = quantization.quantize(jnp.asarray(x), bits, 0, "token", jnp.float32, 1.0,
                                   (jnp.arange(24) // 8, 3))
  for a, b in zip(plain, explicit):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("masked", [True, False])
@pytest.mark.parametrize("seed", range(5))
def test_group_min_and_max_match_numpy(seed, masked, monkeypatch):
  # Both ways of reducing explicit groups (under a mask for little work, a scan
  # for more): random widths, one-channel groups, and group ids that no channel
  # has (they get the reduction's identity).
  rng = np.random.default_rng(seed)
  hidden = int(rng.integers(2, 300))
  n = int(rng.integers(1, min(hidden, 40) + 1)) + 2
  ids = np.sort(rng.integers(0, n, hidden)).astype(np.int32)
  x = rng.standard_normal((2, int(rng.integers(1, 40)), hidden)).astype(np.float32)
  if not masked:
    monkeypatch.setattr(quantization, "SEGMENT_MASKED_PAIRS", x.size * n - 1)
  assert (x.size * n <= quantization.SEGMENT_MASKED_PAIRS) == masked
  for reduce, ref, identity in ((jnp.minimum, np.min, np.inf), (jnp.maximum, np.max, -np.inf)):
    got = quantization._segment(reduce, identity, jnp.asarray(x), jnp.asarray(ids), n)
    want = np.stack([ref(x[..., ids == g], -1) if (ids == g).any()
                     else np.full(x.shape[:-1], identity) for g in range(n)], -1)
    np.testing.assert_array_equal(np.asarray(got), want)


@pytest.mark.parametrize("batch, masked", [(1, True), (2, True), (4, False), (32, False)])
def test_flush_group_reductions_at_7b_width_take_the_faster_way(batch, masked):
  # SKVQ's flush at Llama-2-7B's width (32 tokens x 4096 channels in 256
  # groups), timed both ways in whole steps on an H200: the masked reduction
  # faster at batch 1 and 2, the scan at 4 and above (benchmarks/NOTES.md).
  ids = jnp.arange(4096, dtype=jnp.int32) // 16
  x = jax.ShapeDtypeStruct((batch, 32, 4096), jnp.float32)
  jaxpr = jax.make_jaxpr(
      lambda x: quantization._segment(jnp.minimum, jnp.inf, x, ids, 256))(x)
  assert ("reduce_min" in str(jaxpr)) == masked


def test_traced_clip_of_one_is_plain_quantization():
  # The per-layer clip of a calibration arrives traced; 1.0 must change nothing.
  x = jnp.asarray(np.random.default_rng(4).standard_normal((2, 16, 48)), jnp.float32)
  groups = (jnp.arange(48) // 16, 3)
  plain = quantization.quantize(x, 2, 0, "token", jnp.float32, groups=groups)
  traced = jax.jit(lambda c: quantization.quantize(x, 2, 0, "token", jnp.float32, c,
                                                   groups))(jnp.float32(1.0))
  for a, b in zip(plain, traced):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_fp8_scales_are_stored_and_used():
  # Codes come from the fp8-rounded scale and zero, as the spec with stored scales.
  x = np.random.default_rng(5).standard_normal((2, 32, 64)).astype(np.float32)
  codes, scale, zero = quantization.quantize(jnp.asarray(x), 2, 32, "token",
                                             jnp.float8_e4m3fn)
  assert scale.dtype == zero.dtype == jnp.float8_e4m3fn
  q_ref, s_ref, z_ref, _ = spec_reference.quantize(x, 2, 32, "token",
                                                   scale_dtype=ml_dtypes.float8_e4m3fn)
  np.testing.assert_array_equal(np.asarray(scale, np.float64), s_ref)
  np.testing.assert_array_equal(np.asarray(zero, np.float64), z_ref)
  diff = np.abs(np.asarray(codes, np.int64) - q_ref)
  assert diff.max() <= 1 and diff.mean() < 1e-3
