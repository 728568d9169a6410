"""The decode-attention kernels against their jnp reference, over a sweep of shapes.

On a CPU the GPU kernel runs in Pallas interpret mode and the TPU kernel in TPU
interpret mode (NaN-initialized memory, out-of-bounds reads raise, race
detection), float32, tight tolerance; on a GPU the GPU kernel is compiled for
real and checked in bfloat16. No TPU was available: the TPU kernel is verified
in interpret mode only.
"""

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
import numpy as np
import pytest

import kivi_jax
from kivi_jax import quantization
from kivi_jax.attention import resolve_impl

from kivi_jax.pallas_kernels import decode_attention as da
from kivi_jax.pallas_kernels import decode_attention_dense as da_dense
from kivi_jax.pallas_kernels import decode_attention_hidden as da_hidden
from kivi_jax.pallas_kernels import decode_attention_mha as da_mha
from kivi_jax.pallas_kernels import decode_attention_ring as da_ring
from kivi_jax.pallas_kernels import decode_attention_tpu as da_tpu
import spec_reference
from conftest import tiny_hf_model, tiny_llama_config, tpu_interpret_params

ON_GPU = jax.default_backend() == "gpu"

BITS = [(2, 2), (4, 4), (8, 8), (2, 4), (8, 2), (2, 1.5)]  # 1.5: ternary, 20 per word
# (head dim, group size); a group wider than the head makes one value group per token.
DIMS = [(64, 32), (64, 64), (128, 32), (128, 128), (64, 128)]


def _capacity(k_bits, v_bits, g):
  """Tokens of a test block: at least 2 packing blocks of each tensor, and one
  common multiple of the two block sizes where that already holds 2 of each
  (ternary's 20 codes a word beside 16 make it 4 and 5 blocks)."""
  blocks = [da.codes_per_word(k_bits) * g, da.codes_per_word(v_bits) * g]
  step = math.lcm(*blocks)
  return step if step >= 2 * max(blocks) else 2 * step


def _inputs(seed, b, kv_heads, rep, d, g, k_bits, v_bits, dtype):
  """Random packed block of `_capacity` tokens, ragged per-row lengths."""
  rng = np.random.default_rng(seed)
  capacity = _capacity(k_bits, v_bits, g)
  k = rng.standard_normal((b, kv_heads, capacity, d)).astype(np.float32)
  k[..., 1] *= 30  # an outlier channel
  v = rng.standard_normal((b, kv_heads, capacity, d)).astype(np.float32)
  kc, ks, kz = quantization.quantize(jnp.asarray(k, dtype), k_bits, g, "channel", dtype)
  vc, vs, vz = quantization.quantize(jnp.asarray(v, dtype), v_bits, g, "token", dtype)
  m_rows = max(16, 1 << (rep - 1).bit_length())
  q = np.zeros((b, kv_heads, m_rows, d), np.float32)
  q[:, :, :rep] = rng.standard_normal((b, kv_heads, rep, d))
  # Lengths: empty, one group, not a multiple of any block, full.
  n_valid = np.array([0, g, capacity - 3 * g, capacity, 5 * g][:b]) % (capacity + 1)
  lo = np.array([0, 0, g + 7, 0, 2 * g][:b])
  return (jnp.asarray(q, dtype), quantization.pack(kc, k_bits, g), ks, kz,
          quantization.pack(vc, v_bits, g), vs, vz, jnp.asarray(n_valid), jnp.asarray(lo))


def _check(args, rep, k_bits, v_bits, g, rtol, **kw):
  kwargs = dict(k_bits=k_bits, v_bits=v_bits, group_size=g)
  acc, m, l = da.quantized_decode_partials(*args, **kwargs, splits=3, poison=True,
                                           interpret=not ON_GPU, **kw)
  # Poisoned with NaN first: every element of every split must have been written.
  for x in (acc, m, l):
    assert not np.isnan(np.asarray(x)).any()
  o, lse = da.merge_partials(acc, m, l)
  # bf16 inputs: the reference rounds the dots' operands as the kernel does.
  o_ref, lse_ref = da.quantized_decode_attention_reference(*args, **kwargs,
                                                           dot_dtype=args[0].dtype)
  live = np.asarray(args[7]) > np.asarray(args[8])
  _check_rows(o[:, :, :rep], o_ref[:, :, :rep], lse[:, :, :rep], lse_ref[:, :, :rep], live,
              rtol)


def _check_rows(o, o_ref, lse, lse_ref, live, rtol):
  """Per batch row: zeros where no block token is live, else the output within
  `rtol` (relative norm) and the log-sum-exp within `10 * rtol`."""
  o, o_ref = np.asarray(o), np.asarray(o_ref)
  for row in range(o.shape[0]):
    if not live[row]:
      assert np.all(o[row] == 0)
      continue
    err = np.linalg.norm(o[row] - o_ref[row]) / np.linalg.norm(o_ref[row])
    assert err < rtol, (row, err)
    np.testing.assert_allclose(np.asarray(lse[row]), np.asarray(lse_ref[row]),
                               atol=rtol * 10)


