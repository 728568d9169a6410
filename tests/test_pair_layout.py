"""The pair layout (`init_cache(layout="pairs")`): codes packed along the axis
Hopper's `wgmma` contracts. Its cache holds exactly the slot layout's codes,
scales and zeros (SPEC.md's), so every reader sees the same keys and values."""

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kivi_jax
from conftest import CacheShape, tiny_hf_model, tiny_llama_config
from kivi_jax import attention, checkpoint, quantization
from kivi_jax.cache import append, append_flushing, n_quantized
import spec_reference

B, HKV, D = 3, 2, 128


def _shape(**kw):
  return CacheShape(**{"num_kv_heads": HKV, "head_dim": D, **kw})


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_pair_pack_puts_each_code_where_the_layout_says(bits):
  rng = np.random.default_rng(bits)
  codes = rng.integers(0, 2**bits, (3, 2 * 128)).astype(np.uint32)
  words = np.asarray(quantization.pair_pack(jnp.asarray(codes), bits))
  assert words.shape == (3, 2 * 4 * bits) and words.dtype == np.uint32
  p = 16 // bits
  expected = np.zeros_like(words)
  for span in range(2):
    for c in range(128):  # c = 16 s + 8 h + 2 j + e
      s, h, j, e = c // 16, c // 8 % 2, c // 2 % 4, c % 2
      word = span * 4 * bits + 8 * (s // p) + 2 * j + h
      expected[:, word] |= codes[:, span * 128 + c] << (bits * (s % p) + 16 * e)
  np.testing.assert_array_equal(words, expected)
  np.testing.assert_array_equal(quantization.pair_unpack(jnp.asarray(words), bits), codes)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_pair_pack_puts_a_64_column_rows_codes_where_the_layout_says(bits):
  """64-wide heads' key rows: column 8 t + 2 j + e in word 4 (t // p) + j at
  bit b (t % p) + 16 e (a thread's words when read as 16-bit halves)."""
  rng = np.random.default_rng(bits)
  codes = rng.integers(0, 2**bits, (5, 64)).astype(np.uint32)
  words = np.asarray(quantization.pair_pack(jnp.asarray(codes), bits))
  assert words.shape == (5, 2 * bits)
  p = 16 // bits
  expected = np.zeros_like(words)
  for c in range(64):
    t, j, e = c // 8, c // 2 % 4, c % 2
    expected[:, 4 * (t // p) + j] |= codes[:, c] << (bits * (t % p) + 16 * e)
  np.testing.assert_array_equal(words, expected)
  np.testing.assert_array_equal(quantization.pair_unpack(jnp.asarray(words), bits), codes)


def test_pair_pack_refuses_what_it_cannot_hold():
  with pytest.raises(ValueError, match="64 or a multiple of 128"):
    quantization.pair_pack(jnp.zeros((2, 192), jnp.uint32), 2)
  with pytest.raises(ValueError, match="pair layout holds"):
    quantization.pair_pack(jnp.zeros((2, 128), jnp.uint32), 3)


CONFIGS = {
    "kivi2-g32-r32": kivi_jax.KIVIConfig(2, 2, 32, 32),
    "kivi4-g64-r128": kivi_jax.KIVIConfig(4, 4, 64, 128),
    "k8-v2-g32-r0": kivi_jax.KIVIConfig(8, 2, 32, 0),
    "k2-v16": kivi_jax.KIVIConfig(2, 16, 32, 32),
    "per-token-keys": kivi_jax.KIVIConfig(2, 2, 32, 32, key_axis="token",
                                          value_axis="channel"),
    "clip-sinks": kivi_jax.KIVIConfig(2, 2, 32, 32, clip=0.9, sinks=3),
}


def _kv(n, seed=0, d=D):
  rng = np.random.default_rng(seed)
  k = rng.standard_normal((B, HKV, n, d)).astype(np.float32)
  k[..., 5] *= 30  # an outlier channel
  return jnp.asarray(k), jnp.asarray(rng.standard_normal((B, HKV, n, d)), jnp.float32)


def _fill(config, layout, k, v, lengths, chunk):
  """Row b's first lengths[b] tokens appended `chunk` at a time."""
  layer = kivi_jax.init_cache(_shape(head_dim=k.shape[-1]), config, B, 400,
                              impl="reference", layout=layout).layers[0]
  done = jnp.zeros((B,), jnp.int32)
  for start in range(0, k.shape[2], chunk):
    n_new = jnp.clip(jnp.asarray(lengths) - start, 0, chunk).astype(jnp.int32)
    sl = slice(start, start + chunk)
    layer = append(layer, k[:, :, sl], v[:, :, sl], done, n_new, config, "reference")
    done = done + n_new
  return layer, done


def _pair_blocks_as_slots(slots, pairs, config, nq):
  """Asserts the pair layout's blocks hold the slot layout's codes, scales and
  zeros (16-bit tensors as they are); returns each quantized tensor's `(codes,
  scale, zero)` of the pair layout, tokens along axis -2. The pair layout's
  block is the smaller (whole spans, not the slots' TPU write spans:
  `block_capacity`); the slots' tokens past it were never written."""
  out = {}
  for tensor, bits, axis in (("k", config.k_bits, config.key_axis),
                             ("v", config.v_bits, config.value_axis)):
    a, b = getattr(slots, tensor), getattr(pairs, tensor)
    if bits == 16:
      n_codes = b.codes.shape[-2]
      assert not np.asarray(a.codes[..., n_codes:, :]).any()
      np.testing.assert_array_equal(a.codes[..., :n_codes, :], b.codes)
      continue
    assert b.layout == "pairs"
    codes = quantization.pair_unpack(b.codes, bits)
    scale, zero = b.scale, b.zero
    if axis == "token":
      codes, scale, zero = (jnp.swapaxes(x, -1, -2) for x in (codes, scale, zero))
    slot_codes = quantization.unpack(a.codes, bits, config.group_size)
    n_codes, n_scales = codes.shape[-2], scale.shape[-2]
    assert np.asarray(nq).max() <= n_codes < slot_codes.shape[-2]
    assert not np.asarray(slot_codes[..., n_codes:, :]).any()
    np.testing.assert_array_equal(codes, slot_codes[..., :n_codes, :])
    np.testing.assert_array_equal(scale, a.scale[..., :n_scales, :])
    np.testing.assert_array_equal(zero, a.zero[..., :n_scales, :])
    out[tensor] = codes, scale, zero
  return out


@pytest.mark.parametrize("name, chunk, d", [
    *((name, chunk, D) for name in CONFIGS for chunk in (1, 97, 300)),
    *((name, 97, 64) for name in CONFIGS)])  # 64-wide heads (SmolLM2's)
def test_pairs_hold_the_slot_layouts_codes_scales_and_zeros(name, chunk, d):
  config = CONFIGS[name]
  k, v = _kv(300, d=d)
  lengths = [300, 233, 199]
  slots, n_a = _fill(config, "slots", k, v, lengths, chunk)
  pairs, n_b = _fill(config, "pairs", k, v, lengths, chunk)
  np.testing.assert_array_equal(n_a, n_b)
  nq = np.asarray(n_quantized(n_a, config))
  assert nq.min() > 0
  blocks = _pair_blocks_as_slots(slots, pairs, config, nq)
  for tensor, bits, axis in (("k", config.k_bits, config.key_axis),
                             ("v", config.v_bits, config.value_axis)):
    if bits == 16:
      continue
    codes, scale, zero = blocks[tensor]
    # And against SPEC.md's formulas in float64: each row's oldest tokens. As in
    # test_quantization, a code may be one step off only on a .5 tie within
    # float32 rounding, a vanishing fraction of them.
    x = np.asarray(k if tensor == "k" else v)
    s, g = config.sinks, config.group_size
    for row in range(B):
      q_ref, s_ref, z_ref, _ = spec_reference.quantize(x[row, :, s:s + nq[row]], bits, g,
                                                       axis, config.clip)
      n_s = nq[row] // g if axis == "channel" else nq[row]
      diff = np.abs(np.asarray(codes[row, :, :nq[row]], np.int64) - q_ref)
      assert diff.max() <= 1 and diff.mean() < 1e-3
      np.testing.assert_allclose(scale[row, :, :n_s], s_ref, rtol=1e-6)
      np.testing.assert_allclose(zero[row, :, :n_s], z_ref, rtol=1e-6)
  np.testing.assert_array_equal(slots.ring_k, pairs.ring_k)
  np.testing.assert_array_equal(slots.ring_v, pairs.ring_v)


@pytest.mark.parametrize("impl", ["reference", "gpu"])
def test_a_row_fills_the_pair_block_to_the_capacity(impl):
  """A row of `capacity` tokens fills the pair layout's block (1024 + 512 tokens
  a row: 1408 quantized, `block_capacity`), every token where the slot layout's
  larger block holds it; written by the jnp writer and by the GPU's (interpret
  mode on a CPU)."""
  config = kivi_jax.KIVIConfig(2, 2, 32, 128)
  pairs = kivi_jax.init_cache(_shape(), config, B, 1536, impl=impl, layout="pairs")
  cap, c = pairs.capacity, pairs.block_capacity
  assert (c, cap) == (1408, 1536)
  k, v = _kv(cap, seed=4)
  lengths = jnp.asarray([cap, cap - 1, 1000], jnp.int32)
  nq = np.asarray(n_quantized(lengths, config))
  assert nq[0] == c
  zeros = jnp.zeros((B,), jnp.int32)
  slots = kivi_jax.init_cache(_shape(), config, B, 1536, impl="reference", layout="slots")
  a = append(slots.layers[0], k, v, zeros, lengths, config, "reference")
  b = append(pairs.layers[0], k, v, zeros, lengths, config, impl)
  _pair_blocks_as_slots(a, b, config, nq)
  np.testing.assert_array_equal(a.ring_k, b.ring_k)
  np.testing.assert_array_equal(a.ring_v, b.ring_v)


@pytest.mark.parametrize("impl", ["reference", "gpu"])
def test_decode_attention_over_pairs_equals_over_slots(impl):
  config = CONFIGS["kivi2-g32-r32"]
  k, v = _kv(260, seed=1)
  lengths = jnp.asarray([260, 190, 70], jnp.int32)
  slots, _ = _fill(config, "slots", k, v, np.asarray(lengths), 260)
  pairs, _ = _fill(config, "pairs", k, v, np.asarray(lengths), 260)
  rng = np.random.default_rng(2)
  q = jnp.asarray(rng.standard_normal((B, 1, 2 * HKV, D)), jnp.float32)
  k1, v1 = (jnp.asarray(rng.standard_normal((B, HKV, 1, D)), jnp.float32) for _ in range(2))
  ones = jnp.ones((B,), jnp.int32)
  out = {}
  for layout, layer in (("slots", slots), ("pairs", pairs)):
    appended, flushed = append_flushing(layer, k1, v1, lengths, ones, config, impl)
    out[layout] = attention.decode_attention(q, appended, flushed, lengths, ones, config,
                                             impl=impl)
  # The reference reads both alike; with a GPU kernel named, the slots are read
  # by it (interpret mode) and the pairs by jnp.
  tol = 0 if impl == "reference" else 2e-5
  np.testing.assert_allclose(out["pairs"], out["slots"], rtol=tol, atol=tol)


@pytest.fixture(scope="module", params=[128, 64])
def model(tmp_path_factory, request):
  """A tiny Llama whose heads are 128 wide (the pair layout's span) or 64 (its
  key rows packed alone)."""
  d = request.param
  path = tmp_path_factory.mktemp(f"model{d}")
  tiny_hf_model(tiny_llama_config(hidden_size=2 * d, num_attention_heads=2,
                                  num_key_value_heads=1)).save_pretrained(path)
  model = kivi_jax.load_model(path)
  assert model.config.head_dim == d
  return model


def _prefilled(model, layout):
  rng = np.random.default_rng(5)
  ids, mask = np.zeros((3, 150), np.int32), np.zeros((3, 150), np.int32)
  for row, n in enumerate((150, 97, 20)):
    ids[row, 150 - n:], mask[row, 150 - n:] = rng.integers(0, 256, n), 1
  cache = kivi_jax.init_cache(model.config, CONFIGS["kivi2-g32-r32"], 3, 256, layout=layout)
  logits, cache = model.prefill(model.params, ids, cache, mask)
  return logits, cache


def test_a_model_decodes_the_same_logits_from_either_layout(model):
  logits, caches = {}, {}
  for layout in ("slots", "pairs"):
    first, cache = _prefilled(model, layout)
    tok, steps = jnp.argmax(first, -1)[:, None].astype(jnp.int32), [first]
    for _ in range(40):  # flushes a group or more in every row
      out, cache = model.forward(model.params, tok, cache)
      steps.append(out[:, -1])
      tok = jnp.argmax(out[:, -1], -1)[:, None].astype(jnp.int32)
    logits[layout], caches[layout] = np.stack(steps), cache
  assert caches["pairs"].layout == "pairs" and caches["slots"].layout == "slots"
  np.testing.assert_array_equal(logits["pairs"], logits["slots"])


def test_a_saved_pair_cache_restores_in_its_layout(model, tmp_path):
  _, cache = _prefilled(model, "pairs")
  path = checkpoint.save_cache(tmp_path / "pairs", cache, model)
  assert checkpoint.cache_info(path)["layout"] == "pairs"
  restored = checkpoint.restore_cache(path, model)
  assert restored.layout == "pairs"
  assert jax.tree.structure(restored) == jax.tree.structure(cache)
  for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(cache)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_a_checkpoint_naming_an_unknown_layout_is_refused(model, tmp_path):
  _, cache = _prefilled(model, "pairs")
  path = checkpoint.save_cache(tmp_path / "pairs", cache, model)
  meta = path / checkpoint.META
  meta.write_text(meta.read_text().replace('"layout": "pairs"', '"layout": "tiles"'))
  with pytest.raises(ValueError, match="damaged.*tiles"):
    checkpoint.restore_cache(path, model)


@pytest.mark.parametrize("kw, match", [
    (dict(layout="tiles"), "layout must be one of"),
    (dict(shape=_shape(head_dim=96)), "head_dim=96"),
    (dict(config=kivi_jax.KIVIConfig(2, 1.5, 32, 32)), "v_bits=1.5"),
    (dict(config=kivi_jax.KIVIConfig(2, 2, 16, 32, key_axis="token", value_axis="token",
                                     channel_group=16)), "channel_group"),
])
def test_init_cache_names_what_the_pair_layout_cannot_hold(kw, match):
  shape = kw.pop("shape", _shape())
  config = kw.pop("config", CONFIGS["kivi2-g32-r32"])
  with pytest.raises(ValueError, match=match):
    kivi_jax.init_cache(shape, config, 1, 128, **{"layout": "pairs", **kw})


@pytest.mark.parametrize("config, max_length, block", [
    (kivi_jax.KIVIConfig(8, 8, 32, 32), 130, 256),      # at least one kernel step
    (kivi_jax.KIVIConfig(2, 2, 32, 128), 1536, 1408),   # 1024 + 512: 11 spans
    (kivi_jax.KIVIConfig(2, 2, 32, 128), 1537, 1536),   # one group more
    (kivi_jax.KIVIConfig(4, 4, 256, 0), 1000, 768),     # whole groups of 256
    (kivi_jax.KIVIConfig(2, 2, 512, 512), 1200, 1024)])  # and of 512: a step each
def test_pair_block_is_what_a_row_quantizes_in_whole_spans(config, max_length, block):
  """The pair layout's block holds what a row of `max_length` tokens quantizes
  (the ring keeps the newest 97 to 128 of 1536), rounded up to spans of 128
  tokens and groups, at least the kernel's step; a row reaches the block and
  the ring's `R` (or `G - 1`)."""
  cache = kivi_jax.init_cache(_shape(), config, 1, max_length, layout="pairs")
  assert cache.block_capacity == block
  assert cache.capacity == block + (config.residual_length or config.group_size - 1)
  assert cache.capacity >= max_length
  assert cache.layers[0].v.codes.shape[-1] == block * config.v_bits // 32
  assert cache.layers[0].k.scale.shape[-2] == block // config.group_size


def test_auto_layout_is_pairs_exactly_where_the_hopper_kernel_reads_it(monkeypatch):
  """`init_cache(layout="auto")`: the pair layout where `decode_attention_pairs`
  reads the cache (here a Hopper GPU is pretended), the slots everywhere else."""
  from kivi_jax import cache as cache_mod
  from kivi_jax.pallas_kernels import decode_attention_pairs
  kivi2 = kivi_jax.PRESETS["kivi2"]
  shape = lambda **kw: CacheShape(**{"num_kv_heads": 2, "head_dim": 128,  # noqa: E731
                                     "dtype": "bfloat16", **kw})

  def layout(shape, config=kivi2, impl="gpu", **kw):
    return kivi_jax.init_cache(shape, config, 1, 64, impl=impl, **kw).layout
  assert layout(shape()) == "slots"  # no Hopper GPU here
  monkeypatch.setattr(decode_attention_pairs, "hopper", lambda: True)
  assert layout(shape()) == "pairs"
  assert layout(shape(), layout="slots") == "slots"
  assert layout(shape(), impl="reference") == "slots"
  assert layout(shape(dtype="float32")) == "slots"
  assert layout(shape(head_dim=64)) == "pairs"  # SmolLM2's heads
  assert layout(shape(head_dim=96)) == "slots"
  assert layout(shape(), config=kivi_jax.KIVIConfig(2, 2, 32, 32, pre_rope=True)) == "slots"
  assert layout(shape(), config=kivi_jax.KIVIConfig(2, 1.5, 32, 32)) == "slots"  # ternary
  assert cache_mod.resolve_layout("auto", shape(), kivi2, "gpu", jnp.bfloat16,
                                  mesh=object()) == "slots"
  # 17 query rows a kv head are more than the kernel's 16.
  assert cache_mod.resolve_layout("auto", types.SimpleNamespace(
      num_heads=34, num_kv_heads=2, head_dim=128), kivi2, "gpu", jnp.bfloat16) == "slots"
  assert cache_mod.resolve_layout("auto", types.SimpleNamespace(
      num_heads=32, num_kv_heads=2, head_dim=128), kivi2, "gpu", jnp.bfloat16) == "pairs"
