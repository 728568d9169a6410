"""generate(): padded batches, per-row lengths, EOS, sampling, and input checks."""

import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kivi_jax
from conftest import tiny_hf_model, tiny_llama_config

METHODS = {
    "fp16": kivi_jax.KIVIConfig(16, 16, 16, 32),
    # Small groups and ring so prompts and decoding cross several flushes.
    "kivi2": kivi_jax.KIVIConfig(2, 2, 16, 32),
}


@pytest.fixture(scope="module")
def model():
  return kivi_jax.load_model(tiny_hf_model(tiny_llama_config(vocab_size=256)))


def _pad(prompts, side):
  t = max(len(p) for p in prompts)
  ids = np.zeros((len(prompts), t), np.int32)
  mask = np.zeros_like(ids)
  for i, p in enumerate(prompts):
    sl = slice(t - len(p), t) if side == "left" else slice(0, len(p))
    ids[i, sl], mask[i, sl] = p, 1
  return ids, mask


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("method", list(METHODS))
def test_padded_batch_rows_equal_their_prompts_alone(model, method, side):
  rng = np.random.default_rng(7)
  prompts = [rng.integers(0, 256, n) for n in (5, 41, 70)]
  ids, mask = _pad(prompts, side)
  batch = kivi_jax.generate(model, ids, attention_mask=mask, kv_config=METHODS[method],
                            max_new_tokens=40)
  for i, p in enumerate(prompts):
    alone = kivi_jax.generate(model, p[None], kv_config=METHODS[method], max_new_tokens=40)
    np.testing.assert_array_equal(np.asarray(batch[i]), np.asarray(alone[0]),
                                  err_msg=f"row {i}")


@pytest.mark.parametrize("method", list(METHODS))
def test_prompts_of_similar_length_share_compiled_programs(model, method, monkeypatch):
  # Prompts are padded to a multiple of 64 tokens and the default capacity
  # rounded up alike: a notebook's questions do not compile anew each.
  gen = importlib.import_module("kivi_jax.generate")
  capacities = []
  init = gen.init_cache
  monkeypatch.setattr(gen, "init_cache",
                      lambda *a, **k: capacities.append(a[3]) or init(*a, **k))
  rng = np.random.default_rng(2)
  run = lambda t, **kw: np.asarray(kivi_jax.generate(  # noqa: E731
      model, rng.integers(0, 256, (1, t)), kv_config=METHODS[method], max_new_tokens=8, **kw))
  run(20)
  sizes = lambda: (gen._prefill_over_empty._cache_size(), gen._decode._cache_size())  # noqa: E731
  compiled = sizes()
  run(21)
  run(56)
  assert sizes() == compiled
  # An explicit capacity is the caller's, taken as given; the default stays
  # within the model's window (512; a request past it is refused as before:
  # test_bad_inputs_raise_before_compute).
  run(21, max_length=29)
  run(500)
  assert capacities == [64, 64, 64, 29, 512]


def test_kivi2_differs_from_fp16(model):
  # Otherwise the test above could pass with a cache that never quantizes.
  p = np.random.default_rng(7).integers(0, 256, (1, 70))
  a = kivi_jax.generate(model, p, kv_config=METHODS["fp16"], max_new_tokens=40)
  b = kivi_jax.generate(model, p, kv_config=METHODS["kivi2"], max_new_tokens=40)
  assert (np.asarray(a) != np.asarray(b)).any()


def test_rows_stop_at_eos_independently(model):
  p = np.random.default_rng(3).integers(0, 256, (2, 12))
  free = np.asarray(kivi_jax.generate(model, p, kv_config=METHODS["kivi2"],
                                      max_new_tokens=12))
  eos = int(free[0, 3])
  assert eos not in free[0, :3]
  out = np.asarray(kivi_jax.generate(model, p, kv_config=METHODS["kivi2"],
                                     max_new_tokens=12, eos_token_id=eos, pad_token_id=255))
  np.testing.assert_array_equal(out[0, :4], free[0, :4])
  assert (out[0, 4:] == 255).all()
  stop = np.flatnonzero(free[1] == eos)
  end = stop[0] + 1 if stop.size else 12
  np.testing.assert_array_equal(out[1, :end], free[1, :end])


