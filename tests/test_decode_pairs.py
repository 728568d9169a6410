"""The pair layout's Mosaic GPU decode kernel (`decode_attention_pairs`).

It is compiled only (inline PTX, `wgmma` operands from registers: no interpret
mode): on a CPU it is lowered for CUDA for every shape it reads and its step
ranges are checked against brute force; on a Hopper GPU its partials, merged,
are checked against SPEC's attention in float64.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kivi_jax
from conftest import CacheShape
from kivi_jax import attention, quantization
from kivi_jax.cache import append, append_flushing
from kivi_jax.pallas_kernels import decode_attention as da
from kivi_jax.pallas_kernels import decode_attention_pairs as dp
import spec_reference

ON_HOPPER = dp.hopper()
BITS = [(2, 2), (4, 4), (8, 8), (2, 4), (8, 2)]
# Groups of 512 tokens take 512-token steps (`step_tokens`); 8-bit codes stop at 256.
CASES = [(kb, vb, g) for kb, vb in BITS for g in (16, 32, 128)] + [(2, 2, 512), (4, 4, 512)]
D = dp.HEAD_DIM


def _shapes(b, kv_heads, rows, capacity, k_bits, v_bits, g, d=D):
  """The kernel's arguments as shapes: `pair_decode_partials`' docstring."""
  cg = min(g, d)
  sd = jax.ShapeDtypeStruct
  bf = jnp.bfloat16
  return (sd((b, kv_heads, rows, d), bf),
          sd((b, kv_heads, capacity, d * k_bits // 32), jnp.uint32),
          *2 * [sd((b, kv_heads, capacity // g, d), bf)],
          sd((b, kv_heads, d, capacity * v_bits // 32), jnp.uint32),
          *2 * [sd((b, kv_heads, d // cg, capacity), bf)],
          sd((b,), jnp.int32), sd((b,), jnp.int32))


@pytest.mark.parametrize("rows, d", [(1, D), (4, D), (12, D), (16, D), (3, 64), (16, 64)])
@pytest.mark.parametrize("k_bits, v_bits, g", CASES)
def test_kernel_lowers_for_cuda(k_bits, v_bits, g, rows, d):
  """Every shape the kernel claims to read traces and lowers to Mosaic GPU
  (what a CPU can check of a kernel it cannot run)."""
  assert dp.applies(k_bits, v_bits, g, d, rows, jnp.bfloat16, jnp.bfloat16)
  f = jax.jit(lambda *a: dp.pair_decode_partials(*a, k_bits=k_bits, v_bits=v_bits,
                                                 group_size=g, splits=3))
  text = f.trace(*_shapes(2, 2, rows, 2048, k_bits, v_bits, g, d)).lower(
      lowering_platforms=("cuda",)).as_text()
  assert "mosaic_gpu" in text
  # One query row a kv head: the scores, then the values, in two kernels.
  kernels = {"kivi_pair_scores", "kivi_pair_values", "kivi_pair_decode_attention"}
  want = ({"kivi_pair_scores", "kivi_pair_values"} if dp.folds(k_bits, v_bits, g, d, rows)
          else {"kivi_pair_decode_attention"})
  assert {k for k in kernels if k in text} == want


@pytest.mark.parametrize("rows", [1, 4])
@pytest.mark.parametrize("k_bits, v_bits, g", [(2, 2, 32), (4, 4, 128), (8, 2, 16)])
def test_kernel_lowers_for_a_block_ending_in_a_partial_step(k_bits, v_bits, g, rows):
  """A block of 1408 tokens (`kivi_jax.cache.block_capacity` at 1024 + 512):
  5.5 steps of 256, the last read past the block's end."""
  f = jax.jit(lambda *a: dp.pair_decode_partials(*a, k_bits=k_bits, v_bits=v_bits,
                                                 group_size=g))
  lowered = f.trace(*_shapes(2, 2, rows, 1408, k_bits, v_bits, g)).lower(
      lowering_platforms=("cuda",))
  assert "mosaic_gpu" in lowered.as_text()