@pytest.mark.parametrize("rep", [1, 4, 7, 8])
@pytest.mark.parametrize("d, g", DIMS)
@pytest.mark.parametrize("k_bits, v_bits", BITS)
def test_kernel_matches_reference(k_bits, v_bits, d, g, rep):
  seed = hash((k_bits, v_bits, d, g, rep)) % 2**32
  dtype = jnp.bfloat16 if ON_GPU else jnp.float32
  args = _inputs(seed, 5, 2, rep, d, g, k_bits, v_bits, dtype)
  # float32 interpret mode: summation order only. bf16 on a GPU: BF16_RTOL.
  _check(args, rep, k_bits, v_bits, g, rtol=BF16_RTOL if ON_GPU else 1e-5)


# Against the bf16-rounding reference, only the probabilities' rounding differs
# (at the running maximum in the kernel, the global one in the reference): at
# most 2^-8 relative per probability. Against the float32 reference the keys'
# rounding to bf16 (an outlier channel 30x the rest) moves outputs by up to ~4e-2.
BF16_RTOL = 2**-8


@pytest.mark.skipif(ON_GPU, reason="the sweep above runs bf16 on a GPU")
@pytest.mark.parametrize("d, g", [(64, 32), (128, 128), (64, 128)])
@pytest.mark.parametrize("k_bits, v_bits", BITS)
def test_kernel_in_bf16_matches_the_rounding_reference(k_bits, v_bits, d, g):
  args = _inputs(hash((k_bits, v_bits, d, g, 16)) % 2**32, 5, 2, 8, d, g, k_bits,
                 v_bits, jnp.bfloat16)
  _check(args, 8, k_bits, v_bits, g, rtol=BF16_RTOL)


@pytest.mark.parametrize("d, g", DIMS)
@pytest.mark.parametrize("k_bits, v_bits", [(2, 2), (4, 4), (8, 8), (2, 4), (8, 2)])
def test_mha_kernels_match_reference(k_bits, v_bits, d, g):
  # One query row per kv head. The kernels compute in float32 from the cache's
  # own values (no operand rounded to bf16), so bf16 inputs on a GPU meet the
  # float32 reference as closely as float32 inputs in interpret mode.
  dtype = jnp.bfloat16 if ON_GPU else jnp.float32
  q, *block = _inputs(hash((k_bits, v_bits, d, g, 1)) % 2**32, 5, 3, 1, d, g, k_bits, v_bits,
                      dtype)
  q = q[:, :, :1]
  kwargs = dict(k_bits=k_bits, v_bits=v_bits, group_size=g)
  partials = da_mha.mha_decode_partials(q, *block, **kwargs, poison=True,
                                        interpret=not ON_GPU)
  # Poisoned with NaN first: every packing block's partial must have been written.
  for x in partials:
    assert not np.isnan(np.asarray(x)).any()
  o, lse = da.merge_partials(*partials)
  o_ref, lse_ref = da.quantized_decode_attention_reference(q, *block, **kwargs)
  _check_rows(o, o_ref, lse, lse_ref, np.asarray(block[6]) > np.asarray(block[7]), rtol=1e-5)


@pytest.mark.parametrize("rows, k_bits, v_bits", [(16, 2, 2), (2, 2, 2), (1, 2, 1.5),
                                                  (1, 16, 16)])
def test_mha_kernels_refuse_what_they_do_not_read(rows, k_bits, v_bits):
  args = [jnp.zeros((1, 1, rows, 64), jnp.float32)] + [jnp.zeros((1, 1, 32, 64))] * 6
  with pytest.raises(ValueError, match="one query row"):
    da_mha.mha_decode_partials(*args, jnp.zeros(1, jnp.int32), jnp.zeros(1, jnp.int32),
                               k_bits=k_bits, v_bits=v_bits, group_size=32, interpret=True)