def test_streamers_see_their_own_steps_and_share_one_compiled_loop(model):
  # Each step of each row, in order, to the streamer of its own call; neither
  # streaming nor a new function (a notebook cell's lambda) compiles the loop
  # again.
  gen = importlib.import_module("kivi_jax.generate")  # the module, not the function
  p = np.random.default_rng(5).integers(0, 256, (2, 12))
  free = np.asarray(kivi_jax.generate(model, p, kv_config=METHODS["kivi2"], max_new_tokens=6))
  compiled = gen._decode._cache_size()
  eos = int(free[0, 2])
  assert eos not in free[0, :2] and eos not in free[1]
  runs = []
  for _ in range(2):
    seen = []
    out = kivi_jax.generate(model, p, kv_config=METHODS["kivi2"], max_new_tokens=6,
                            eos_token_id=eos, pad_token_id=0,
                            streamer=lambda tok, done: seen.append((tok.copy(), done.copy())))
    runs.append((np.asarray(out), seen))
  assert gen._decode._cache_size() == compiled
  for out, seen in runs:
    # Row 0 stops at its EOS (the third token): the loop runs on for row 1.
    assert len(seen) == 6
    np.testing.assert_array_equal(np.stack([t for t, _ in seen], 1), out)
    assert [bool(d[0]) for _, d in seen] == [False, False, False, True, True, True]
  # Once every row is done the loop stops, and so does the stream.
  seen = []
  out = kivi_jax.generate(model, p[:1], kv_config=METHODS["kivi2"], max_new_tokens=6,
                          eos_token_id=eos, pad_token_id=0,
                          streamer=lambda tok, done: seen.append(int(tok[0])))
  assert seen == free[0, :3].tolist() and np.asarray(out)[0].tolist() == seen + [0, 0, 0]


def test_sampling_is_deterministic_per_seed(model):
  p = np.random.default_rng(3).integers(0, 256, (2, 12))
  kw = dict(kv_config=METHODS["kivi2"], max_new_tokens=16, temperature=1.0, top_p=0.9)
  a = kivi_jax.generate(model, p, seed=1, **kw)
  b = kivi_jax.generate(model, p, seed=1, **kw)
  c = kivi_jax.generate(model, p, seed=2, **kw)
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert (np.asarray(a) != np.asarray(c)).any()
  greedy = kivi_jax.generate(model, p, kv_config=METHODS["kivi2"], max_new_tokens=16)
  top1 = kivi_jax.generate(model, p, kv_config=METHODS["kivi2"], max_new_tokens=16,
                           temperature=0.7, top_k=1, seed=5)
  np.testing.assert_array_equal(np.asarray(greedy), np.asarray(top1))


def test_temperatures_and_top_ps_share_one_compiled_loop(model):
  # A sweep of sampling settings compiles the loop once; the traced values are
  # the ones used: the least top_p keeps the likeliest token alone (greedy).
  gen = importlib.import_module("kivi_jax.generate")
  p = np.random.default_rng(3).integers(0, 256, (2, 12))
  kw = dict(kv_config=METHODS["kivi2"], max_new_tokens=16, seed=4)
  greedy = np.asarray(kivi_jax.generate(model, p, **kw))
  kivi_jax.generate(model, p, temperature=1.0, top_p=0.9, **kw)
  compiled = gen._decode._cache_size()
  hot = np.asarray(kivi_jax.generate(model, p, temperature=3.0, top_p=1.0, **kw))
  cold = np.asarray(kivi_jax.generate(model, p, temperature=0.05, top_p=1.0, **kw))
  narrow = np.asarray(kivi_jax.generate(model, p, temperature=1.0, top_p=1e-6, **kw))
  assert gen._decode._cache_size() == compiled
  np.testing.assert_array_equal(narrow, greedy)
  assert (hot != greedy).any()
  assert (cold != hot).any()