@pytest.mark.parametrize("fp16", [False, True])
@pytest.mark.parametrize("bits", [2, 4])
def test_unpack_plan_gives_every_code_exactly(bits, fp16):
  """`lop3` under each place's plan then the subtraction of its base, done bit for
  bit in numpy on words holding every code at every place: each half reads as its
  code, exact. And the shifts the plan shares: 2-bit codes take three a word in
  bf16 and two in fp16 (the first of them none) where each place once had its own."""
  rng = np.random.default_rng(0)
  words = rng.integers(0, 2**32, size=4096, dtype=np.uint64).astype(np.uint32)
  words[:2**bits] = np.uint32(0x10001) * np.arange(2**bits, dtype=np.uint32)  # (c, c)
  words[2**bits:2**(bits + 1)] = ~words[:2**bits]
  plan = dp.unpack_plan(bits, fp16)
  assert len(plan) == 16 // bits

  def as_float(half):  # uint32 holding a 16-bit pattern -> float64
    if fp16:
      return half.astype(np.uint16).view(np.float16).astype(np.float64)
    return (half << np.uint32(16)).view(np.float32).astype(np.float64)

  for place, (shift, mask, base) in enumerate(plan):
    t = ((words >> np.uint32(shift)) & np.uint32(mask)) | np.uint32(base)
    for e in (0, 1):
      code = (words >> np.uint32(bits * place + 16 * e)) & np.uint32(2**bits - 1)
      got = as_float((t >> np.uint32(16 * e)) & np.uint32(0xFFFF))
      got -= as_float(np.array([base >> 16 * e], np.uint32) & np.uint32(0xFFFF))
      np.testing.assert_array_equal(got, code.astype(np.float64), err_msg=f"{place=} {e=}")
  shifts = sorted({shift for shift, _, _ in plan})
  assert shifts == {(2, False): [0, 6, 12], (2, True): [0, 10], (4, False): [0, 4, 8, 12],
                    (4, True): [0, 8]}[bits, fp16]


