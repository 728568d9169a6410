"""The model and the cache over a mesh of the 8 virtual CPU devices (conftest):
every mesh's tokens equal one device's, and a decode step moves no cache bytes."""

import dataclasses
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import kivi_jax
from kivi_jax import memory
from kivi_jax.bench_generate import random_model
from kivi_jax.generate import _prefill, prefill_chunk_rows
from kivi_jax.models import llama
from kivi_jax.models.config import ModelConfig
from conftest import first_layers, tiny_hf_model, tiny_llama_config, wikitext_calibration

MESHES = [(8, 1), (1, 8), (2, 4), (4, 2)]
SKVQ = "skvq-k2v2-g16-fp8"
NEW = 16


def _config(method):
  """`method`'s preset with a 32-token ring in groups of 16: the prompts below
  reach the quantized block, and rows flush during the new tokens."""
  kv = kivi_jax.get_preset(method)
  if kv.k_bits == 16:
    return kv
  return dataclasses.replace(kv, residual_length=32, group_size=16)


@functools.cache
def _model(num_kv_heads=8):
  """Random weights, 8 kv heads and 16 query heads of 16 channels (every mesh
  above splits them), scaled up so the tokens vary from step to step."""
  cfg = ModelConfig(architecture="llama", vocab_size=256, hidden_size=128,
                    intermediate_size=256, num_layers=2, num_heads=16,
                    num_kv_heads=num_kv_heads, head_dim=16)
  model = random_model(cfg, seed=1)
  return dataclasses.replace(model, params=jax.tree.map(
      lambda x: x * 5 if x.ndim > 1 else x, model.params))


def _prompts(rows=8, length=90, step=7):
  """Rows of different lengths (`length - step * row`, left padding), so rows
  flush at different steps."""
  ids = np.random.default_rng(0).integers(0, 256, (rows, length))
  mask = (np.arange(length)[None, :] >= (np.arange(rows) * step)[:, None]).astype(np.int32)
  return ids, mask


@functools.cache
def _calibration():
  text = np.random.default_rng(1).integers(0, 256, (2, 256))
  return kivi_jax.calibrate(_model(), [text], _config(SKVQ), progress=False)


def _generate(method, mesh=None, impl=None, rows=8, new=NEW, step=7):
  model = _model() if mesh is None else kivi_jax.shard_model(_model(), mesh)
  ids, mask = _prompts(rows, 90, step)
  calibration = _calibration() if method == SKVQ else None
  return np.asarray(kivi_jax.generate(model, ids, attention_mask=mask,
                                      kv_config=_config(method),
                                      max_new_tokens=new, calibration=calibration,
                                      impl=impl, mesh=mesh))


@functools.cache
def _one_device(method, impl=None, rows=8, new=NEW, step=7):
  return _generate(method, impl=impl, rows=rows, new=new, step=step)


@pytest.mark.parametrize("shape", MESHES)
@pytest.mark.parametrize("method", ["fp16", "kivi2"])
def test_generate_on_a_mesh_equals_one_device(method, shape):
  out = _generate(method, kivi_jax.make_mesh(*shape))
  np.testing.assert_array_equal(out, _one_device(method))


def test_mlp_over_token_chunks_on_a_mesh_equals_one_device(mlp_tokens):
  # Past `MLP_TOKENS` tokens the MLP block runs over chunks of them (here 12
  # tokens of 8 rows of 90, the last chunk overlapping), its weights split
  # over `model`. The 16-bit cache holds every position's keys and values as
  # computed.
  ids, mask = _prompts()
  caches = []
  for tokens, mesh in ((llama.MLP_TOKENS, None), (96, kivi_jax.make_mesh(2, 4))):
    mlp_tokens(tokens)
    model = _model() if mesh is None else kivi_jax.shard_model(_model(), mesh)
    caches.append(kivi_jax.prefill_cache(model, ids, attention_mask=mask, max_length=100,
                                         kv_config=_config("fp16"), mesh=mesh))
  for want, got in zip(*map(jax.tree.leaves, caches)):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape, chunk", [((2, 4), 1), ((2, 4), 3), ((4, 2), 1)])
@pytest.mark.parametrize("method", ["fp16", "kivi2"])
def test_a_prefill_in_chunks_of_each_shards_rows_equals_one_device(method, shape, chunk,
                                                                   monkeypatch):
  # Prompts of 128 tokens (90, bucketed) and `chunk` x 128 tokens a chunk: each
  # data shard prefills `chunk` of its own rows at a time (3 of 4: the last
  # chunk overlaps the one before), the rows never leaving their devices.
  monkeypatch.setattr(memory, "PREFILL_TOKENS", chunk * 128)
  mesh = kivi_jax.make_mesh(*shape)
  model = kivi_jax.shard_model(_model(), mesh)
  kv = _config(method)
  rows = prefill_chunk_rows(model, kv, 8, 128, 128, "auto", mesh)
  assert rows == shape[0] * chunk
  np.testing.assert_array_equal(_generate(method, mesh), _one_device(method))