@pytest.mark.parametrize("kwargs, match", [
    (dict(max_new_tokens=0), "max_new_tokens must be a positive integer"),
    (dict(max_new_tokens=10, max_length=8), r"prompt \(12 tokens\) is longer than the cache"),
    (dict(max_new_tokens=10, max_length=20), "max_new_tokens=10 after a 12-token prompt"),
    (dict(max_new_tokens=4, temperature=-1.0), "temperature must be >= 0"),
    (dict(max_new_tokens=4, top_p=1.5), r"top_p must lie in \(0, 1\]"),
    (dict(max_new_tokens=4, top_k=0), "top_k must be a positive integer"),
    (dict(max_new_tokens=4, seed=1.5), "seed must be an integer, got 1.5"),
    (dict(max_new_tokens=4, temperature="hot"), "temperature must be a number, got 'hot'"),
    (dict(max_new_tokens=4, top_p="0.9"), "top_p must be a number, got '0.9'"),
    (dict(max_new_tokens=4, streamer=5),
     r"streamer must be a function of \(tokens, done\), got int"),
    (dict(max_new_tokens=4, top_k=100000), "top_k must be at most the vocabulary size"),
    # An id the model cannot emit would never stop a row; padding must decode.
    (dict(max_new_tokens=4, eos_token_id=[3, 256]),
     r"eos_token_id must be a token id in \[0, 256\) \(the vocabulary size\), got 256"),
    (dict(max_new_tokens=4, eos_token_id="3"), "eos_token_id must be a token id"),
    (dict(max_new_tokens=4, pad_token_id=-1), "pad_token_id must be a token id"),
    (dict(max_new_tokens=4, attention_mask=np.zeros((2, 12))), "at least one real token"),
    (dict(max_new_tokens=4, attention_mask=np.ones((2, 11))), "attention_mask has shape"),
    (dict(max_new_tokens=4, attention_mask=np.full((2, 12), 2)), "only 0"),
    # The tiny model's window is 512 tokens; ten million would be a 10 GB cache.
    (dict(max_new_tokens=10**7), r"max_length=10000012 \(the cache's tokens per row\) exceeds "
     r"the model's context window, max_position_embeddings=512"),
])
def test_bad_inputs_raise_before_compute(model, kwargs, match):
  p = np.zeros((2, 12), np.int32)
  with pytest.raises(ValueError, match=match):
    kivi_jax.generate(model, p, kv_config=METHODS["kivi2"], **kwargs)


def test_a_cache_past_the_free_memory_is_refused_before_allocation(model, monkeypatch):
  import importlib
  # 12 + 100 tokens, rounded up to a whole bucket of 64.
  need = kivi_jax.memory.cache_bytes(model.config, METHODS["fp16"], 2, 128)
  monkeypatch.setattr(kivi_jax.memory, "free_memory_bytes", lambda device=None: need - 1)
  allocated = []
  monkeypatch.setattr(importlib.import_module("kivi_jax.generate"), "init_cache",
                      lambda *a, **k: allocated.append(1))
  with pytest.raises(ValueError, match=r"the cache of 2 rows x 128 tokens \(max_length\) "
                     r"takes 0.00 GiB and the device has 0.00 GiB free"):
    kivi_jax.generate(model, np.zeros((2, 12), np.int32), kv_config=METHODS["fp16"],
                      max_new_tokens=100)
  assert not allocated


def test_free_memory_of_the_cpu_is_the_hosts_available_memory():
  import os
  free = kivi_jax.memory.free_memory_bytes()
  assert 0 < free <= os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def test_a_longer_window_on_purpose_is_allowed(model):
  import dataclasses
  wide = dataclasses.replace(model, config=dataclasses.replace(model.config,
                                                               max_position_embeddings=600))
  out = kivi_jax.generate(wide, np.zeros((1, 510), np.int32), kv_config=METHODS["kivi2"],
                          max_new_tokens=4)
  assert out.shape == (1, 4)


@pytest.mark.parametrize("ids, match", [
    (np.zeros(5, np.int32), r"input_ids must be an integer array \[batch, tokens\]"),
    (np.zeros((1, 5), np.float32), "input_ids must be an integer array"),
    (np.full((1, 5), 256), r"input_ids must lie in \[0, 256\)"),
])
def test_bad_input_ids(model, ids, match):
  with pytest.raises(ValueError, match=match):
    kivi_jax.generate(model, ids, kv_config=METHODS["kivi2"], max_new_tokens=2)