@pytest.mark.parametrize("step", [256, 512])
def test_split_steps_are_the_steps_with_live_tokens(step):
  n_steps, splits = 9, 4
  per = -(-n_steps // splits)
  for n_valid in range(0, n_steps * step + 1, 96):
    for lo in (0, 1, step - 1, step, 3 * step + 17, n_valid, n_valid + 5):
      seen = []
      for s in range(splits):
        first, count = map(int, dp.split_steps(jnp.int32(s), jnp.int32(n_valid),
                                               jnp.int32(lo), per, step))
        assert count >= 0  # and where it reads, only its own range:
        assert not count or s * per <= first and first + count <= (s + 1) * per
        seen += range(first, first + count)
      live = [i for i in range(n_steps)
              if max(i * step, lo) < min((i + 1) * step, n_valid)]
      assert seen == live, (n_valid, lo)


@pytest.mark.parametrize("blocks", [2, 3])
def test_default_splits_fill_one_wave_of_blocks(blocks):
  """As many programs as an H200's 132 SMs run at once (`blocks` each), no more:
  P1's 64 rows x heads take 4 splits at two blocks an SM, 6 at three; a split
  holds a step at least; a batch beyond a wave takes one split."""
  slots = 132 * blocks
  for b, kh in [(8, 8), (1, 8), (3, 8), (1, 1), (32, 32), (256, 32), (5, 2)]:
    for n_steps in (1, 3, 128, 4096):
      splits = dp.default_splits(b, kh, n_steps, blocks)
      assert 1 <= splits <= n_steps
      assert b * kh * splits <= slots or splits == 1
      assert b * kh * (splits + 1) > slots or splits == n_steps, (b, kh, n_steps)
  assert dp.default_splits(8, 8, 128, blocks) == {2: 4, 3: 6}[blocks]


@pytest.mark.parametrize("kw, match", [
    (dict(k_bits=3), "k_bits=3"),
    (dict(v_bits=1.5), "v_bits=1.5"),
    (dict(group_size=8), "group_size=8"),
    (dict(group_size=48), "group_size=48"),
    (dict(d=96), "head_dim=96"),
    (dict(rows=17), "rows=17"),
    (dict(dtype=jnp.float32), "float32"),
    (dict(capacity=576), "capacity \\(576\\) must be a multiple of 128 tokens"),  # spans
    (dict(capacity=128), "capacity \\(128\\) .* at least a step, 256"),
    (dict(group_size=512, capacity=1280), "capacity \\(1280\\) must be a multiple of 512"),
    (dict(group_size=512, k_bits=8), "group_size=512"),
])
def test_kernel_names_what_it_cannot_read(kw, match):
  kb, vb = kw.get("k_bits", 2), kw.get("v_bits", 2)
  g, d, rows = kw.get("group_size", 32), kw.get("d", D), kw.get("rows", 4)
  cap = kw.get("capacity", 1024)
  dtype = kw.get("dtype", jnp.bfloat16)
  wb = lambda bits: 2 if bits == 1.5 else bits  # noqa: E731
  args = (jnp.zeros((1, 1, rows, d), dtype),
          jnp.zeros((1, 1, cap, d * wb(kb) // 32), jnp.uint32),
          *2 * [jnp.zeros((1, 1, cap // 16, d), dtype)],
          jnp.zeros((1, 1, d, cap * wb(vb) // 32), jnp.uint32),
          *2 * [jnp.zeros((1, 1, 1, cap), dtype)], jnp.zeros((1,), jnp.int32),
          jnp.zeros((1,), jnp.int32))
  with pytest.raises(ValueError, match=match):
    dp.pair_decode_partials(*args, k_bits=kb, v_bits=vb, group_size=g)


def _bf16(x):
  return np.asarray(jnp.asarray(x, jnp.float32).astype(jnp.bfloat16).astype(jnp.float32),
                    np.float64)


@pytest.mark.skipif(not ON_HOPPER, reason="the kernel runs on Hopper GPUs only")
@pytest.mark.parametrize("d", [D, 64])
@pytest.mark.parametrize("rep", [1, 4, 12])
@pytest.mark.parametrize("k_bits, v_bits, g", CASES)
def test_kernel_matches_float64_attention(k_bits, v_bits, g, rep, d):
  """SPEC's attention over the block in float64, keys and values as the
  kernel rounds them (code * scale + zero to bf16 once); the kernel also rounds
  probabilities to bf16 for its dot (relative error up to 2^-8 each). Where it
  folds the scales (`folds`: one query row), the scores as it rounds them
  (each code exact against q o s_g in bf16, plus q . z_g) and the values exact
  (it rounds p o s_g to fp16, 2^-11, and sums p z_g in float32)."""
  _check_against_float64(k_bits, v_bits, g, rep, d, max(2048, 8 * g))


@pytest.mark.skipif(not ON_HOPPER, reason="the kernel runs on Hopper GPUs only")
@pytest.mark.parametrize("rep", [1, 4])
@pytest.mark.parametrize("k_bits, v_bits, g", [(2, 2, 32), (4, 4, 32), (8, 8, 128)])
def test_kernel_reads_a_block_ending_in_a_partial_step(k_bits, v_bits, g, rep):
  """A block of 1408 tokens, 5.5 steps of 256 (`kivi_jax.cache.block_capacity`
  at 1024 + 512): the last step's TMA reads past the block's end, as zeros."""
  _check_against_float64(k_bits, v_bits, g, rep, D, 1408)


def _check_against_float64(k_bits, v_bits, g, rep, d, cap):
  rng = np.random.default_rng(hash((k_bits, v_bits, g, rep, d, cap)) % 2**32)
  b, kh = 5, 2
  k = rng.standard_normal((b, kh, cap, d))
  k[..., 1] *= 30  # an outlier channel
  v = rng.standard_normal((b, kh, cap, d))
  kc, ks, kz, _ = spec_reference.quantize(k, k_bits, g, "channel", scale_dtype=jnp.bfloat16)
  vc, vs, vz, _ = spec_reference.quantize(v, v_bits, g, "token", scale_dtype=jnp.bfloat16)
  cg = min(g, d)
  keys = _bf16(kc * np.repeat(ks, g, 2) + np.repeat(kz, g, 2))
  values = _bf16(vc * np.repeat(vs, cg, 3) + np.repeat(vz, cg, 3))
  q = _bf16(rng.standard_normal((b, kh, rep, d)))
  n_valid = np.array([0, g, cap - 3 * g, cap, 5 * g])
  lo = np.array([0, 0, 517, 0, 2 * g + 7])
  bf = lambda x: jnp.asarray(x, jnp.bfloat16)  # noqa: E731
  pack = lambda c, bits: quantization.pair_pack(jnp.asarray(c, jnp.uint32), bits)  # noqa: E731
  acc, m, l = dp.pair_decode_partials(
      bf(q), pack(kc, k_bits), bf(ks), bf(kz), pack(np.swapaxes(vc, 2, 3), v_bits),
      bf(np.swapaxes(vs, 2, 3)), bf(np.swapaxes(vz, 2, 3)), jnp.asarray(n_valid, jnp.int32),
      jnp.asarray(lo, jnp.int32), k_bits=k_bits, v_bits=v_bits, group_size=g, splits=3)
  o, lse = map(np.asarray, da.merge_partials(acc, m, l))
  folded = dp.folds(k_bits, v_bits, g, d, rep)
  if folded:
    values = vc * np.repeat(vs, cg, 3) + np.repeat(vz, cg, 3)
  t = np.arange(cap)
  for i in range(b):
    live = (t >= lo[i]) & (t < n_valid[i])
    if not live.any():
      assert np.all(o[i] == 0) and np.all(lse[i] < -1e29)
      continue
    if folded:
      qs = np.repeat(_bf16(q[i][:, :, None] * ks[i][:, None]), g, 2)  # [h, m, t, d]
      qz = np.repeat(np.einsum("hmd,hgd->hmg", q[i], kz[i]), g, 2)
      s = (np.einsum("hmtd,htd->hmt", qs, kc[i]) + qz)[..., live] / math.sqrt(d)
    else:
      s = np.einsum("hmd,htd->hmt", q[i], keys[i][:, live]) / math.sqrt(d)
    p = np.exp(s - s.max(-1, keepdims=True))
    want = np.einsum("hmt,htd->hmd", p, values[i][:, live]) / p.sum(-1)[..., None]
    err = np.linalg.norm(o[i] - want) / np.linalg.norm(want)
    assert err < 2**-8, (i, err)
    np.testing.assert_allclose(lse[i], s.max(-1) + np.log(p.sum(-1)), atol=1e-4)


@pytest.mark.skipif(not ON_HOPPER, reason="the kernel runs on Hopper GPUs only")
@pytest.mark.parametrize("rep, window, d", [(1, None, D), (4, None, D), (4, 700, D),
                                             (3, None, 64)])  # SmolLM2's heads: GQA 3, d 64
def test_a_decode_step_reads_the_pair_layout_through_the_kernel(rep, window, d):
  """`decode_attention` over a bf16 cache in the pair layout: the kernel reads
  the block (its custom call is in the step) and the step's output (block,
  ring and new token merged) equals the jnp reference's within the kernel's
  rounding of probabilities."""
  config = kivi_jax.KIVIConfig(2, 2, 32, 128)
  b, hkv, n = 3, 2, 1500
  rng = np.random.default_rng(rep)
  k, v = (jnp.asarray(rng.standard_normal((b, hkv, n, d)), jnp.bfloat16) for _ in range(2))
  lengths = jnp.asarray([n, 1000, 129], jnp.int32)
  shape = CacheShape(num_kv_heads=hkv, head_dim=d, dtype=jnp.bfloat16)
  layer = kivi_jax.init_cache(shape, config, b, n + 1, layout="pairs").layers[0]
  layer = append(layer, k, v, jnp.zeros_like(lengths), lengths, config, "gpu")
  q = jnp.asarray(rng.standard_normal((b, 1, rep * hkv, d)), jnp.bfloat16)
  k1, v1 = (jnp.asarray(rng.standard_normal((b, hkv, 1, d)), jnp.bfloat16) for _ in range(2))
  ones = jnp.ones((b,), jnp.int32)
  out = {}
  for impl in ("gpu", "reference"):
    appended, flushed = append_flushing(layer, k1, v1, lengths, ones, config, impl)
    step = jax.jit(lambda q, a, f, impl=impl: attention.decode_attention(
        q, a, f, lengths, ones, config, window, impl=impl))
    hlo = step.lower(q, appended, flushed).as_text()
    assert ("mosaic_gpu" in hlo) == (impl == "gpu")
    out[impl] = np.asarray(step(q, appended, flushed), np.float32)
  err = np.linalg.norm(out["gpu"] - out["reference"]) / np.linalg.norm(out["reference"])
  # Both read the same bf16 keys and values and round probabilities to bf16 for
  # their dots (at different maxima): 2^-8 each way.
  assert err < 2**-7, err


@pytest.mark.parametrize("rep", [1, 4, 16])
def test_the_merge_kernel_gives_the_merge_of_the_block_and_the_ring(rep, monkeypatch):
  """exp/mergekernel (KIVI_EXP_MERGE=1): on a CPU the pair kernel is replaced by
  the jnp block attention laid out as the kernels write their partials (one
  split; O^T over the kernel's padded rows, the folded kernel's 8 columns), the
  ring kernel and the merge kernel run in interpret mode: the step's output
  equals the XLA merge's."""
  monkeypatch.setattr(dp, "hopper", lambda: True)  # a GPU pretended

  def fake(qg, layer, nq, lo, config, transposed=True):
    o, lse = attention._jnp_block_attention(qg, layer, nq, lo, config, None)
    if not transposed:
      return o[:, :, None], lse[:, :, None], jnp.ones_like(lse[:, :, None])
    rows = 1 if rep == 1 else (8 if rep <= 8 else 16)
    cols = 8 if rep == 1 else rows
    pad = lambda x, n, fill: jnp.pad(  # noqa: E731
        x, [(0, 0)] * 2 + [(0, n - rep)] + [(0, 0)] * (x.ndim - 3), constant_values=fill)
    o_t = jnp.swapaxes(pad(o, rows, 0.0), 2, 3)[:, :, None]  # [B, K, 1, D, R]
    return (o_t, pad(lse, cols, -1e30)[:, :, None],
            pad(jnp.ones_like(lse), cols, 0.0)[:, :, None])

  monkeypatch.setattr(attention, "_pair_block_partials", fake)
  config = kivi_jax.KIVIConfig(2, 2, 32, 128)
  b, hkv, n = 3, 2, 700
  rng = np.random.default_rng(rep)
  k, v = (jnp.asarray(rng.standard_normal((b, hkv, n, D)), jnp.bfloat16) for _ in range(2))
  lengths = jnp.asarray([n, 400, 129], jnp.int32)
  shape = CacheShape(num_kv_heads=hkv, head_dim=D, dtype=jnp.bfloat16)
  layer = kivi_jax.init_cache(shape, config, b, n + 1, layout="pairs",
                              impl="reference").layers[0]
  layer = append(layer, k, v, jnp.zeros_like(lengths), lengths, config, "reference")
  q = jnp.asarray(rng.standard_normal((b, 1, rep * hkv, D)), jnp.bfloat16)
  k1, v1 = (jnp.asarray(rng.standard_normal((b, hkv, 1, D)), jnp.bfloat16) for _ in range(2))
  ones = jnp.ones((b,), jnp.int32)
  appended, flushed = append_flushing(layer, k1, v1, lengths, ones, config, "reference")
  out = {}
  for knob in ("0", "1"):
    monkeypatch.setenv("KIVI_EXP_MERGE", knob)
    out[knob] = np.asarray(attention.decode_attention(q, appended, flushed, lengths, ones,
                                                      config, None, impl="gpu"), np.float32)
  # The same partials merged in float32 either way, rounded to bf16 at the end.
  np.testing.assert_allclose(out["1"], out["0"], rtol=2**-7, atol=2**-7)
  assert np.abs(out["1"]).max() > 0.05


@pytest.mark.parametrize("splits, tiles, r, r2, rows, cols", [
    (6, 5, 8, 16, 4, 8), (1, 2, 1, 1, 1, 8), (3, 5, 16, 16, 16, 16)])
def test_the_merge_kernel_lowers_for_cuda(splits, tiles, r, r2, rows, cols):
  """exp/mergekernel: the merge kernel traces and lowers to Triton for P1's
  shape (6 splits, 5 ring tiles, 4 of 8 rows), one query row (the folded
  kernel's 8 columns of maxima) and 16 rows."""
  from kivi_jax.pallas_kernels import merge_partials as mp
  sd, f32 = jax.ShapeDtypeStruct, jnp.float32
  b, kh = 4, 8
  args = (sd((b, kh, splits, D, r), f32), *2 * [sd((b, kh, splits, cols), f32)],
          sd((b, kh, tiles, r2, D), f32), *2 * [sd((b, kh, tiles, r2), f32)])
  f = jax.jit(lambda *a: mp.merge_block_and_ring(*a, rows=rows, dtype=jnp.bfloat16))
  assert "triton" in f.trace(*args).lower(lowering_platforms=("cuda",)).as_text().lower()
