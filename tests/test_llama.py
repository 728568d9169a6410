"""The compiled decode step: weights and cache read in place, never copied, and
temporaries that do not grow with the cache; the compiled prefill's temporaries
do not grow with the layers."""

import dataclasses
import functools
import re

import jax
import jax.numpy as jnp
import pytest

import kivi_jax
from kivi_jax import bench_generate, quantization
from kivi_jax.generate import _prefill
from kivi_jax.models import llama
from kivi_jax.models.config import ModelConfig


def _model(num_layers=3, dtype="float32"):
  config = ModelConfig(architecture="llama", vocab_size=256, hidden_size=128,
                       intermediate_size=256, num_layers=num_layers, num_heads=4,
                       num_kv_heads=2, head_dim=32, dtype=dtype)
  return bench_generate.random_model(config)


def _compiled_step(model, kv_config, batch=4, capacity=1024, tokens=1, impl="reference"):
  cache = kivi_jax.init_cache(model.config, kv_config, batch, capacity, impl=impl)
  step = jax.jit(functools.partial(llama.forward, config=model.config),
                 donate_argnames="cache")
  ids = jnp.zeros((batch, tokens), jnp.int32)
  return step.lower(model.params, ids, cache).compile(), cache


def copied_inputs(hlo: str, min_bytes: int) -> list[str]:
  """Copies in an optimized HLO module of an input (a weight or a cache
  buffer, by name or by the operation's metadata) of at least `min_bytes`."""
  sizes = {"f32": 4, "s32": 4, "u32": 4, "bf16": 2, "f16": 2, "u8": 1, "pred": 1}
  found = []
  for line in hlo.splitlines():
    m = re.search(r"= (\w+)\[([\d,]*)\]\S* copy\(%([\w.-]+)\)", line)
    if not m:
      continue
    dtype, dims, operand = m.groups()
    size = sizes.get(dtype, 4)
    for d in filter(None, dims.split(",")):
      size *= int(d)
    meta = re.search(r'op_name="([^"]*)"', line)
    source = operand + " " + (meta.group(1) if meta else "")
    if size >= min_bytes and re.search(r"^(params|cache)|params\[|cache\.", source):
      found.append(line.strip()[:200])
  return found


@pytest.mark.parametrize("method, impl", [
    ("fp16", "reference"), ("kivi2", "reference"), ("kivi4", "reference"),
    ("kivi2", "tpu"), ("skvq-k2v2-g32", "reference")])
