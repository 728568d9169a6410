"""Cache semantics of SPEC.md: prefill equals step-by-step decode, per-row groups."""

import dataclasses

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import kivi_jax
from kivi_jax import cache as cache_lib
from kivi_jax import quantization
from kivi_jax.cache import append, n_quantized, ring_positions
from kivi_jax.calibration import CALIBRATED_FIELDS, Calibration
from conftest import CacheShape
import spec_reference

B, HKV, D = 3, 2, 32


def _shape(**kw):
  return CacheShape(**{"num_kv_heads": HKV, "head_dim": D, **kw})


CONFIGS = {
    "kivi2-g16-r32": kivi_jax.KIVIConfig(2, 2, 16, 32),
    "kivi4-g32-r64": kivi_jax.KIVIConfig(4, 4, 32, 64),
    "kivi2-g16-r0": kivi_jax.KIVIConfig(2, 2, 16, 0),
    # Groups wider than the head (D = 32): values quantized over the whole head.
    "kivi2-g64-r64": kivi_jax.KIVIConfig(2, 2, 64, 64),
    "kivi2-clip": kivi_jax.KIVIConfig(2, 2, 16, 32, clip=0.93),  # SKVQ's clipping
    "k8-v2-g32-r32": kivi_jax.KIVIConfig(8, 2, 32, 32),
    "k2-v16": kivi_jax.KIVIConfig(2, 16, 16, 16),
    "per-token-keys": kivi_jax.KIVIConfig(2, 2, 16, 32, key_axis="token",
                                          value_axis="channel"),
    "fp16": kivi_jax.KIVIConfig(16, 16, 16, 32),
    "kivi2-sinks": kivi_jax.KIVIConfig(2, 2, 16, 32, sinks=5),
    "kivi2-ternary": kivi_jax.KIVIConfig(2, 1.5, 16, 32),
    # SKVQ: per token over the hidden dim (2 heads x 32 = 64 channels).
    "skvq-3-groups": kivi_jax.KIVIConfig(2, 2, 16, 32, key_axis="token", value_axis="token",
                                         channel_group=24),
    "skvq-ternary-sinks": kivi_jax.KIVIConfig(
        2, 1.5, 16, 32, key_axis="token", value_axis="token", channel_group=32, sinks=5,
        clip=0.9),
    "kivi2-prerope-sinks": kivi_jax.KIVIConfig(2, 2, 16, 32, sinks=2, pre_rope=True),
    "skvq-prerope": kivi_jax.KIVIConfig(
        2, 1.5, 16, 32, key_axis="token", value_axis="token", channel_group=16, reorder=True,
        clip="calibrated", sinks=3, pre_rope=True),
    "skvq-reorder-fp8": kivi_jax.KIVIConfig(
        2, 2, 16, 32, key_axis="token", value_axis="token", channel_group=16, reorder=True,
        clip="calibrated", sinks=3, scale_dtype="float8_e4m3fn"),
}


def random_calibration(config, num_layers=1, hidden=HKV * D, seed=0):
  """A `Calibration` with random orders, unequal groups and clip factors."""
  rng = np.random.default_rng(seed)
  n = config.hidden_groups(hidden)
  out = {}
  for name in "kv":
    perms, groups = [], []
    for _ in range(num_layers):
      perms.append(rng.permutation(hidden).astype(np.int32))
      cuts = np.sort(rng.choice(np.arange(1, hidden), n - 1, replace=False))
      groups.append(np.repeat(np.arange(n), np.diff([0, *cuts, hidden])).astype(np.int32))
    out[f"perm_{name}"], out[f"groups_{name}"] = np.stack(perms), np.stack(groups)
    out[f"clip_{name}"] = rng.uniform(0.85, 1.0, num_layers).astype(np.float32)
  return Calibration(model="test", config={f: getattr(config, f) for f in CALIBRATED_FIELDS},
                     **out)


def _calibration(config):
  return random_calibration(config) if config.needs_calibration else None


def _channel_maps(layer, config):
  """(perm, groups, clip) per tensor as numpy, or None without channel_group."""
  if config.channel_group is None:
    return {"k": None, "v": None}
  return {name: tuple(np.asarray(x) for x in (m.perm, m.groups, m.clip))
          for name, m in (("k", layer.k_map), ("v", layer.v_map))}


