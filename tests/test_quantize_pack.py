"""The quantize-and-pack kernel against its jnp reference, and inside the cache.

On a CPU the GPU kernel runs in Pallas interpret mode; on a GPU it is compiled.
The block it writes into already holds codes in other slots and sentinel
scales elsewhere: the kernel must leave them as they were (it writes through
`input_output_aliases`) and agree with the reference: bit for bit in
interpret mode; compiled on a GPU, scales and zeros bit for bit and codes
except at rounding ties (below). The reference runs on the CPU.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kivi_jax
from kivi_jax import quantization
from kivi_jax.cache import kernel_writes, n_quantized
from kivi_jax.config import codes_per_word
from pallas_kernels import quantize_pack as qp

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
    # start mid-tile and span tiles, rows writing nothing, and a run past the
    # capacity (its overflow dropped).
    (2, 32, "channel", 64, 32, (32 * 5, 0, 32 * 15), (32, 32, 0)),
    (2, 32, "token", 128, 32, (32 * 5, 0, 32 * 15), (32, 32, 32)),
    (2, 16, "channel", 32, 96, (16 * 14, 0, 16 * 3), (96, 64, 96)),
    (4, 32, "token", 64, 160, (32 * 6, 32, 0), (160, 96, 128)),
    (4, 64, "channel", 128, 128, (64 * 7, 64 * 2, 64 * 22), (128, 64, 128)),
    (8, 128, "token", 64, 256, (128 * 4, 0, 128), (256, 128, 0)),
    (8, 16, "channel", 256, 48, (16 * 3, 0, 16 * 4), (48, 16, 32)),
    (1.5, 16, "token", 32, 80, (16 * 18, 16 * 5, 0), (80, 32, 64)),
    (1.5, 32, "channel", 64, 64, (32 * 19, 0, 32 * 39), (64, 32, 64)),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"b{c[0]}-g{c[1]}-{c[2]}-d{c[3]}-n{c[4]}")
@pytest.mark.parametrize("dtype,clip,scale_dtype", [
    (jnp.float32, 1.0, None), (jnp.bfloat16, 0.9, None),
    (jnp.bfloat16, 1.0, jnp.float8_e4m3fn)])
def test_kernel_matches_reference(case, dtype, clip, scale_dtype):
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
  got = qp.quantize_pack(x, *block, start, n_tok, clip=clip, interpret=not ON_GPU, **kw)
  for name, a, b in zip(("scale", "zero"), got[1:], want[1:]):
    assert a.dtype == b.dtype and a.shape == b.shape, name
    np.testing.assert_array_equal(np.asarray(a).view(np.uint8), np.asarray(b).view(np.uint8),
                                  err_msg=name)
  _check_codes(got[0], want[0], x, want[1], want[2], case)
  # Something was written, and the rest of the block kept (not vacuous).
  assert not np.array_equal(np.asarray(got[0]), np.asarray(block[0]))


def _check_codes(got, want, x, scale, zero, case):
  """Codes equal, but on a GPU a code may sit one level off where the float32
  quotient (x - zero) / scale is within a few ulps of a half-integer: the
  compiled kernel divides in IEEE float32, while XLA appears to rewrite some of
  the reference's divisions as multiplications by a reciprocal (measured on an
  H100: 1 to 38 codes per case, at most 0.04%, each one level off; scales and
  zeros identical)."""
  bits, g, axis, d, n, starts, ntoks = case
  assert got.shape == want.shape and got.dtype == want.dtype
  a = np.asarray(quantization.unpack(got, bits, g)).astype(np.int64)
  b_ = np.asarray(quantization.unpack(want, bits, g)).astype(np.int64)
  bad = np.argwhere(a != b_)
  if not ON_GPU:
    assert bad.size == 0, bad[:5]
    return
  assert len(bad) <= 1e-3 * a.size, len(bad)
  x64, s64, z64 = (np.asarray(v, np.float64) for v in (x, scale, zero))
  cg = min(g, d)
  for row, head, tok, ch in bad:
    assert abs(a[row, head, tok, ch] - b_[row, head, tok, ch]) == 1
    si = (row, head, tok // g, ch) if axis == "channel" else (row, head, tok, ch // cg)
    y = (x64[row, head, tok - starts[row], ch] - z64[si]) / s64[si]
    assert abs(abs(y - np.floor(y)) - 0.5) < 1e-5 * max(1.0, abs(y)), (tok, ch, y)


def test_kernel_rejects_partial_groups():
  x = jnp.zeros((1, 1, 40, 32))
  words, scale, zero = jnp.zeros((1, 1, 32, 32), jnp.uint32), *[jnp.zeros((1, 1, 16, 32))] * 2
  with pytest.raises(ValueError, match="x has 40 tokens, not a multiple of group_size=32"):
    qp.quantize_pack(x, words, scale, zero, jnp.zeros(1, jnp.int32), jnp.ones(1, jnp.int32),
                     bits=2, group_size=32, axis="channel", interpret=True)


class _Shape:
  num_layers, num_kv_heads, head_dim, dtype = 1, 2, 64, "bfloat16"


@pytest.mark.parametrize("config", [kivi_jax.PRESETS["kivi2"], kivi_jax.PRESETS["kivi4"],
                                    kivi_jax.KIVIConfig(2, 1.5, 16, 32, sinks=3, clip=0.9),
                                    kivi_jax.KIVIConfig(8, 2, 64, 64)],
                         ids=["kivi2", "kivi4", "ternary-sinks-clip", "k8v2-g64"])
def test_cache_written_by_kernel_equals_reference(config):
  """A prefill then decode steps through `append`: the kernel's cache is the
  reference's, bit for bit (on a GPU, codes up to ties as in `_check_codes`)."""
  assert kernel_writes("gpu", config, _Shape.head_dim)
  rng = np.random.default_rng(0)
  lengths = np.array([300, 170, 5])
  k, v = (jnp.asarray(rng.standard_normal((B, 2, 330, 64)), jnp.bfloat16) for _ in "kv")
  append = jax.jit(kivi_jax.cache.append, static_argnames=("config", "impl"))

  def fill(impl):
    cache = kivi_jax.init_cache(_Shape(), config, B, 340, impl=impl)
    layer = jax.tree.map(lambda a: a[0], cache.layers)
    done = jnp.zeros(B, jnp.int32)
    for n in (jnp.asarray(lengths - 20), *[jnp.ones(B, jnp.int32)] * 20):
      t = int(n.max())
      idx = jnp.clip(done[:, None] + jnp.arange(t)[None, :], 0, 329)
      take = jax.vmap(lambda a, i: a[:, i])
      layer = append(layer, take(k, idx), take(v, idx), done, n, config, impl)
      done = done + n
    return layer, done

  out = {"gpu": fill("gpu")[0]}
  with jax.default_device(CPU):
    out["reference"], done = fill("reference")
  assert int(n_quantized(done, config).max()) > 0
  for a, b in zip(jax.tree.leaves(out["gpu"]), jax.tree.leaves(out["reference"])):
    if a.dtype == jnp.uint32 and ON_GPU:
      # Codes: at most a few one-level rounding-tie flips (`_check_codes`).
      bits = config.k_bits if a.shape == out["gpu"].k.codes.shape else config.v_bits
      diff = np.asarray(quantization.unpack(a, bits, config.group_size), np.int64) - \
          np.asarray(quantization.unpack(b, bits, config.group_size), np.int64)
      assert np.abs(diff).max() <= 1 and np.count_nonzero(diff) <= 1e-3 * diff.size
      continue
    np.testing.assert_array_equal(np.asarray(a).view(np.uint8), np.asarray(b).view(np.uint8))


def test_kernel_writes_dispatch():
  kivi2 = kivi_jax.PRESETS["kivi2"]
  assert kernel_writes("gpu", kivi2, 128)
  assert not kernel_writes("reference", kivi2, 128)
  assert not kernel_writes("tpu", kivi2, 128)  # the TPU writes through the reference
  assert not kernel_writes("gpu", kivi2, 96)  # not a Triton block
  assert not kernel_writes("gpu", kivi_jax.PRESETS["skvq-k2v2"], 64)  # SKVQ's layout
  assert not kernel_writes("auto", kivi2, 128)  # opt-in until exact when compiled
