"""Attention over the cache against float64 attention over the spec's dequantized keys."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kivi_jax
from kivi_jax.attention import (_cudnn_block_attention, _cudnn_reads_block, _ring_kernel_reads,
                                cache_attention, decode_attention, holds_every_token,
                                kernel_applies)
from kivi_jax.cache import append_flushing, n_quantized
import spec_reference
from test_cache import (B, CONFIGS, D, HKV, _append, _channel_maps, _fill, _kv, _layer, _shape,
                        spec_block)

_attend_jit = jax.jit(cache_attention, static_argnames=("config", "sliding_window", "impl"))
# RoPE frequencies (theta 10000) for configs that cache keys before RoPE.
INV_FREQ = 1.0 / 10000.0 ** (jnp.arange(0, D, 2, dtype=jnp.float32) / D)


def _attend(q, layer, k_new, v_new, lengths, n_new, config, window, impl="reference"):
  return _attend_jit(q, layer, k_new, v_new, lengths, n_new, config, window, impl,
                     INV_FREQ if config.pre_rope else None)


_append_flushing = jax.jit(append_flushing, static_argnames=("config", "impl"))
_decode_jit = jax.jit(decode_attention, static_argnames=("config", "sliding_window", "impl"))


def _decode(q, layer, flushed, lengths, n_new, config, window, impl):
  return _decode_jit(q, layer, flushed, lengths, n_new, config, window, impl,
                     INV_FREQ if config.pre_rope else None)


@pytest.mark.parametrize("rep", [1, 3])
@pytest.mark.parametrize("t_new", [1, 5])
@pytest.mark.parametrize("window", [None, 40])
@pytest.mark.parametrize("name", ["kivi2-g16-r32", "per-token-keys", "k8-v2-g32-r32", "fp16",
                                  "kivi2-g16-r0", "kivi2-g64-r64", "kivi2-clip",
                                  "kivi2-sinks", "skvq-3-groups", "skvq-ternary-sinks",
                                  "skvq-reorder-fp8", "kivi2-prerope-sinks", "skvq-prerope"])
def test_matches_float64_reference(name, window, t_new, rep):
  config = CONFIGS[name]
  hq = HKV * rep
  n = 90
  k, v = _kv(n + t_new, seed=5)
  lengths = np.array([90, 61, 3])
  layer, lens = _fill(config, k[:, :, :n], v[:, :, :n], lengths, chunk=n)
  # The new tokens are tokens lengths[b] .. of each row; row 2 has 2 real ones.
  n_new = np.array([t_new, t_new, min(t_new, 2)])
  k_new = jnp.stack([k[b, :, lengths[b]:lengths[b] + t_new] for b in range(B)])
  v_new = jnp.stack([v[b, :, lengths[b]:lengths[b] + t_new] for b in range(B)])
  q = jax.random.normal(jax.random.key(0), (B, t_new, hq, D), jnp.float32)
  out = _attend(q, layer, k_new, v_new, lens, jnp.asarray(n_new), config, window)

  nq = np.asarray(n_quantized(lens, config))
  maps = _channel_maps(layer, config)
  s = config.sinks
  for b in range(B):
    total = lengths[b] + n_new[b]
    kb, vb = (np.asarray(x[b, :, :total], np.float64) for x in (k, v))
    # Past the S sinks, the block's tokens as the spec quantizes them.
    blk = slice(s, s + nq[b])
    if config.k_bits < 16:
      kb[:, blk] = spec_block(kb[:, blk], config.k_bits, config.key_axis, config, maps["k"])
    if config.v_bits < 16:
      vb[:, blk] = spec_block(vb[:, blk], config.v_bits, config.value_axis, config,
                              maps["v"])
    qpos = lengths[b] + np.arange(n_new[b])
    kpos = np.arange(total)
    if config.pre_rope:
      # Cached before RoPE: the spec's dequantized keys, then rotated.
      kb = spec_reference.rope(kb, kpos)
    visible = kpos[None, :] <= qpos[:, None]
    if window is not None:
      visible &= kpos[None, :] > qpos[:, None] - window
    for h in range(hq):
      ref = spec_reference.attention(np.asarray(q[b, :n_new[b], h], np.float64),
                                     kb[h // rep], vb[h // rep], visible)
      # float32 scores and sums over <= 100 keys: errors ~1e-6 relative to |v|.
      np.testing.assert_allclose(np.asarray(out[b, :n_new[b], h]), ref, rtol=1e-4,
                                 atol=1e-4)
    assert np.isfinite(np.asarray(out[b])).all()


def test_quantization_changes_the_output():
  # Guards the test above against a cache that silently stays full precision.
  k, v = _kv(90, seed=5)
  lengths = np.array([90, 90, 90])
  q = jax.random.normal(jax.random.key(0), (B, 1, HKV, D), jnp.float32)
  outs = []
  for name in ("kivi2-g16-r32", "fp16"):
    layer, lens = _fill(CONFIGS[name], k[:, :, :89], v[:, :, :89], lengths - 1, chunk=89)
    outs.append(_attend(q, layer, k[:, :, 89:], v[:, :, 89:], lens, jnp.ones(B, jnp.int32),
                        CONFIGS[name], None))
  assert np.abs(np.asarray(outs[0]) - np.asarray(outs[1])).max() > 1e-3


# Where the GPU path reads the ring and the flushed group by
# `decode_attention_ring`'s kernel: no sinks, keys cached after RoPE.
RING_KERNEL = {"kivi2-g16-r32", "k8-v2-g32-r32", "kivi2-g16-r0", "kivi2-g64-r64", "kivi2-clip",
               "kivi2-ternary"}


@pytest.mark.parametrize("impl", ["gpu", "tpu"])
@pytest.mark.parametrize("rep", [1, 4, 7])
@pytest.mark.parametrize("window", [None, 50])
@pytest.mark.parametrize("name", ["kivi2-g16-r32", "k8-v2-g32-r32", "kivi2-g16-r0",
                                  "kivi2-g64-r64", "kivi2-clip", "kivi2-sinks",
                                  "kivi2-ternary", "skvq-reorder-fp8", "skvq-ternary-sinks",
                                  "kivi2-prerope-sinks", "skvq-prerope"])
def test_kernel_decode_matches_reference(name, window, rep, impl):
  if impl == "tpu" and jax.default_backend() == "gpu":
    pytest.skip("the TPU kernel runs on TPUs and in interpret mode on CPUs")
  config = CONFIGS[name]
  assert kernel_applies(config, D, HKV, impl)
  hq = HKV * rep
  k, v = _kv(300, seed=11)
  # Row 0's step flushes a group (read unquantized beside the ring), row 2 is
  # a finished row.
  nq = np.asarray(n_quantized(jnp.arange(301), config))  # per row length 0..300
  flushing = int(np.flatnonzero(np.diff(nq)).max())  # the last t with nq(t + 1) > nq(t)
  lengths = np.array([flushing, 150, 1])
  layer, lens = _fill(config, k, v, lengths, chunk=300)
  k_new = jnp.stack([k[b, :, lengths[b]:lengths[b] + 1] for b in range(B)])
  v_new = jnp.stack([v[b, :, lengths[b]:lengths[b] + 1] for b in range(B)])
  q = jax.random.normal(jax.random.key(rep), (B, 1, hq, D), jnp.float32)
  n_new = jnp.array([1, 1, 0])  # row 2 is a finished row feeding padding
  # The step's append once (its writes have tests of their own), then its
  # attention read by the kernel and by the reference.
  layer, flushed = _append_flushing(layer, k_new, v_new, lens, n_new, config, "reference")
  assert np.asarray(flushed[3][0]).any()
  ring_kernel = _ring_kernel_reads(impl, config, layer, flushed,
                                   INV_FREQ if config.pre_rope else None)
  assert ring_kernel == (impl == "gpu" and name in RING_KERNEL)
  ref = jax.block_until_ready(
      _decode(q, layer, flushed, lens, n_new, config, window, "reference"))
  # Waited on before any other dispatch: the TPU interpreter's callbacks issue
  # JAX ops of their own and can deadlock against concurrent work on a CPU.
  out = jax.block_until_ready(_decode(q, layer, flushed, lens, n_new, config, window, impl))
  # float32 throughout, so the bound is float32's own error: the kernel against
  # the same reference run in float64 (on the CPU), within 1e-5 or twice the
  # float32 reference's own distance from it where that is larger. (Scores
  # reach 35 with the keys' outlier channel: kivi2-prerope-sinks at rep 7 puts
  # the float32 reference 6e-6 from float64 and the TPU kernel, in interpret
  # mode, 9e-6 from it: 1.2e-5 apart.)
  cpu = jax.devices("cpu")[0]
  with jax.enable_x64(True), jax.default_device(cpu):
    to64 = lambda x: x.astype(jnp.float64) if x.dtype == jnp.float32 else x  # noqa: E731
    args64 = jax.device_put(jax.tree.map(to64, (q, layer, flushed)), cpu)
    ref64 = np.asarray(_decode(*args64, jax.device_put(lens, cpu),
                               jax.device_put(n_new, cpu), config, window, "reference"))[:2]
  assert ref64.dtype == np.float64
  atol = max(1e-5, 2 * np.abs(np.asarray(ref[:2]) - ref64).max())
  np.testing.assert_allclose(np.asarray(out[:2]), ref64, rtol=1e-5, atol=atol)
  assert np.isfinite(np.asarray(out)).all()


@pytest.mark.parametrize("impl", ["reference", "gpu"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("window", [None, 40])
@pytest.mark.parametrize("rep", [1, 3])
def test_decode_over_a_block_holding_every_token(rep, window, dtype, impl):
  # The fp16 preset (groups of one, no ring): a decode step writes the new token
  # into the block and reads the block alone through it, nothing merged (by jnp
  # with "reference"; with "gpu", by decode_attention_dense's kernel, in
  # interpret mode on a CPU, where cuDNN does not apply).
  # On a GPU cuDNN, which reads the block for larger batches, is checked too.
  config = kivi_jax.PRESETS["fp16"]
  assert holds_every_token(config) and not holds_every_token(CONFIGS["fp16"])
  hq = HKV * rep
  k, v = (x.astype(dtype) for x in _kv(91, seed=7))
  lengths = jnp.array([90, 61, 5], jnp.int32)
  cache = kivi_jax.init_cache(_shape(dtype=dtype), config, B, 91)
  layer = _append(_layer(cache), k[:, :, :90], v[:, :, :90], jnp.zeros(B, jnp.int32),
                  lengths, config)
  k_new = jnp.stack([k[b, :, lengths[b]:lengths[b] + 1] for b in range(B)])
  v_new = jnp.stack([v[b, :, lengths[b]:lengths[b] + 1] for b in range(B)])
  n_new = jnp.array([1, 0, 1], jnp.int32)  # row 1 finished: its output is unused
  q = jax.random.normal(jax.random.key(rep), (B, 1, hq, D), dtype)
  layer, flushed = _append_flushing(layer, k_new, v_new, lengths, n_new, config, "auto")
  outs = [_decode(q, layer, flushed, lengths, n_new, config, window, impl)]
  if impl == "gpu" and _cudnn_reads_block(impl, config, q.dtype, window):
    o, _ = _cudnn_block_attention(q, layer, n_quantized(lengths + n_new, config),
                                  with_lse=False)
    outs.append(o.reshape(B, 1, hq, D))
  for out, b in itertools.product(outs, (0, 2)):
    total = int(lengths[b]) + 1
    kb, vb = (np.asarray(x[b, :, :total].astype(jnp.float32), np.float64) for x in (k, v))
    visible = np.ones((1, total), bool)
    if window is not None:
      visible[:, :max(total - window, 0)] = False
    for h in range(hq):
      ref = spec_reference.attention(np.asarray(q[b, :, h].astype(jnp.float32), np.float64),
                                     kb[h // rep], vb[h // rep], visible)
      # float32: summation order. bf16: the probabilities rounded for the values'
      # product (2^-9 relative each) and the output rounded (2^-9).
      tol = 1e-5 if dtype == "float32" else 2**-8
      np.testing.assert_allclose(np.asarray(out[b, 0, h].astype(jnp.float32)), ref[0],
                                 rtol=tol, atol=tol * np.abs(vb).max())


@pytest.mark.parametrize("window", [None, 9])
@pytest.mark.parametrize("rep", [1, 3])
def test_prompt_attention_equals_attention_over_an_empty_cache(rep, window):
  # In query chunks of 7 (and one of 40): the same as the cache's reference
  # attention of the whole prompt into an empty cache, rows padded at the end.
  from kivi_jax.attention import prompt_attention
  config = CONFIGS["fp16"]
  t, hq = 40, HKV * rep
  k, v = _kv(t, seed=3)
  q = jax.random.normal(jax.random.key(3), (B, t, hq, D), jnp.float32)
  n_valid = jnp.array([40, 17, 1])
  layer, lens = _fill(config, k[:, :, :1], v[:, :, :1], np.zeros(B, int), chunk=1)
  ref = _attend(q, layer, k, v, lens, n_valid, config, window)
  for chunk in (7, 40):
    out = prompt_attention(q, k.swapaxes(1, 2), v.swapaxes(1, 2), n_valid, window,
                           query_chunk=chunk)
    # Both float32, summed in another order over at most 40 keys (seen: 1.2e-6).
    for b in range(B):
      np.testing.assert_allclose(np.asarray(out[b, :n_valid[b]]),
                                 np.asarray(ref[b, :n_valid[b]]), rtol=1e-5, atol=1e-5)