# Capacities: two whole tiles; tiles and a last one overlapping the one before
# (91 = 64 + 27 with tiles of 64; 200 = 128 + 72); one tile of 16.
@pytest.mark.parametrize("capacity", [256, 91, 200, 16])
@pytest.mark.parametrize("rep", [1, 3])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_dense_kernel_matches_float64(dtype, rep, capacity):
  # The 16-bit block (the fp16 preset's) against softmax(q k^T / sqrt(d)) v in
  # float64 over each row's visible tokens `lo <= t < n`: ragged rows, a
  # window, a row of one token and one of none.
  rng = np.random.default_rng(capacity * 10 + rep)
  b, kh, d = 4, 2, 64
  k, v = (jnp.asarray(rng.standard_normal((b, kh, capacity, d)), dtype) for _ in range(2))
  q = jnp.asarray(rng.standard_normal((b, kh, rep, d)), dtype)
  n = np.array([capacity, capacity - 5, 1, 0])
  lo = np.array([0, capacity // 3, 0, 0])
  m_rows = 1 if rep == 1 else 16
  qp = jnp.pad(q, ((0, 0), (0, 0), (0, m_rows - rep), (0, 0)))
  partials = da_dense.dense_decode_partials(qp, k, v, jnp.asarray(n), jnp.asarray(lo),
                                            poison=True, interpret=not ON_GPU)
  # Poisoned with NaN first: every tile's partial must have been written.
  for x in partials:
    assert not np.isnan(np.asarray(x)).any()
  o, lse = da.merge_partials(*partials)
  o, lse = np.asarray(o[:, :, :rep]), np.asarray(lse[:, :, :rep])
  f64 = lambda x: np.asarray(x.astype(jnp.float32), np.float64)  # noqa: E731
  # float32: summation order. bf16 with one row: float32 arithmetic on the
  # cache's own values; with several, the probabilities rounded to bf16 for
  # the values' dot (2^-9 relative each, as cuDNN's).
  tol = 2**-8 if (dtype == "bfloat16" and rep > 1) else 1e-5
  for i in range(b):
    visible = (np.arange(capacity) < n[i]) & (np.arange(capacity) >= lo[i])
    for h in range(kh):
      if not visible.any():
        np.testing.assert_array_equal(o[i, h], 0.0)
        assert (lse[i, h] < -1e29).all()
        continue
      kb, vb = f64(k[i, h]), f64(v[i, h])
      ref = spec_reference.attention(f64(q[i, h]), kb, vb,
                                     np.broadcast_to(visible, (rep, capacity)))
      np.testing.assert_allclose(o[i, h], ref, rtol=tol, atol=tol * np.abs(vb).max())
      s = f64(q[i, h]) @ kb[visible].T / np.sqrt(d)
      lse_ref = np.log(np.exp(s - s.max(-1, keepdims=True)).sum(-1)) + s.max(-1)
      np.testing.assert_allclose(lse[i, h], lse_ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("q_shape, kv_shape, match", [
    ((1, 2, 4, 64), (1, 2, 64, 64), "padded to a multiple of 16"),
    ((1, 2, 1, 64), (1, 2, 8, 64), "at least 16 tokens"),
    ((1, 2, 1, 64), (1, 3, 64, 64), r"k and v must be \[B, K, C, D\]"),
])
def test_dense_kernel_refuses_what_it_does_not_read(q_shape, kv_shape, match):
  z = jnp.zeros(1, jnp.int32)
  with pytest.raises(ValueError, match=match):
    da_dense.dense_decode_partials(jnp.zeros(q_shape), jnp.zeros(kv_shape), jnp.zeros(kv_shape),
                                   z, z, interpret=True)


@pytest.mark.parametrize("tile, n_tiles", [(16, 3), (32, 2), (None, 2)])
@pytest.mark.parametrize("rep", [1, 3])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_ring_kernel_matches_float64(dtype, rep, tile, n_tiles):
  # The ring's and the flushed group's tiles merged, against float64 attention
  # over their visible tokens: a row seeing both, one the ring only, one
  # nothing. Tiles of 16 tokens (two of the ring, one of the group) or of
  # 32 (the ring's one, the group's 16 in one), or the defaults (the same here).
  rng = np.random.default_rng(rep)
  b, kh, d, r, f = 3, 2, 64, 32, 16
  parts = [jnp.asarray(rng.standard_normal((b, kh, t, d)), dtype) for t in (r, r, f, f)]
  q = jnp.asarray(rng.standard_normal((b, kh, rep, d)), dtype)
  ring_live = rng.random((b, r)) < 0.7
  ring_live[0, :16] = False  # a whole tile of the ring masked
  ring_live[2] = False
  flush_live = np.stack([np.ones(f, bool), np.zeros(f, bool), np.zeros(f, bool)])
  m_rows = 1 if rep == 1 else 16
  qp = jnp.pad(q, ((0, 0), (0, 0), (0, m_rows - rep), (0, 0)))
  acc, m, l = da_ring.ring_partials(qp, *parts, jnp.asarray(ring_live), jnp.asarray(flush_live),
                                    tile_tokens=tile, poison=True, interpret=not ON_GPU)
  assert acc.shape == (b, kh, n_tiles, m_rows, d)
  o, lse = (np.asarray(x)[:, :, :rep] for x in da.merge_partials(acc, m, l))
  f64 = lambda x: np.asarray(x.astype(jnp.float32), np.float64)  # noqa: E731
  tol = 2**-8 if (dtype == "bfloat16" and rep > 1) else 1e-5
  for i in range(b):
    keys = np.concatenate([f64(parts[0][i]), f64(parts[2][i])], 1)
    values = np.concatenate([f64(parts[1][i]), f64(parts[3][i])], 1)
    live = np.concatenate([ring_live[i], flush_live[i]])
    if not live.any():
      np.testing.assert_array_equal(o[i], 0.0)
      np.testing.assert_array_equal(np.asarray(l)[i], 0.0)
      continue
    for h in range(kh):
      s = f64(q[i, h]) @ keys[h][live].T / np.sqrt(d)
      p = np.exp(s - s.max(-1, keepdims=True))
      want = (p @ values[h][live]) / p.sum(-1, keepdims=True)
      np.testing.assert_allclose(o[i, h], want, rtol=tol, atol=tol * np.abs(want).max())
      np.testing.assert_allclose(lse[i, h], s.max(-1) + np.log(p.sum(-1)), rtol=1e-5)


@pytest.mark.skipif(ON_GPU, reason="TPU interpret mode is a CPU check")
@pytest.mark.parametrize("rep", [1, 7])
@pytest.mark.parametrize("d, g", DIMS)
@pytest.mark.parametrize("k_bits, v_bits", BITS)
def test_tpu_kernel_matches_reference(k_bits, v_bits, d, g, rep):
  seed = hash((k_bits, v_bits, d, g, rep, -1)) % 2**32
  args = _inputs(seed, 5, 2, rep, d, g, k_bits, v_bits, jnp.float32)
  kwargs = dict(k_bits=k_bits, v_bits=v_bits, group_size=g)
  # The TPU interpreter's callbacks issue JAX ops of their own: dispatching more
  # work before they finish can deadlock a small CPU, so wait for them first.
  o, lse = jax.block_until_ready(
      da_tpu.quantized_decode_attention(*args, **kwargs, interpret=tpu_interpret_params()))
  o_ref, lse_ref = da.quantized_decode_attention_reference(*args, **kwargs)
  assert not np.isnan(np.asarray(o)).any() and not np.isnan(np.asarray(lse)).any()
  np.testing.assert_allclose(np.asarray(o[:, :, :rep]), np.asarray(o_ref[:, :, :rep]),
                             rtol=1e-5, atol=1e-5)
  live = np.asarray(args[7]) > np.asarray(args[8])
  np.testing.assert_allclose(np.asarray(lse)[live][:, :, :rep],
                             np.asarray(lse_ref)[live][:, :, :rep], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("d, g", DIMS)
@pytest.mark.parametrize("k_bits, v_bits", BITS)
def test_tpu_kernel_lowers_for_a_tpu(k_bits, v_bits, d, g, tpu_lowering):
  """Pallas's TPU lowering takes the kernel for every shape it reads. Interpret
  mode does not apply its rule on blocks (8 x 128 tiles or whole axes): 8-bit
  keys and ternary values beside 2-bit keys (steps of 4 groups, and so key scale
  blocks of 4 rows) passed every interpret test and failed it."""
  args = _inputs(0, 2, 2, 4, d, g, k_bits, v_bits, jnp.bfloat16)
  f = jax.jit(lambda *a: da_tpu.quantized_decode_attention(*a, k_bits=k_bits, v_bits=v_bits,
                                                           group_size=g))
  assert "tpu_custom_call" in f.trace(*args).lower(lowering_platforms=("tpu",)).as_text()


@pytest.mark.parametrize("k_bits, v_bits, g", [(2, 2, 16), (2, 1.5, 32), (8, 2, 16)])
@pytest.mark.parametrize("rope", [False, True])
def test_tpu_kernel_in_hidden_layout_lowers_for_a_tpu(k_bits, v_bits, g, rope,
                                                      tpu_lowering):
  args = _hidden_inputs(0, 2, 192, 12, g, k_bits, v_bits, jnp.bfloat16, rope)
  f = jax.jit(lambda *a: da_tpu.quantized_decode_attention(
      *a, k_bits=k_bits, v_bits=v_bits, group_size=g, pos_offset=3 if rope else 0))
  assert "tpu_custom_call" in f.trace(*args).lower(lowering_platforms=("tpu",)).as_text()


@pytest.mark.skipif(ON_GPU, reason="TPU interpret mode is a CPU check")
@pytest.mark.parametrize("d, g, k_bits, v_bits", [(64, 32, 2, 2), (128, 16, 2, 1.5),
                                                  (64, 128, 8, 4)])
def test_tpu_kernel_rotates_keys_cached_before_rope(d, g, k_bits, v_bits):
  rep = 4
  args = _inputs(hash((d, g, k_bits, v_bits, "rope")) % 2**32, 5, 2, rep, d, g, k_bits,
                 v_bits, jnp.float32)
  rng = np.random.default_rng(d + g)
  q_rot = jnp.asarray(rng.standard_normal(args[0].shape), jnp.float32)
  theta = jnp.asarray(1.0 / 10000.0 ** rng.uniform(0, 1, d), jnp.float32)
  kw = dict(k_bits=k_bits, v_bits=v_bits, group_size=g, pos_offset=5)
  o, lse = jax.block_until_ready(da_tpu.quantized_decode_attention(
      *args, q_rot=q_rot, rope_theta=theta, **kw, interpret=tpu_interpret_params()))
  o_ref, lse_ref = da.quantized_decode_attention_reference(*args, q_rot=q_rot,
                                                           rope_theta=theta, **kw)
  live = np.asarray(args[7]) > np.asarray(args[8])
  _check_rows(o[:, :, :rep], o_ref[:, :, :rep], lse[:, :, :rep], lse_ref[:, :, :rep], live,
              1e-5)


# (hidden dim, groups): unequal groups; SmolLM2's 192 channels; 512 channels
# make a step of 16 groups of 16 tokens two chunks.
@pytest.mark.skipif(ON_GPU, reason="TPU interpret mode is a CPU check")
@pytest.mark.parametrize("hidden, n_groups", [(64, 3), (192, 12), (512, 20)])
@pytest.mark.parametrize("k_bits, v_bits, g", [(2, 2, 16), (2, 1.5, 32), (8, 2, 16)])
@pytest.mark.parametrize("rope", [False, True])
def test_tpu_kernel_in_hidden_layout_matches_reference(k_bits, v_bits, g, hidden, n_groups,
                                                       rope):
  seed = hash((k_bits, v_bits, g, hidden, n_groups, rope, "tpu")) % 2**32
  args = _hidden_inputs(seed, 5, hidden, n_groups, g, k_bits, v_bits, jnp.float32, rope)
  kw = dict(k_bits=k_bits, v_bits=v_bits, group_size=g, sm_scale=0.125,
            pos_offset=3 if rope else 0)
  o, lse = jax.block_until_ready(
      da_tpu.quantized_decode_attention(*args, **kw, interpret=tpu_interpret_params()))
  o_ref, lse_ref = da.quantized_decode_attention_reference(*args, **kw)
  live = np.asarray(args[7]) > np.asarray(args[8])
  _check_rows(o[:, 0, :9], o_ref[:, 0, :9], lse[:, 0, :9], lse_ref[:, 0, :9], live, 1e-5)


def test_tpu_kernel_rejects_half_a_layout():
  args = _hidden_inputs(0, 2, 64, 3, 16, 2, 2, jnp.float32, rope=True)
  kw = dict(k_bits=2, v_bits=2, group_size=16, interpret=True)
  with pytest.raises(ValueError, match="k_groups and v_groups go together"):
    da_tpu.quantized_decode_attention(*args[:10], None, **kw)
  with pytest.raises(ValueError, match="q_rot and rope_theta go together"):
    da_tpu.quantized_decode_attention(*args[:12], None, **kw)


def test_tpu_kernel_rejects_scales_of_part_of_a_lane_block():
  """SKVQ's scales lie tokens last, read in blocks of whole 128-token lanes: 8-bit
  keys beside 2-bit values step 64 tokens, so a capacity of 448 is refused."""
  args = list(_hidden_inputs(0, 2, 64, 3, 16, 8, 2, jnp.float32, rope=False))
  for i in (2, 3, 5, 6):
    args[i] = args[i][..., :448]
  with pytest.raises(ValueError, match=r"capacity \(448\) must be a multiple of 128 tokens"):
    da_tpu.quantized_decode_attention(*args, k_bits=8, v_bits=2, group_size=16,
                                      interpret=True)


@pytest.mark.parametrize("block_tokens", [32, 64, 128])
def test_block_tokens_do_not_change_the_result(block_tokens):
  args = _inputs(0, 3, 2, 4, 128, 32, 2, 2, jnp.float32)
  kw = dict(k_bits=2, v_bits=2, group_size=32)
  o, _ = da.quantized_decode_attention(*args, **kw, block_tokens=block_tokens,
                                       interpret=not ON_GPU)
  o_ref, _ = da.quantized_decode_attention_reference(*args, **kw)
  np.testing.assert_allclose(np.asarray(o), np.asarray(o_ref), rtol=1e-4, atol=1e-4)


def test_rejects_block_tokens_that_split_a_group():
  args = _inputs(0, 3, 2, 4, 128, 32, 2, 2, jnp.float32)
  with pytest.raises(ValueError, match="block_tokens=48 must be a multiple of group_size=32"):
    da.quantized_decode_attention(*args, k_bits=2, v_bits=2, group_size=32, block_tokens=48,
                                  interpret=True)


def test_rejects_block_tokens_that_straddle_ternary_words():
  # 2-bit keys pack 16 groups to a word row, ternary values 20: a chunk of 8
  # groups would cross a ternary word.
  args = _inputs(0, 3, 2, 4, 64, 32, 2, 1.5, jnp.float32)
  with pytest.raises(ValueError, match="block_tokens=256 .* dividing 512 and 640"):
    da.quantized_decode_attention(*args, k_bits=2, v_bits=1.5, group_size=32,
                                  block_tokens=256, interpret=True)


def _hidden_inputs(seed, b, hidden, n_groups, g, k_bits, v_bits, dtype, rope):
  """A random block in SKVQ's layout: `hidden` channels in `n_groups` unequal
  groups, 9 query rows over the whole hidden dim, `_capacity` tokens, ragged
  lengths as `_inputs`."""
  rng = np.random.default_rng(seed)
  capacity = _capacity(k_bits, v_bits, g)

  def unequal_groups():
    cuts = np.sort(rng.choice(np.arange(1, hidden), n_groups - 1, replace=False))
    return np.repeat(np.arange(n_groups), np.diff([0, *cuts, hidden])).astype(np.int32)

  ids = [unequal_groups() for _ in "kv"]  # each tensor's own
  k = rng.standard_normal((b, 1, capacity, hidden)).astype(np.float32)
  k[..., 1] *= 30  # an outlier channel
  v = rng.standard_normal((b, 1, capacity, hidden)).astype(np.float32)
  kc, ks, kz = quantization.quantize(jnp.asarray(k, dtype), k_bits, g, "token", dtype,
                                     groups=(jnp.asarray(ids[0]), n_groups))
  vc, vs, vz = quantization.quantize(jnp.asarray(v, dtype), v_bits, g, "token", dtype,
                                     groups=(jnp.asarray(ids[1]), n_groups))
  q = np.zeros((2, b, 1, 16, hidden), np.float32)
  q[:, :, :, :9] = rng.standard_normal((2, b, 1, 9, hidden))
  n_valid = np.array([0, g, capacity - 3 * g, capacity, 5 * g][:b]) % (capacity + 1)
  lo = np.array([0, 0, g + 7, 0, 2 * g][:b])
  # The layout's scales and zeros lie tokens last: [B, 1, n, C].
  ks, kz, vs, vz = (jnp.swapaxes(x, 2, 3) for x in (ks, kz, vs, vz))
  args = (jnp.asarray(q[0], dtype), quantization.pack(kc, k_bits, g), ks, kz,
          quantization.pack(vc, v_bits, g), vs, vz, jnp.asarray(n_valid), jnp.asarray(lo),
          jnp.asarray(ids[0]), jnp.asarray(ids[1]))
  if rope:
    theta = 1.0 / 10000.0 ** rng.uniform(0, 1, hidden)
    args += (jnp.asarray(q[1], dtype), jnp.asarray(theta, jnp.float32))
  return args


# (hidden dim, groups, channels per tile, tiles per values program, values
# splits, chunks of the scores' tiles): default tiles (2 and 6 of 32, one per
# values program), SmolLM2's 192 channels, and explicit ones; the values
# kernel's splits by default and fewer or more than the scores kernel's 3 (its
# probabilities cut or padded); the scores' tiles in one chunk, by default
# (two chunks of the 2 tiles, here), or in chunks of a few.
@pytest.mark.parametrize("hidden, n_groups, tile, value_tiles, value_splits, chunks", [
    (64, 3, None, 1, None, None), (192, 12, None, 1, 2, 3), (256, 5, 32, 2, 5, 1),
    (128, 40, 16, 4, 1, 4)])
@pytest.mark.parametrize("k_bits, v_bits, g", [(2, 2, 16), (2, 1.5, 32), (4, 4, 128),
                                               (8, 2, 16)])
@pytest.mark.parametrize("rope", [False, True])
def test_hidden_kernels_match_reference(k_bits, v_bits, g, hidden, n_groups, tile,
                                        value_tiles, value_splits, chunks, rope):
  _check_hidden_kernels(k_bits, v_bits, g, hidden, n_groups, tile, value_tiles, value_splits,
                        chunks, rope)


# The scores kernel's other form, as blocks past `SINCOS_MAX_ANGLE` run it:
# libdevice's sin and cos and each element's scale and zero gathered.
@pytest.mark.parametrize("hidden, n_groups, tile, value_tiles, value_splits, chunks", [
    (192, 12, None, 1, 2, 3), (128, 40, 16, 4, 1, 4)])
@pytest.mark.parametrize("rope", [False, True])
def test_hidden_kernels_match_reference_without_fast_rope(hidden, n_groups, tile, value_tiles,
                                                          value_splits, chunks, rope):
  _check_hidden_kernels(2, 2, 16, hidden, n_groups, tile, value_tiles, value_splits, chunks,
                        rope, fast_rope=False)


def _check_hidden_kernels(k_bits, v_bits, g, hidden, n_groups, tile, value_tiles, value_splits,
                          chunks, rope, fast_rope=None):
  seed = hash((k_bits, v_bits, g, hidden, n_groups, rope)) % 2**32
  dtype = jnp.bfloat16 if ON_GPU else jnp.float32
  args = _hidden_inputs(seed, 5, hidden, n_groups, g, k_bits, v_bits, dtype, rope)
  kw = dict(k_bits=k_bits, v_bits=v_bits, group_size=g, sm_scale=0.125,
            pos_offset=3 if rope else 0)
  # The value channels' natural places: kv heads of d channels, rep query rows
  # each (MHA and GQA), the rows' outputs read back from the H at random places.
  hkv, rep = {64: (4, 2), 192: (3, 3), 256: (8, 1), 128: (2, 4)}[hidden]
  d = hidden // hkv
  perm = np.random.default_rng(seed).permutation(hidden)
  # Poisoned with NaN first: a live score or an output element the kernels
  # leave unwritten reaches the output.
  o, lse = da_hidden.hidden_decode_attention(*args[:11], jnp.asarray(perm), *args[11:], **kw,
                                             head_dim=d, rep=rep, tile=tile,
                                             value_tiles=value_tiles, splits=3, chunks=chunks,
                                             value_splits=value_splits, poison=True,
                                             fast_rope=fast_rope, interpret=not ON_GPU)
  o_ref, lse_ref = da.quantized_decode_attention_reference(*args, **kw,
                                                           dot_dtype=args[0].dtype)
  assert o.shape == (5, rep, hidden)
  assert np.isfinite(np.asarray(o)).all() and np.isfinite(np.asarray(lse)).all()
  # o[:, j, n]: row (n // d) * rep + j at value channel c, where perm[c] = n.
  n = np.arange(hidden)
  o_ref = np.asarray(o_ref)[:, 0][:, (n // d) * rep + np.arange(rep)[:, None], np.argsort(perm)]
  live = np.asarray(args[7]) > np.asarray(args[8])
  # float32 interpret mode: summation order only. bf16 on a GPU: both round the
  # dots' operands alike (the probabilities at the block's maximum, as here).
  _check_rows(o, o_ref, lse[:, 0, :9], lse_ref[:, 0, :9], live, BF16_RTOL if ON_GPU else 1e-5)


def test_sincos_is_within_its_bound_of_float64_below_its_largest_angle():
  """`_sincos` in a kernel: PTX's pair compiled on a GPU, `jnp`'s in interpret
  mode on a CPU, each after the same reduction to [-pi, pi]."""
  rng = np.random.default_rng(0)
  x = np.concatenate([rng.uniform(0, 10, 100_000), rng.uniform(0, 1e4, 100_000),
                      rng.uniform(0, da_hidden.SINCOS_MAX_ANGLE, 400_000),
                      np.arange(-1, 2**17) * np.pi / 4]).astype(np.float32)
  x = x[(x >= 0) & (x < da_hidden.SINCOS_MAX_ANGLE)]
  x = np.pad(x, (0, -len(x) % 8192)).reshape(-1, 1024)

  def kernel(x_ref, sin_ref, cos_ref):
    sin_ref[...], cos_ref[...] = da_hidden._sincos(x_ref[...], ptx=ON_GPU)

  spec = pl.BlockSpec((8, 1024), lambda i: (i, 0))
  out = jax.ShapeDtypeStruct(x.shape, jnp.float32)
  sin, cos = pl.pallas_call(kernel, grid=(len(x) // 8,), in_specs=[spec],
                            out_specs=[spec, spec], out_shape=[out, out],
                            interpret=not ON_GPU)(jnp.asarray(x))
  # The reduction's angle is off the exact one by its last two subtractions'
  # roundings (2^-23 each at a result below 4; `k p1`, `k p2` and `x - k p1`
  # are exact) and by under 2^-25 from its third part (k times the part's
  # float32 error, and `k p3`'s rounding), which moves sin and cos by as much.
  # On top of it PTX's .approx compiled (2^-20.9 on [-pi, pi] by its
  # documentation; an H100 measured 5.0e-7 over the reduction's slightly wider
  # range: scripts/ptx_sincos_error.py), or jnp's float32 sin and cos in
  # interpret mode (a unit in the last place: 6e-8 near 1).
  reduced = 2**-22 + 2**-25
  x64 = x.astype(np.float64)
  r = np.asarray(jax.jit(lambda v: da_hidden._reduce(v, 2 * math.pi))(x)).astype(np.float64)
  off = (r - x64 + np.pi) % (2 * np.pi) - np.pi  # off a multiple of 2 pi
  assert np.abs(off).max() <= reduced
  atol = reduced + (2**-20.9 if ON_GPU else 6e-8)
  np.testing.assert_allclose(np.asarray(sin), np.sin(x64), rtol=0, atol=atol)
  np.testing.assert_allclose(np.asarray(cos), np.cos(x64), rtol=0, atol=atol)


@pytest.mark.parametrize("rope, pos_offset", [(False, 0), (True, 0), (True, 399_000),
                                              (True, 400_000)])
def test_hidden_kernels_lower_for_cuda_with_ptx_sin_and_cos_where_rope_needs_them(
    rope, pos_offset):
  """PTX's pair where the scores have RoPE and every angle stays below
  `SINCOS_MAX_ANGLE` (the block's capacity plus `pos_offset` positions),
  libdevice's precise pair past it; PTX's fma for the dequantization always."""
  args = _hidden_inputs(0, 2, 192, 12, 16, 2, 2, jnp.bfloat16, rope=rope)
  capacity = args[2].shape[3]  # the key scales' tokens
  assert capacity + 399_000 < da_hidden.SINCOS_MAX_ANGLE <= capacity + 400_000
  f = jax.jit(functools.partial(da_hidden.hidden_decode_attention.__wrapped__, k_bits=2,
                                v_bits=2, group_size=16, head_dim=64, rep=3, sm_scale=0.125,
                                pos_offset=pos_offset))
  text = f.trace(*args[:11], jnp.arange(192), *args[11:]).lower(
      lowering_platforms=("cuda",)).as_text()
  assert "skvq_decode_scores" in text
  ptx = rope and pos_offset < 400_000
  assert ("sin.approx.f32" in text) == ptx and ("cos.approx.f32" in text) == ptx
  assert "fma.rn.f32" in text


@pytest.mark.parametrize("hidden, tile, value_tiles, chunks, match", [
    (200, None, None, None, r"hidden dim \(200\) must be a multiple of 16"),
    (192, 128, None, None, r"tile=128 must be a power of two of at least 16 dividing the "
                           r"hidden dim \(192\)"),
    (192, 8, None, None, r"tile=8 must be"),
    (192, 32, 4, None, r"value_tiles=4 must divide the 6 tiles of 32 channels"),
    (192, 32, 1, 4, r"chunks=4 must divide the 6 tiles of 32 channels")])
def test_hidden_kernels_reject_bad_tiles(hidden, tile, value_tiles, chunks, match):
  args = _hidden_inputs(0, 2, hidden, 3, 16, 2, 2, jnp.float32, rope=False)
  with pytest.raises(ValueError, match=match):
    da_hidden.hidden_decode_attention(*args, jnp.arange(hidden), k_bits=2, v_bits=2,
                                      group_size=16, head_dim=16, rep=1, sm_scale=0.125,
                                      tile=tile, value_tiles=value_tiles, chunks=chunks,
                                      interpret=True)


@pytest.mark.parametrize("head_dim, rep", [(20, 1), (16, 2), (16, 0)])
def test_hidden_kernels_reject_bad_heads(head_dim, rep):
  # 192 channels in 12 kv heads of 16 take 12 of the query's 16 rows.
  args = _hidden_inputs(0, 2, 192, 3, 16, 2, 2, jnp.float32, rope=False)
  with pytest.raises(ValueError, match=rf"head_dim={head_dim} must divide the hidden dim "
                                       rf"\(192\) and rep={rep} kv heads' rows fit"):
    da_hidden.hidden_decode_attention(*args, jnp.arange(192), k_bits=2, v_bits=2,
                                      group_size=16, head_dim=head_dim, rep=rep,
                                      sm_scale=0.125, interpret=True)


# SKVQ's layout with sinks, pre-RoPE keys and ternary values, without a
# calibration (channels in order, a fixed clip).
_SKVQ = kivi_jax.KIVIConfig(k_bits=2, v_bits=1.5, group_size=32, residual_length=128,
                            key_axis="token", value_axis="token", channel_group=16,
                            clip=0.9, sinks=5, pre_rope=True)


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs a GPU")
@pytest.mark.parametrize("method", ["kivi2", "kivi4", "skvq"])
def test_generation_with_kernel_equals_reference(method):
  # Head dim 32, 4 query heads per kv head: the kernel applies (checked below).
  model = kivi_jax.load_model(tiny_hf_model(tiny_llama_config(
      hidden_size=128, intermediate_size=128, num_attention_heads=4, num_key_value_heads=1)))
  prompt = np.random.default_rng(0).integers(0, 256, (3, 300))
  kv = _SKVQ if method == "skvq" else kivi_jax.PRESETS[method]
  assert resolve_impl("gpu", kv, model.config.head_dim, model.config.num_kv_heads, 1) == "gpu"
  out = {impl: np.asarray(kivi_jax.generate(model, prompt, kv_config=kv, max_new_tokens=40,
                                            impl=impl))
         for impl in ("gpu", "reference")}
  np.testing.assert_array_equal(out["gpu"], out["reference"])
