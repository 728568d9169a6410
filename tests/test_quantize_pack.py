"""The quantize-and-pack kernel against its jnp reference, and inside the cache.

On a CPU the GPU kernel runs in Pallas interpret mode; on a GPU it is compiled.
The block it writes into already holds codes in other slots and sentinel
scales elsewhere: the kernel must leave them as they were (it writes through
`input_output_aliases`) and agree with the reference bit for bit, in interpret
mode and compiled (both divide in IEEE float32: `_divide`, and
`kivi_jax.quantization.quantize`). The reference runs on the CPU.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kivi_jax
from kivi_jax import quantization
from kivi_jax.cache import block_writer, n_quantized, write_kernel
from kivi_jax.config import codes_per_word
from kivi_jax.pallas_kernels import quantize_pack as qp
from kivi_jax.pallas_kernels import quantize_pack_tpu as qp_tpu
from conftest import CacheShape, tpu_interpret_params

ON_GPU = jax.default_backend() == "gpu"
CPU = jax.devices("cpu")[0]
B, H = 3, 2


def _on_cpu(fn, *args, **kwargs):
  with jax.default_device(CPU):
    return fn(*jax.device_put(args, CPU), **kwargs)


def _block(rng, bits, g, axis, d, capacity, starts, ntoks, dtype):
  """A block with random codes everywhere except the tokens about to be
  written (those slots are empty, as in a cache) and sentinel scales."""
  codes = rng.integers(0, quantization.levels(bits) + 1, (B, H, capacity, d), np.uint8)
  for b, (s, n) in enumerate(zip(starts, ntoks)):
    codes[b, :, s:s + n] = 0
  words = quantization.pack(jnp.asarray(codes), bits, g)
  shape = (B, H, capacity // g, d) if axis == "channel" else (B, H, capacity, d // min(g, d))
  return words, jnp.full(shape, 7.0, dtype), jnp.full(shape, -5.0, dtype)


CASES = [
    # (bits, group, axis, head dim, tokens offered, starts, counts): decode
    # flushes of one group into a non-first slot, prefills from 0, runs that
    # start mid-tile and span tiles, rows writing nothing, a run past the
    # capacity (its overflow dropped), and a whole block offered at once (more
    # tiles than the block holds).
    (2, 32, "channel", 64, 32, (32 * 5, 0, 32 * 15), (32, 32, 0)),
    (2, 32, "token", 128, 32, (32 * 5, 0, 32 * 15), (32, 32, 32)),
    (2, 16, "channel", 32, 96, (16 * 14, 0, 16 * 3), (96, 64, 96)),
    (4, 32, "token", 64, 160, (32 * 6, 32, 0), (160, 96, 128)),
    (4, 64, "channel", 128, 128, (64 * 7, 64 * 2, 64 * 22), (128, 64, 128)),
    (8, 128, "token", 64, 256, (128 * 4, 0, 128), (256, 128, 0)),
    (8, 16, "channel", 256, 48, (16 * 3, 0, 16 * 4), (48, 16, 32)),
    (1.5, 16, "token", 32, 80, (16 * 18, 16 * 5, 0), (80, 32, 64)),
    (1.5, 32, "channel", 64, 64, (32 * 19, 0, 32 * 39), (64, 32, 64)),
    (2, 16, "token", 64, 512, (0, 256, 16 * 5), (512, 256, 400)),
]

KERNELS = {"gpu": qp.quantize_pack, "tpu": qp_tpu.quantize_pack}


def _run_kernel(kernel, *args, **kwargs):
  """The `kernel` ("gpu" or "tpu") compiled on its own backend, else in
  interpret mode: the TPU interpreter with NaN-initialized memory (the output
  blocks start empty, so an element the kernel fails to write shows) and
  stray reads and races raising."""
  if kernel == "tpu":
    if ON_GPU:
      pytest.skip("TPU interpret mode is a CPU check")
    # Waited for: the interpreter's callbacks dispatch JAX work of their own.
    return jax.block_until_ready(KERNELS[kernel](*args, **kwargs, interpret=tpu_interpret_params()))
  return KERNELS[kernel](*args, **kwargs, interpret=not ON_GPU)


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"b{c[0]}-g{c[1]}-{c[2]}-d{c[3]}-n{c[4]}")
@pytest.mark.parametrize("dtype,clip,scale_dtype", [
    (jnp.float32, 1.0, None), (jnp.bfloat16, 0.9, None),
    (jnp.bfloat16, 1.0, jnp.float8_e4m3fn)])
@pytest.mark.parametrize("kernel", KERNELS)
def test_kernel_matches_reference(kernel, case, dtype, clip, scale_dtype):
  bits, g, axis, d, n, starts, ntoks = case
  rng = np.random.default_rng(CASES.index(case))
  capacity = 2 * codes_per_word(bits) * g
  x = rng.standard_normal((B, H, n, d)).astype(np.float32)
  x[..., 1] *= 30  # an outlier channel
  x[0, 1, :g] = 0.25  # a constant group: scale 0, dequantizes exactly
  x = jnp.asarray(x, dtype)
  block = _block(rng, bits, g, axis, d, capacity, starts, ntoks, scale_dtype or dtype)
  start, n_tok = jnp.asarray(starts, jnp.int32), jnp.asarray(ntoks, jnp.int32)
  kw = dict(bits=bits, group_size=g, axis=axis)
  want = _on_cpu(qp.quantize_pack_reference, x, *block, start, n_tok, clip, **kw)
  got = _run_kernel(kernel, x, *block, start, n_tok, clip=clip, **kw)
  for name, a, b in zip(("scale", "zero"), got[1:], want[1:]):
    assert a.dtype == b.dtype and a.shape == b.shape, name
    np.testing.assert_array_equal(np.asarray(a).view(np.uint8), np.asarray(b).view(np.uint8),
                                  err_msg=name)
  np.testing.assert_array_equal(np.asarray(got[0]), np.asarray(want[0]), err_msg="words")
  # Something was written, and the rest of the block kept (not vacuous).
  assert not np.array_equal(np.asarray(got[0]), np.asarray(block[0]))


PAIR_CASES = [
    # As CASES, in the pair layout (2/4/8 bits, groups up to a 128-token span,
    # head dims of whole spans or 64): flushes of one group into a span holding
    # others, prefills across spans, a run past the capacity (dropped).
    (2, 32, "channel", 128, 32, (160, 0, 480), (32, 32, 0)),
    (2, 32, "token", 128, 32, (160, 0, 480), (32, 32, 32)),
    (4, 16, "token", 256, 96, (16 * 14, 0, 48), (96, 64, 96)),
    (4, 64, "channel", 256, 192, (64 * 3, 0, 64 * 9), (192, 64, 192)),
    (8, 128, "channel", 128, 256, (128 * 4, 0, 128), (256, 128, 0)),
    (8, 32, "token", 128, 64, (32 * 7, 0, 32 * 30), (64, 32, 64)),
    (2, 64, "token", 128, 320, (0, 64 * 3, 64 * 12), (320, 128, 320)),
    # 64-wide heads (SmolLM2's): a key row of 64 columns packs alone.
    (2, 32, "channel", 64, 32, (160, 0, 480), (32, 32, 0)),
    (4, 64, "channel", 64, 192, (64 * 3, 0, 64 * 9), (192, 64, 192)),
    (8, 16, "channel", 64, 96, (16 * 14, 0, 48), (96, 64, 96)),
    (2, 128, "token", 64, 256, (128 * 4, 0, 128), (256, 128, 0)),
]


@pytest.mark.parametrize("case", PAIR_CASES,
                         ids=lambda c: f"b{c[0]}-g{c[1]}-{c[2]}-d{c[3]}-n{c[4]}")
@pytest.mark.parametrize("dtype,clip", [(jnp.float32, 1.0), (jnp.bfloat16, 0.9)])
def test_pair_kernel_matches_reference(case, dtype, clip):
  """The GPU's pair writer (interpret mode on a CPU) against the jnp pair
  writer, bit for bit, into a block already holding random codes elsewhere."""
  bits, g, axis, d, n, starts, ntoks = case
  rng = np.random.default_rng(PAIR_CASES.index(case))
  capacity = 1024
  codes = rng.integers(0, 2**bits, (B, H, capacity, d), np.uint8)
  for b, (s, k) in enumerate(zip(starts, ntoks)):
    codes[b, :, s:s + k] = 0  # the tokens about to be written are empty
  if axis == "channel":
    words, shape = quantization.pair_pack(jnp.asarray(codes), bits), (B, H, capacity // g, d)
  else:
    words = quantization.pair_pack(jnp.swapaxes(jnp.asarray(codes), 2, 3), bits)
    shape = (B, H, d // min(g, d), capacity)
  block = (words, jnp.full(shape, 7.0, dtype), jnp.full(shape, -5.0, dtype))
  x = rng.standard_normal((B, H, n, d)).astype(np.float32)
  x[..., 1] *= 30  # an outlier channel
  x[0, 1, :g] = 0.25  # a constant group
  x = jnp.asarray(x, dtype)
  start, n_tok = jnp.asarray(starts, jnp.int32), jnp.asarray(ntoks, jnp.int32)
  kw = dict(bits=bits, group_size=g, axis=axis)
  want = _on_cpu(qp.quantize_pack_pairs_reference, x, *block, start, n_tok, clip, **kw)
  got = qp.quantize_pack_pairs(x, *block, start, n_tok, clip=clip, **kw, interpret=not ON_GPU)
  for name, a, b in zip(("words", "scale", "zero"), got, want):
    assert a.dtype == b.dtype and a.shape == b.shape, name
    np.testing.assert_array_equal(np.asarray(a).view(np.uint8), np.asarray(b).view(np.uint8),
                                  err_msg=name)
  assert not np.array_equal(np.asarray(got[0]), np.asarray(block[0]))


def test_pair_kernel_names_what_it_cannot_write():
  x = jnp.zeros((1, 1, 256, 128))
  words, scale = jnp.zeros((1, 1, 128, 16), jnp.uint32), jnp.zeros((1, 1, 1, 512))
  with pytest.raises(ValueError, match="group_size=256, head_dim=128"):
    qp.quantize_pack_pairs(x, words, scale, scale, jnp.zeros(1, jnp.int32),
                           jnp.ones(1, jnp.int32), bits=2, group_size=256, axis="token")


@pytest.mark.parametrize("kernel", KERNELS)
def test_kernel_rejects_partial_groups(kernel):
  x = jnp.zeros((1, 1, 40, 32))
  words, scale, zero = jnp.zeros((1, 1, 32, 32), jnp.uint32), *[jnp.zeros((1, 1, 16, 32))] * 2
  with pytest.raises(ValueError, match="x has 40 tokens, not a multiple of group_size=32"):
    KERNELS[kernel](x, words, scale, zero, jnp.zeros(1, jnp.int32), jnp.ones(1, jnp.int32),
                    bits=2, group_size=32, axis="channel", interpret=True)


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"b{c[0]}-g{c[1]}-{c[2]}-d{c[3]}-n{c[4]}")
@pytest.mark.parametrize("dtype,scale_dtype", [(jnp.float32, None), (jnp.bfloat16, None),
                                               (jnp.bfloat16, jnp.float8_e4m3fn)])
def test_tpu_kernel_lowers_for_a_tpu(case, dtype, scale_dtype, tpu_lowering):
  """Pallas's TPU lowering (its block rules, which interpret mode does not
  apply) takes the writer for every case the interpret tests run."""
  bits, g, axis, d, n, starts, ntoks = case
  block = _block(np.random.default_rng(0), bits, g, axis, d, 2 * codes_per_word(bits) * g,
                 starts, ntoks, scale_dtype or dtype)
  f = jax.jit(lambda *a: qp_tpu.quantize_pack(*a, bits=bits, group_size=g, axis=axis,
                                              clip=0.9))
  lowered = f.trace(jnp.zeros((B, H, n, d), dtype), *block, jnp.asarray(starts, jnp.int32),
                    jnp.asarray(ntoks, jnp.int32)).lower(lowering_platforms=("tpu",))
  assert "tpu_custom_call" in lowered.as_text()


@pytest.mark.parametrize("layout", ["slots", "pairs"])
@pytest.mark.parametrize("axis", ["channel", "token"])
def test_gpu_kernels_lower_for_cuda_with_ieee_division(layout, axis):
  """Compiled, both GPU writers divide by PTX's `div.rn.f32` (Triton's `/` is
  approximate and moved codes by a level on an H100), lowered here for CUDA on
  the CPU; their GPU runs check the codes bit for bit."""
  g, d, capacity = 32, 128, 1024
  if axis == "channel":
    shape = (B, H, capacity // g, d)
  else:  # a scale per token and channel group, tokens last in the pair layout
    shape = (B, H, capacity, d // g) if layout == "slots" else (B, H, d // g, capacity)
  if layout == "slots":
    fn, words = qp.quantize_pack, jnp.zeros((B, H, capacity // 16, d), jnp.uint32)
  else:
    codes = jnp.zeros((B, H, capacity, d) if axis == "channel" else (B, H, d, capacity),
                      jnp.uint8)
    fn, words = qp.quantize_pack_pairs, quantization.pair_pack(codes, 2)
  scale = jnp.zeros(shape, jnp.bfloat16)
  f = jax.jit(lambda *a: fn(*a, bits=2, group_size=g, axis=axis, clip=1.0, interpret=False))
  text = f.trace(jnp.zeros((B, H, g, d), jnp.bfloat16), words, scale, scale,
                 jnp.zeros(B, jnp.int32), jnp.full(B, g, jnp.int32)).lower(
                     lowering_platforms=("cuda",)).as_text()
  assert "div.rn.f32" in text


def test_tpu_kernel_rejects_a_capacity_of_odd_spans():
  # 8-bit codes: 4 per word, so a span is 2 packing blocks of 4 x 16 tokens.
  x = jnp.zeros((1, 1, 16, 32))
  words, scale, zero = jnp.zeros((1, 1, 48, 32), jnp.uint32), *[jnp.zeros((1, 1, 12, 32))] * 2
  with pytest.raises(ValueError, match="block capacity 192 is not a multiple of 128 tokens"):
    qp_tpu.quantize_pack(x, words, scale, zero, jnp.zeros(1, jnp.int32),
                         jnp.ones(1, jnp.int32), bits=8, group_size=16, axis="channel",
                         interpret=True)


_SHAPE = CacheShape(num_kv_heads=2, head_dim=64, dtype="bfloat16")


@pytest.mark.parametrize("config", [kivi_jax.PRESETS["kivi2"], kivi_jax.PRESETS["kivi4"],
                                    kivi_jax.KIVIConfig(2, 1.5, 16, 32, sinks=3, clip=0.9),
                                    kivi_jax.KIVIConfig(8, 2, 64, 64)],
                         ids=["kivi2", "kivi4", "ternary-sinks-clip", "k8v2-g64"])
@pytest.mark.parametrize("kernel, layout", [("gpu", "slots"), ("gpu", "pairs"),
                                            ("tpu", "slots")])
def test_cache_written_by_kernel_equals_reference(kernel, layout, config):
  """A prefill then decode steps through `append`: the kernel's cache is the
  reference's in the same layout (given, not "auto", which picks the pair
  layout on a Hopper GPU and the slots on the CPU), bit for bit. Rows 0 and 1
  are prefilled to 4 tokens short of a flush (the last length at or below 300
  and 170 that moves `n_quantized`), so their fourth decode step flushes a
  group into the block; row 2 is empty until its decode steps."""
  if kernel == "tpu" and ON_GPU:
    pytest.skip("TPU interpret mode is a CPU check")
  if layout == "pairs" and config.v_bits not in quantization.PAIR_BITS:
    pytest.skip("the pair layout holds 2-, 4- and 8-bit codes")
  assert block_writer(kernel, config, _SHAPE.head_dim, layout) == kernel
  steps = 6
  flush_at = [max(t for t in range(1, top + 1)
                  if n_quantized(np.int32(t), config) > n_quantized(np.int32(t - 1), config))
              for top in (300, 170)]
  prefill = np.array([t - (steps - 2) for t in flush_at] + [0])
  rng = np.random.default_rng(0)
  k, v = (jnp.asarray(rng.standard_normal((B, 2, 330, 64)), jnp.bfloat16) for _ in "kv")
  append = jax.jit(kivi_jax.cache.append, static_argnames=("config", "impl"))

  def fill(impl):
    cache = kivi_jax.init_cache(_SHAPE, config, B, 340, impl=impl, layout=layout)
    layer = cache.layers[0]
    done = jnp.zeros(B, jnp.int32)
    for n in (jnp.asarray(prefill), *[jnp.ones(B, jnp.int32)] * steps):
      t = int(n.max())
      idx = jnp.clip(done[:, None] + jnp.arange(t)[None, :], 0, 329)
      take = jax.vmap(lambda a, i: a[:, i])
      # Waited for: the TPU interpreter's callbacks dispatch JAX work of their own.
      layer = jax.block_until_ready(
          append(layer, take(k, idx), take(v, idx), done, n, config, impl))
      done = done + n
    return layer, done

  out = {kernel: fill(kernel)[0]}
  with jax.default_device(CPU):
    out["reference"], done = fill("reference")
  # The prefill quantized tokens, and a decode step flushed more (rows 0 and 1).
  after_prefill = np.asarray(n_quantized(jnp.asarray(prefill), config))[:2]
  assert (after_prefill > 0).all()
  assert (np.asarray(n_quantized(done, config))[:2] > after_prefill).all()
  for a, b in zip(jax.tree.leaves(out[kernel]), jax.tree.leaves(out["reference"])):
    np.testing.assert_array_equal(np.asarray(a).view(np.uint8), np.asarray(b).view(np.uint8))


def test_write_kernel_dispatch(monkeypatch):
  kivi2 = kivi_jax.PRESETS["kivi2"]
  assert write_kernel("gpu", kivi2, 128) == "gpu"
  assert write_kernel("tpu", kivi2, 128) == "tpu"
  assert write_kernel("reference", kivi2, 128) is None
  assert write_kernel("gpu", kivi2, 96) is None  # not a Triton block
  assert write_kernel("tpu", kivi2, 96) == "tpu"
  assert write_kernel("gpu", kivi_jax.PRESETS["skvq-k2v2"], 64) is None  # SKVQ's layout
  assert write_kernel("tpu", kivi_jax.KIVIConfig(2, 2, 24, 48), 64) is None  # group 24
  # "auto": the backend's kernel, the reference on a CPU.
  for backend, which in (("gpu", "gpu"), ("tpu", "tpu"), ("cpu", None)):
    monkeypatch.setattr(jax, "default_backend", lambda backend=backend: backend)
    assert write_kernel("auto", kivi2, 128) == which