def test_a_prefill_in_chunks_moves_no_rows_between_devices(monkeypatch):
  # The chunk loop's slices and writes keep each shard's rows where they lie:
  # the compiled prefill holds tensor parallelism's two all-reduces a layer and
  # no other collective.
  monkeypatch.setattr(memory, "PREFILL_TOKENS", 128)
  mesh = kivi_jax.make_mesh(2, 4)
  model = kivi_jax.shard_model(_model(), mesh)
  empty = kivi_jax.init_cache(model.config, _config("kivi2"), 2, 160, mesh=mesh)
  ids = jax.device_put(jnp.zeros((8, 128), jnp.int32), NamedSharding(mesh, P("data")))
  hlo = _prefill.lower(
      model.params, ids, jnp.ones_like(ids), empty, config=model.config).compile().as_text()
  collectives = re.findall(r"\b(all-gather|all-reduce|all-to-all|collective-permute|"
                           r"reduce-scatter)(?:-start)?\(", hlo)
  assert collectives == ["all-reduce"] * (2 * model.config.num_layers), collectives


def test_skvq_splits_rows_over_data_and_refuses_the_model_axis():
  np.testing.assert_array_equal(_generate(SKVQ, kivi_jax.make_mesh(8, 1)), _one_device(SKVQ))
  with pytest.raises(ValueError, match="model=1"):
    _generate(SKVQ, kivi_jax.make_mesh(4, 2))


@pytest.mark.parametrize("impl, shape, rows, new, step", [("gpu", (2, 4), 8, NEW, 7),
                                                         ("tpu", (2, 2), 2, 3, 10)])
def test_kernels_run_per_shard(impl, shape, rows, new, step):
  # On the CPU each backend's kernels (write, decode; the GPU's ring write) run
  # in their interpret mode, once per shard. TPU interpret mode over all 8 CPU
  # devices aborted or hung (jax 0.10.2, 2 cores); over 4 it runs, slowly, so
  # on 2 rows and 3 new tokens: rows of 90 and 80 tokens, the first with 64
  # quantized tokens and 26 in its ring, the second with 48 and a full ring of
  # 32, flushed by the first new token.
  out = _generate("kivi2", kivi_jax.make_mesh(*shape), impl=impl, rows=rows, new=new,
                  step=step)
  np.testing.assert_array_equal(out, _one_device("kivi2", impl, rows, new, step))


def test_continuing_a_sharded_cache():
  mesh = kivi_jax.make_mesh(2, 4)
  ids, mask = _prompts()
  question = np.random.default_rng(2).integers(0, 256, (8, 20))
  outs = []
  for m in (None, mesh):
    model = _model() if m is None else kivi_jax.shard_model(_model(), m)
    cache = kivi_jax.prefill_cache(model, ids, attention_mask=mask, max_length=160,
                                   kv_config=_config("kivi2"), mesh=m)
    assert cache.mesh is m
    assert (np.asarray(cache.n_quantized()) > 0).all()
    outs.append(np.asarray(kivi_jax.generate(model, question, cache=cache,
                                             max_new_tokens=NEW)))
  np.testing.assert_array_equal(outs[1], outs[0])


def test_a_saved_cache_restores_onto_another_mesh(tmp_path):
  ids, mask = _prompts()
  question = np.random.default_rng(3).integers(0, 256, (8, 12))
  kv = _config("kivi2")
  saved_on = kivi_jax.make_mesh(2, 4)
  cache = kivi_jax.prefill_cache(kivi_jax.shard_model(_model(), saved_on), ids,
                                 attention_mask=mask, max_length=160, kv_config=kv,
                                 mesh=saved_on)
  kivi_jax.save_cache(tmp_path / "c", cache, _model())
  expected = np.asarray(kivi_jax.generate(_model(), question, max_new_tokens=NEW,
                                          cache=kivi_jax.restore_cache(tmp_path / "c",
                                                                       _model())))
  mesh = kivi_jax.make_mesh(4, 2)
  restored = kivi_jax.restore_cache(tmp_path / "c", _model(), mesh=mesh)
  assert restored.mesh is mesh
  assert restored.layers[1].v.codes.sharding == NamedSharding(mesh, P("data", "model"))
  out = kivi_jax.generate(kivi_jax.shard_model(_model(), mesh), question,
                          max_new_tokens=NEW, cache=restored)
  np.testing.assert_array_equal(np.asarray(out), expected)
  with pytest.raises(ValueError, match="device= or mesh="):
    kivi_jax.restore_cache(tmp_path / "c", _model(), mesh=mesh, device=jax.devices()[0])
  with pytest.raises(ValueError, match="data axis of 3"):
    kivi_jax.restore_cache(tmp_path / "c", _model(), mesh=kivi_jax.make_mesh(3, 2))