def test_decode_step_copies_no_weight_or_cache_buffer(method, impl):
  model = _model()
  kv = kivi_jax.get_preset(method)
  if kv.needs_calibration:
    kv = dataclasses.replace(kv, reorder=False, clip=0.9)
  compiled, cache = _compiled_step(model, kv, impl=impl)
  # Below a hundredth of the cache: the lengths, fp16's one-slot ring.
  assert copied_inputs(compiled.as_text(), cache.nbytes() // 100) == []


def test_skvq_decode_step_runs_no_loop(monkeypatch):
  # A loop in a GPU step waits on the host at each iteration. SKVQ's flush
  # reduces each channel group by a scan at 7B widths (32 tokens x 256
  # groups); made to take that path here, its step must hold no loop (a
  # binary search ran 13 iterations in 4 loops a layer).
  monkeypatch.setattr(quantization, "SEGMENT_MASKED_PAIRS", 0)
  kv = dataclasses.replace(kivi_jax.get_preset("skvq-k2v2-g32"), reorder=False, clip=0.9)
  compiled, _ = _compiled_step(_model(), kv)
  assert not re.search(r"\bwhile\(", compiled.as_text())


def test_skvq_gpu_step_reads_the_ring_after_the_block_kernels():
  # SKVQ's query rows for the GPU's block kernels and the ring's scores both
  # read the query; XLA fused them into one slow fusion on an H100 (6.2 of 53
  # ms a Llama-2-7B step at batch 32). A barrier after the kernels keeps them
  # apart there, and only there (measured nowhere else). The flush's
  # quantization holds barriers of its own, whichever reads the block.
  kv = dataclasses.replace(kivi_jax.get_preset("skvq-k2v2-g32"), reorder=False, clip=0.9)
  model = _model()
  step = functools.partial(llama.forward, config=model.config)
  barriers = {}
  for impl in ("gpu", "tpu", "reference"):
    cache = kivi_jax.init_cache(model.config, kv, 4, 1024, impl=impl)
    jaxpr = jax.make_jaxpr(step)(model.params, jnp.zeros((4, 1), jnp.int32), cache)
    barriers[impl] = str(jaxpr).count("optimization_barrier")
  assert barriers["gpu"] > barriers["reference"] == barriers["tpu"]


def test_copy_check_sees_a_cache_read_before_its_write():
  # Guards the test above: two new tokens take the reference path, which
  # reads the cache and then writes it, so XLA copies the cache's buffers.
  model = _model()
  compiled, cache = _compiled_step(model, kivi_jax.get_preset("kivi2"), tokens=2)
  assert copied_inputs(compiled.as_text(), cache.nbytes() // 100)


@pytest.mark.parametrize("method", ["fp16", "kivi2"])
def test_decode_step_temporaries_do_not_grow_with_layers_or_the_cache(method):
  # A step's temporaries are one layer's at a time: a deeper model adds
  # nothing, a longer cache only what one layer's attention forms over it.
  kv = kivi_jax.get_preset(method)
  temp = {}
  for layers, capacity in ((2, 1024), (6, 1024), (6, 4096)):
    compiled, cache = _compiled_step(_model(layers), kv, capacity=capacity)
    temp[layers, capacity] = compiled.memory_analysis().temp_size_in_bytes
    if method == "fp16":  # the block is read in place
      assert temp[layers, capacity] < cache.nbytes() / 20
  # Per extra layer at most its flushed group (keys and values of G tokens,
  # float32), which XLA may keep until the layer's block write, scheduled late.
  flushed = 2 * 4 * 2 * kv.group_size * 32 * 4
  assert temp[6, 1024] - temp[2, 1024] <= 4 * flushed
  # Per extra token: fp16's float32 scores and probabilities of 4 rows x 4
  # heads; the reference's dequantized float32 keys and values on top for
  # KIVI-2 (4 rows x 2 heads x 32 channels x 2 tensors).
  per_token = 2 * 4 * 4 * 4 + (0 if method == "fp16" else 2 * 4 * 2 * 32 * 4)
  assert temp[6, 4096] - temp[6, 1024] <= 1.05 * per_token * (4096 - 1024)


@pytest.mark.parametrize("method", ["fp16", "kivi2", "kivi4", "skvq-k2v2-g32"])
def test_prefill_temporaries_do_not_grow_with_layers(method):
  # A prefill's temporaries are one layer's at a time. A float32 model, so that
  # the CPU compiler adds no bfloat16 conversions of each layer's weights. The
  # flush once gathered each layer's ring alone, which needs nothing of the
  # layer: XLA formed every layer's gather at the program's start, and the
  # temporaries grew by a layer's keys and values (2 MiB here) per layer.
  kv = kivi_jax.get_preset(method)
  if kv.needs_calibration:
    kv = dataclasses.replace(kv, reorder=False, clip=0.9)
  temp = {}
  for layers in (2, 6):
    config = ModelConfig(architecture="llama", vocab_size=256, hidden_size=256,
                         intermediate_size=512, num_layers=layers, num_heads=8,
                         num_kv_heads=8, head_dim=32, dtype="float32")
    model = bench_generate.random_model(config)
    empty = kivi_jax.init_cache(config, kv, 2, 640, impl="reference")
    ids = jnp.zeros((2, 512), jnp.int32)
    prefill = jax.jit(functools.partial(_prefill, config=config))
    compiled = prefill.lower(model.params, ids, jnp.ones_like(ids), empty).compile()
    temp[layers] = compiled.memory_analysis().temp_size_in_bytes
  layer_kv = 2 * 512 * 2 * 256 * 4  # rows x tokens x (keys, values) x width x float32
  assert temp[6] - temp[2] < layer_kv / 4


@pytest.mark.parametrize("method", ["fp16", "kivi2"])
def test_a_long_prompts_mlp_runs_over_chunks_of_its_tokens(method, monkeypatch):
  # The MLP block's gate, up and their product (3 x F a token) are a long
  # prefill's largest activations; over chunks of `MLP_TOKENS` tokens they are
  # a chunk's. A float32 model whose MLP is wide beside everything else. The
  # chunks' loop must not add temporaries a layer: with its result started
  # from zeros, which need nothing of the layer, XLA formed every layer's
  # zeros at the program's start (an H200 held 320 KB a token of Llama-2-7B
  # shapes where the MLP whole held 91).
  temp = {}
  t = 4096
  for layers in (2, 6):
    config = ModelConfig(architecture="llama", vocab_size=64, hidden_size=64,
                         intermediate_size=8192, num_layers=layers, num_heads=4,
                         num_kv_heads=2, head_dim=16, dtype="float32",
                         max_position_embeddings=8192)
    model = bench_generate.random_model(config)
    kv = kivi_jax.get_preset(method)
    empty = kivi_jax.init_cache(config, kv, 1, t + 128, impl="reference")
    ids = jnp.zeros((1, t), jnp.int32)
    for tokens in (t, 512):  # the whole prompt at once; chunks of 512
      monkeypatch.setattr(llama, "MLP_TOKENS", tokens)
      prefill = jax.jit(functools.partial(llama.prefill, config=config))  # traced anew
      temp[layers, tokens] = prefill.lower(model.params, ids, empty).compile(
      ).memory_analysis().temp_size_in_bytes
  mlp = 3 * config.intermediate_size * 4  # bytes a token
  assert temp[2, 512] <= temp[2, t] - 0.9 * mlp * (t - 512)
  # (Within one residual stream: XLA's slots shift by a few hundred bytes.)
  residual = t * config.hidden_size * 4
  assert temp[6, 512] - temp[2, 512] <= temp[6, t] - temp[2, t] + residual


def test_prefill_forms_each_layers_cache_before_the_next_layer():
  # On an H200 XLA left each layer's cache writes (fused with their reads of
  # the layer's q, k, v projection) to the prefill's end, keeping every
  # layer's projection alive: 11.6 GB of temporaries for 7 rows x 1024 tokens
  # of Llama-2-7B shapes, 3.4 with a barrier after each layer. The CPU's
  # schedule does not show it, so the barriers themselves are what is checked.
  kv = kivi_jax.get_preset("kivi2")
  count = {}
  for layers in (2, 4):
    config = ModelConfig(architecture="llama", vocab_size=64, hidden_size=64,
                         intermediate_size=128, num_layers=layers, num_heads=4,
                         num_kv_heads=2, head_dim=16)
    model = bench_generate.random_model(config)
    empty = kivi_jax.init_cache(config, kv, 1, 128, impl="reference")
    for name, fn, t in (("prefill", llama.prefill, 64), ("forward", llama.forward, 8),
                        ("step", llama.forward, 1)):
      ids = jnp.zeros((1, t), jnp.int32)
      text = jax.jit(functools.partial(fn, config=config)).lower(
          model.params, ids, empty, jnp.ones_like(ids)).as_text()
      count[name, layers] = text.count("optimization_barrier")
  # One a layer wherever several tokens go through the layers; a decode step
  # (one token a row, its cache written in place) takes none.
  assert count["prefill", 4] - count["prefill", 2] == 2
  assert count["forward", 4] - count["forward", 2] == 2
  assert count["step", 4] == count["step", 2]