def spec_block(x, bits, axis, config, cmap):
  """SPEC.md's quantization of `x` [Hkv, n, D] (one row's block tokens), float64."""
  sdtype = config.scale_dtype and ml_dtypes.float8_e4m3fn
  if cmap is None:
    return spec_reference.quantize(x, bits, config.group_size, axis, config.clip,
                                   scale_dtype=sdtype)[3]
  perm, groups, clip = cmap
  return spec_reference.quantize_hidden(x, bits, perm, groups, clip, sdtype)

_append = jax.jit(append, static_argnames="config")


def _layer(cache):
  return cache.layers[0]


def _kv(n, seed=0):
  rng = np.random.default_rng(seed)
  k = rng.standard_normal((B, HKV, n, D)).astype(np.float32)
  k[..., 3] *= 40  # an outlier channel
  return jnp.asarray(k), jnp.asarray(rng.standard_normal((B, HKV, n, D)), jnp.float32)


def _fill(config, k, v, lengths, chunk):
  """Appends row b's first lengths[b] tokens, `chunk` tokens per call."""
  cache = kivi_jax.init_cache(_shape(), config, B, max(int(np.max(lengths)), 1),
                              calibration=_calibration(config))
  layer, done = _layer(cache), jnp.zeros((B,), jnp.int32)
  n = k.shape[2]
  for start in range(0, n, chunk):
    n_new = jnp.clip(jnp.asarray(lengths) - start, 0, chunk).astype(jnp.int32)
    sl = slice(start, start + chunk)
    layer = _append(layer, k[:, :, sl], v[:, :, sl], done, n_new, config)
    done = done + n_new
  return layer, done