@pytest.mark.parametrize("method", ["fp16", "kivi2"])
def test_a_decode_step_moves_no_cache_bytes(method):
  # Tensor parallelism's two all-reduces a layer (after o and down) and nothing
  # else: no all-gather, all-to-all or permute of the cache or the weights.
  mesh = kivi_jax.make_mesh(2, 4)
  model = kivi_jax.shard_model(_model(), mesh)
  cache = kivi_jax.init_cache(model.config, _config(method), 8, 256, mesh=mesh)
  for x in jax.tree.leaves(cache.layers[0].k) + [cache.layers[0].ring_k]:
    assert x.sharding.spec == P("data", "model") and x.addressable_shards[0].data.shape[:2] \
        == (4, 2)
  tok = jax.device_put(jnp.zeros((8, 1), jnp.int32), NamedSharding(mesh, P("data")))
  hlo = model.forward.lower(model.params, tok, cache).compile().as_text()
  collectives = re.findall(r"\b(all-gather|all-reduce|all-to-all|collective-permute|"
                           r"reduce-scatter)(?:-start)?\(", hlo)
  assert collectives == ["all-reduce"] * (2 * model.config.num_layers), collectives


def test_mesh_errors_name_what_does_not_split():
  ids, _ = _prompts(rows=6)
  kv = kivi_jax.get_preset("kivi2")
  with pytest.raises(ValueError, match="batch of 6 rows .* data axis of 4"):
    kivi_jax.generate(_model(), ids, kv_config=kv, max_new_tokens=2,
                      mesh=kivi_jax.make_mesh(4, 2))
  with pytest.raises(ValueError, match="num_kv_heads=8 .* model axis of 3"):
    kivi_jax.generate(_model(), ids, kv_config=kv, max_new_tokens=2,
                      mesh=kivi_jax.make_mesh(2, 3))
  with pytest.raises(ValueError, match="axes \\('data', 'model'\\)"):
    kivi_jax.generate(_model(), ids, kv_config=kv, max_new_tokens=2,
                      mesh=Mesh(np.array(jax.devices()[:2]), ("rows",)))
  with pytest.raises(ValueError, match="needs 9 devices; 8 are available"):
    kivi_jax.make_mesh(3, 3)
  with pytest.raises(ValueError, match="model must be a positive integer"):
    kivi_jax.make_mesh(2, 0)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_weights_load_into_their_shards(tmp_path, dtype):
  hf = tiny_hf_model(tiny_llama_config(num_attention_heads=8, num_key_value_heads=4))
  hf.save_pretrained(tmp_path)
  mesh = kivi_jax.make_mesh(2, 4)
  whole = kivi_jax.load_model(tmp_path, dtype)
  for source in (tmp_path, hf):
    split = kivi_jax.load_model(source, dtype, mesh=mesh)
    layer = split.params["layers"][1]
    assert layer["wqkv"].sharding == NamedSharding(mesh, P(None, "model", None, None))
    assert layer["w_down"].addressable_shards[0].data.shape == (112 // 4, 64)
    assert split.params["embed"].sharding == NamedSharding(mesh, P())
    for a, b in zip(jax.tree.leaves(split.params), jax.tree.leaves(whole.params)):
      assert a.dtype == b.dtype and np.array_equal(np.asarray(a), np.asarray(b))
  with pytest.raises(ValueError, match="num_kv_heads=4 .* model axis of 8"):
    kivi_jax.load_model(tmp_path, dtype, mesh=kivi_jax.make_mesh(1, 8))


@pytest.mark.slow
@pytest.mark.parametrize("method, shape", [("fp16", (2, 3)), ("kivi2", (2, 3)),
                                           (SKVQ, (2, 1))])
def test_smollm2_on_a_mesh_equals_one_device(smollm2_path, method, shape):
  # Real weights: SmolLM2's 9 query and 3 kv heads split over a model axis of 3
  # (its first 4 layers: the same layers at a fraction of the compile time),
  # read from the GGUF file straight into their shards; SKVQ over rows only,
  # calibrated on WikiText-2's tail.
  mesh = kivi_jax.make_mesh(*shape)
  model = first_layers(kivi_jax.load_model(smollm2_path), 4)
  split = first_layers(kivi_jax.load_model(smollm2_path, mesh=mesh), 4)
  tok = kivi_jax.load_tokenizer(smollm2_path)
  chats = [[{"role": "user", "content": q}] for q in
           ("Name three rivers of Europe.", "What is the capital of France?")]
  ids = [tok.apply_chat_template(c, add_generation_prompt=True, tokenize=True,
                                 return_dict=False) for c in chats]
  width = max(map(len, ids))
  prompts = np.array([[0] * (width - len(i)) + i for i in ids])
  mask = np.array([[0] * (width - len(i)) + [1] * len(i) for i in ids])
  kv = _config(method)
  calibration = wikitext_calibration(model, tok, kv)
  outs = [np.asarray(kivi_jax.generate(m, prompts, attention_mask=mask, kv_config=kv,
                                       max_new_tokens=40, calibration=calibration,
                                       mesh=mm))
          for m, mm in ((model, None), (split, mesh))]
  np.testing.assert_array_equal(outs[1], outs[0])