@pytest.mark.parametrize("method", list(METHODS))
def test_prefill_in_chunks_of_rows_equals_one_chunk(model, method, monkeypatch):
  rng = np.random.default_rng(11)
  ids, mask = _pad([rng.integers(0, 256, n) for n in (9, 40, 33, 70)], "left")
  whole = kivi_jax.generate(model, ids, attention_mask=mask, kv_config=METHODS[method],
                            max_new_tokens=24)
  # A budget of nothing: the prefill takes one row at a time.
  monkeypatch.setattr(kivi_jax.memory, "workspace_bytes", lambda cache_total: 0)
  chunked = kivi_jax.generate(model, ids, attention_mask=mask, kv_config=METHODS[method],
                              max_new_tokens=24)
  np.testing.assert_array_equal(np.asarray(chunked), np.asarray(whole))
  # Chunks of 3 rows of 4: the second runs rows 1-3, the first's 1-2 again.
  monkeypatch.setattr(kivi_jax.memory, "prefill_rows", lambda *args: 3)
  overlapping = kivi_jax.generate(model, ids, attention_mask=mask,
                                  kv_config=METHODS[method], max_new_tokens=24)
  np.testing.assert_array_equal(np.asarray(overlapping), np.asarray(whole))


@pytest.mark.parametrize("method", list(METHODS))
def test_a_batch_prefilled_in_one_chunk_writes_over_its_empty_cache(model, method,
                                                                    monkeypatch):
  # One chunk of all the rows: the empty cache is donated, and its buffers back
  # the cache the prefill writes (one cache less at the peak); chunks of fewer
  # rows keep theirs, which cannot back a larger result.
  gen = importlib.import_module("kivi_jax.generate")
  used = []
  for name in ("_prefill", "_prefill_over_empty"):
    monkeypatch.setattr(gen, name, lambda *a, f=getattr(gen, name), name=name, **k:
                        used.append(name) or f(*a, **k))
  ids = np.random.default_rng(5).integers(0, 256, (2, 40))
  kv = METHODS[method]
  kivi_jax.generate(model, ids, kv_config=kv, max_new_tokens=2)
  monkeypatch.setattr(kivi_jax.memory, "workspace_bytes", lambda cache_total: 0)
  kivi_jax.generate(model, ids, kv_config=kv, max_new_tokens=2)
  assert used == ["_prefill_over_empty", "_prefill"]
  monkeypatch.undo()
  empty = kivi_jax.init_cache(model.config, kv, 2, 128)
  compiled = gen._prefill_over_empty.lower(model.params, ids, np.ones_like(ids), empty,
                                           config=model.config).compile()
  assert compiled.memory_analysis().alias_size_in_bytes == empty.nbytes()


def test_prefill_of_a_filled_cache_gives_nan(model):
  # `prefill` assumes an empty cache; a row that has tokens must not get a
  # silent wrong answer.
  kv = METHODS["kivi2"]
  cache = kivi_jax.init_cache(model.config, kv, 2, 64)
  _, cache = model.prefill(model.params, np.zeros((2, 5), np.int32), cache)
  cache = cache.replace(lengths=cache.lengths.at[1].set(0))
  logits, _ = model.prefill(model.params, np.zeros((2, 5), np.int32), cache)
  assert np.isnan(np.asarray(logits[0])).all() and np.isfinite(np.asarray(logits[1])).all()


def _join(docs, questions):
  """Each row's document followed by its question, left-padded."""
  return _pad([np.concatenate([d, q]) for d, q in zip(docs, questions)], "left")


def test_continuing_a_prefilled_cache_equals_the_whole_prompt(model):
  # fp16 stores keys and values exactly, so appending the question to the
  # document's cache must give what the whole prompt gives.
  rng = np.random.default_rng(5)
  docs = [rng.integers(0, 256, n) for n in (5, 41, 70)]
  questions = [rng.integers(0, 256, n) for n in (3, 20, 9)]
  kv = METHODS["fp16"]
  whole_ids, whole_mask = _join(docs, questions)
  whole = kivi_jax.generate(model, whole_ids, attention_mask=whole_mask, kv_config=kv,
                            max_new_tokens=30)
  ids, mask = _pad(docs, "left")
  cache = kivi_jax.prefill_cache(model, ids, attention_mask=mask, kv_config=kv,
                                 max_length=128)
  before = [np.asarray(x) for x in jax.tree.leaves(cache)]
  q_ids, q_mask = _pad(questions, "left")
  for _ in range(2):  # the cache is not consumed: a second question starts from it too
    out = kivi_jax.generate(model, q_ids, attention_mask=q_mask, cache=cache,
                            max_new_tokens=30)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(whole))
  for a, b in zip(before, jax.tree.leaves(cache)):
    np.testing.assert_array_equal(a, np.asarray(b))