def _live(layer, lengths, config):
  """Everything in `layer` that a reader may see, as numpy, garbage masked out."""
  nq = np.asarray(n_quantized(lengths, config))
  _, valid = ring_positions(lengths, config)
  out = {"ring_k": np.where(np.asarray(valid)[:, None, :, None], layer.ring_k, 0),
         "ring_v": np.where(np.asarray(valid)[:, None, :, None], layer.ring_v, 0)}
  for name, bits, axis in (("k", config.k_bits, config.key_axis),
                           ("v", config.v_bits, config.value_axis)):
    deq = cache_lib.dequantize_block(getattr(layer, name), bits, axis, config, jnp.float32,
                                     getattr(layer, name + "_map"), D)
    keep = np.arange(deq.shape[2])[None, :] < nq[:, None]
    out[name] = np.where(keep[:, None, :, None], np.asarray(deq), 0)
    if bits < 16:
      codes = np.asarray(quantization.unpack(getattr(layer, name).codes, bits,
                                             config.group_size))
      # Codes past the capacity (whole packing blocks of SKVQ's layout) stay 0.
      assert not codes[:, :, keep.shape[1]:].any()
      out[name + "_codes"] = np.where(keep[:, None, :, None], codes[:, :, :keep.shape[1]], 0)
  if config.sinks:
    live = np.arange(config.sinks)[None, :] < np.asarray(lengths)[:, None]
    for name in ("sink_k", "sink_v"):
      out[name] = np.where(live[:, None, :, None], getattr(layer, name), 0)
  return out


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("n", [1, 15, 32, 33, 63, 64, 65, 100, 161])
def test_prefill_equals_token_by_token(name, n):
  config = CONFIGS[name]
  k, v = _kv(n)
  # Rows of different lengths: each must be aligned to its own first token.
  lengths = [n, max(n - 7, 1), max(n // 2, 1)]
  whole, len_a = _fill(config, k, v, lengths, chunk=n)
  steps, len_b = _fill(config, k, v, lengths, chunk=1)
  chunks, len_c = _fill(config, k, v, lengths, chunk=13)
  np.testing.assert_array_equal(len_a, lengths)
  np.testing.assert_array_equal(len_b, lengths)
  np.testing.assert_array_equal(len_c, lengths)
  a, b_, c = (_live(x, len_a, config) for x in (whole, steps, chunks))
  for key in a:
    np.testing.assert_array_equal(a[key], b_[key], err_msg=key)
    np.testing.assert_array_equal(a[key], c[key], err_msg=key)


@pytest.mark.parametrize("name", ["kivi2-g16-r32", "per-token-keys", "k8-v2-g32-r32",
                                  "kivi2-g16-r0", "kivi2-g64-r64", "kivi2-clip",
                                  "kivi2-sinks", "skvq-3-groups", "skvq-ternary-sinks",
                                  "skvq-reorder-fp8"])
def test_block_holds_spec_quantization_of_oldest_tokens(name):
  config = CONFIGS[name]
  n = 130
  k, v = _kv(n, seed=3)
  lengths = [130, 101, 77]
  layer, lens = _fill(config, k, v, lengths, chunk=1)
  nq = np.asarray(n_quantized(lens, config))
  g, r, s = config.group_size, config.residual_length, config.sinks
  maps = _channel_maps(layer, config)
  for row in range(B):
    # SPEC.md: past the S sinks, q = G * ceil(max(n - R, 0) / G) tokens
    # quantized, the rest in the ring; R = 0 quantizes every whole group.
    body = lengths[row] - s
    if r:
      assert nq[row] == g * -(-max(body - r, 0) // g)
      assert r - g + 1 <= body - nq[row] <= r
    else:
      assert nq[row] == body // g * g
    for name_, x, bits, axis in (("k", k, config.k_bits, config.key_axis),
                                 ("v", v, config.v_bits, config.value_axis)):
      deq_ref = spec_block(np.asarray(x[row, :, s:s + nq[row]]), bits, axis, config,
                           maps[name_])
      one_row = jax.tree.map(lambda a: a[row:row + 1], getattr(layer, name_))
      got = cache_lib.dequantize_block(one_row, bits, axis, config, jnp.float32,
                                       getattr(layer, name_ + "_map"), D)
      np.testing.assert_allclose(np.asarray(got[0, :, :nq[row]]), deq_ref, rtol=1e-5,
                                 atol=1e-5)
    if s:
      # Sinks are never quantized.
      np.testing.assert_array_equal(layer.sink_k[row], k[row, :, :s])
      np.testing.assert_array_equal(layer.sink_v[row], v[row, :, :s])
    pos, valid = ring_positions(lens, config)
    for slot in range(config.ring_size):
      if valid[row, slot]:
        np.testing.assert_array_equal(layer.ring_k[row, :, slot], k[row, :, pos[row, slot]])


@pytest.mark.parametrize("name", ["kivi2-g16-r32", "kivi2-g16-r0", "k2-v16", "fp16",
                                  "kivi2-sinks", "skvq-ternary-sinks"])
def test_a_row_fills_its_block_and_ring_to_the_capacity(name):
  """`init_cache(max_length)` sizes the block to what a row of `max_length`
  tokens quantizes (`block_capacity`); a row reaches `capacity`, the block
  full and the ring beside it, every token held as a larger block holds it."""
  config = CONFIGS[name]
  small = kivi_jax.init_cache(_shape(), config, B, 300)
  cap, c = small.capacity, small.block_capacity
  assert cap == c + (config.residual_length or config.group_size - 1) + config.sinks >= 300
  k, v = _kv(cap, seed=5)
  lengths = jnp.asarray([cap, cap - 1, 300], jnp.int32)
  assert int(n_quantized(lengths, config)[0]) == c
  zeros = jnp.zeros((B,), jnp.int32)
  full = _append(_layer(small), k, v, zeros, lengths, config)
  big = kivi_jax.init_cache(_shape(), config, B, cap + 600)
  assert big.block_capacity > c
  ref = _append(_layer(big), k, v, zeros, lengths, config)
  a, b = _live(full, lengths, config), _live(ref, lengths, config)
  for key in a:
    want = b[key][:, :, :c] if key in ("k", "v", "k_codes", "v_codes") else b[key]
    np.testing.assert_array_equal(a[key], want, err_msg=key)


def test_nbytes_counts_every_array():
  shape = _shape(num_layers=4, num_kv_heads=8, head_dim=128, dtype="bfloat16")
  cache = kivi_jax.init_cache(shape, kivi_jax.PRESETS["kivi2"], 2, 4096)
  elems = 4 * 2 * 8 * 4096 * 128
  # Codes: 2 bits; scale and zero: 16 bits per 32 elements each -> 3 bits per element.
  block = 2 * elems * 3 // 8
  ring = 2 * 4 * 2 * 8 * 128 * 128 * 2
  assert cache.nbytes() == block + ring + 2 * 4
  fp = kivi_jax.init_cache(shape, kivi_jax.PRESETS["fp16"], 2, 4096)
  # fp16 keeps every token in the block; its ring has one (never live) slot.
  assert fp.nbytes() == 2 * elems * 2 + ring // 128 + 2 * 4
  assert kivi_jax.PRESETS["kivi2"].bits_per_element(16) == (3.0, 3.0)
  # g128 on 64-dim heads: values grouped over the head's 64 channels.
  assert kivi_jax.PRESETS["kivi2-g128"].bits_per_element(16, head_dim=64) == (2.25, 2.5)


def test_init_cache_validates():
  with pytest.raises(ValueError, match="group_size=64 must divide the head dim"):
    kivi_jax.init_cache(_shape(head_dim=96), kivi_jax.KIVIConfig(2, 2, 64, 128), 1, 64)
  with pytest.raises(ValueError, match="batch_size"):
    kivi_jax.init_cache(_shape(), kivi_jax.PRESETS["kivi2"], 0, 64)
  with pytest.raises(ValueError, match="max_length"):
    kivi_jax.init_cache(_shape(), kivi_jax.PRESETS["kivi2"], 1, -5)
  with pytest.raises(ValueError,
                     match=r"impl must be one of \('auto', 'reference', 'gpu', 'tpu'\)"):
    kivi_jax.init_cache(_shape(), kivi_jax.PRESETS["kivi2"], 1, 64, impl="cuda")
  with pytest.raises(TypeError, match="kv_config"):
    kivi_jax.init_cache(_shape(), {"k_bits": 2}, 1, 64)
  with pytest.raises(ValueError, match="dtype must be a floating-point type .* got int32"):
    kivi_jax.init_cache(_shape(), kivi_jax.PRESETS["kivi2"], 1, 64, dtype=jnp.int32)
  with pytest.raises(ValueError, match="calibration= is for SKVQ's configs"):
    kivi_jax.init_cache(_shape(), kivi_jax.PRESETS["kivi2"], 1, 64, calibration=object())
  with pytest.raises(ValueError, match="batch_size must be a positive integer, got True"):
    kivi_jax.init_cache(_shape(), kivi_jax.PRESETS["kivi2"], True, 64)
  with pytest.raises(ValueError, match=r"max_length must be a positive integer, got 64\.0"):
    kivi_jax.init_cache(_shape(), kivi_jax.PRESETS["kivi2"], 1, 64.0)


def test_init_cache_takes_numpy_integers():
  # A batch size or length read from an array is the same cache as a Python int.
  got = kivi_jax.init_cache(_shape(), kivi_jax.PRESETS["kivi2"], np.int64(2), np.int32(64))
  want = kivi_jax.init_cache(_shape(), kivi_jax.PRESETS["kivi2"], 2, 64)
  assert jax.tree.structure(got) == jax.tree.structure(want)
  assert [(x.shape, x.dtype) for x in jax.tree.leaves(got)] == \
      [(x.shape, x.dtype) for x in jax.tree.leaves(want)]


def test_cache_is_a_pytree_through_jit():
  cache = kivi_jax.init_cache(_shape(), CONFIGS["kivi2-g16-r32"], B, 64)
  leaves, treedef = jax.tree_util.tree_flatten(cache)
  again = jax.tree_util.tree_unflatten(treedef, leaves)
  assert again.config == cache.config
  bumped = jax.jit(lambda c: c.replace(lengths=c.lengths + 1))(cache)
  np.testing.assert_array_equal(bumped.lengths, 1)
  # The block is whole packing blocks (16 two-bit codes per word x groups of 16),
  # at least one; a row reaches it and the ring's 32 tokens.
  assert cache.block_capacity == 256 == cache_lib.block_granularity(cache.config)
  assert cache.capacity == 256 + 32


@pytest.mark.parametrize("max_length, capacity, k_rows, v_rows", [
    (1536, 1408, 96, 96), (300, 256, 32, 32), (1300, 1280, 96, 64)])
def test_skvq_tensors_do_not_pad_each_other(max_length, capacity, k_rows, v_rows):
  # SKVQ's layout with 2-bit keys (16 groups of 32 to a word row: 512 tokens)
  # and ternary values (20 groups: 640): the block holds what a row quantizes
  # (all but 97 to 128 of its tokens past the 5 sinks) in whole steps of 4
  # groups and of 128 tokens, each tensor's codes whole packing blocks of its
  # own, its scales (tokens last) exactly the block's capacity. (Both had been
  # rounded to 2560 tokens.)
  kv = dataclasses.replace(kivi_jax.get_preset("skvq-k2v1.5-g16-fp8"), reorder=False,
                           clip=0.9)
  cache = kivi_jax.init_cache(_shape(), kv, 1, max_length)
  layer = cache.layers[0]
  assert cache.block_capacity == capacity
  assert cache.capacity == capacity + kv.residual_length + kv.sinks >= max_length
  assert (layer.k.codes.shape[2], layer.v.codes.shape[2]) == (k_rows, v_rows)
  assert layer.k.scale.shape[3] == layer.v.zero.shape[3] == capacity