def test_continuing_a_kivi2_cache_equals_forward_then_decode_steps(model):
  # With a quantized cache the question reads the document quantized, so the
  # reference is the model's own steps: the question through one `forward`,
  # then one token at a time, greedy.
  rng = np.random.default_rng(6)
  ids, mask = _pad([rng.integers(0, 256, n) for n in (37, 70)], "left")
  kv = METHODS["kivi2"]
  cache = kivi_jax.prefill_cache(model, ids, attention_mask=mask, kv_config=kv,
                                 max_length=160)
  question = rng.integers(0, 256, (2, 11))
  out = kivi_jax.generate(model, question, cache=cache, max_new_tokens=40)
  steps = jax.tree.map(jnp.copy, cache)  # `model.forward` donates its cache
  logits, steps = model.forward(model.params, question, steps)
  expected = []
  for _ in range(40):
    tok = jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)
    expected.append(np.asarray(tok))
    logits, steps = model.forward(model.params, tok[:, None], steps)
  np.testing.assert_array_equal(np.asarray(out), np.stack(expected, axis=1))


@pytest.mark.parametrize("kwargs, match", [
    (dict(kv_config=kivi_jax.KIVIConfig(4, 4, 16, 32)), "kv_config differs from the given "
     "cache's config"),
    (dict(max_length=200), "max_length belongs to the given cache"),
    (dict(impl="reference"), "impl belongs to the given cache"),
    (dict(question=np.zeros((1, 4), np.int32)), "input_ids has 1 rows and the cache 2"),
    # max_length=64: the 2-bit block takes its granularity, 256 tokens, and a row
    # 32 more in the ring.
    (dict(max_new_tokens=265), r"row 1 of the cache holds 20 tokens: 4 more and "
     r"max_new_tokens=265 need 289, past the cache's capacity of 288"),
])
def test_continuing_a_cache_checks_its_inputs(model, kwargs, match):
  ids, mask = _pad([np.ones(9, np.int32), np.ones(20, np.int32)], "left")
  cache = kivi_jax.prefill_cache(model, ids, attention_mask=mask, kv_config=METHODS["kivi2"],
                                 max_length=64)
  kwargs = {"question": np.zeros((2, 4), np.int32), "max_new_tokens": 8, **kwargs}
  with pytest.raises(ValueError, match=match):
    kivi_jax.generate(model, kwargs.pop("question"), cache=cache, **kwargs)


def test_continuing_a_cache_stops_at_the_models_window(model):
  """A cache's capacity may pass the model's window (whole groups and spans of
  block and ring); a continuation past the window is refused as a new cache is."""
  window = model.config.max_position_embeddings
  ids, mask = _pad([np.ones(9, np.int32), np.ones(20, np.int32)], "left")
  cache = kivi_jax.prefill_cache(model, ids, attention_mask=mask, kv_config=METHODS["kivi2"],
                                 max_length=window - 12)
  assert cache.capacity > window
  question = np.zeros((2, 4), np.int32)
  with pytest.raises(ValueError, match=rf"row 1 of the cache holds 20 tokens: 4 more and "
                     rf"max_new_tokens={window - 23} need {window + 1}, past the model's "
                     rf"context window, max_position_embeddings={window}"):
    kivi_jax.generate(model, question, cache=cache, max_new_tokens=window - 23)
  out = kivi_jax.generate(model, question, cache=cache, max_new_tokens=window - 24)
  assert out.shape == (2, window - 24)


def test_generate_without_a_config_or_a_cache_says_so(model):
  with pytest.raises(ValueError, match="kv_config is required"):
    kivi_jax.generate(model, np.zeros((1, 4), np.int32), max_new_tokens=2)


def test_continuing_a_cache_past_the_free_memory_is_refused_before_copying(model,
                                                                          monkeypatch):
  import importlib
  cache = kivi_jax.prefill_cache(model, np.ones((2, 9), np.int32), kv_config=METHODS["kivi2"],
                                 max_length=64)
  monkeypatch.setattr(kivi_jax.memory, "free_memory_bytes",
                      lambda device=None: cache.nbytes() - 1)
  copied = []
  monkeypatch.setattr(importlib.import_module("kivi_jax.generate"), "_continue",
                      lambda *a, **k: copied.append(1))
  with pytest.raises(ValueError, match="a copy of the cache to continue takes"):
    kivi_jax.generate(model, np.ones((2, 3), np.int32), cache=cache, max_new_tokens=4)
  assert not copied
