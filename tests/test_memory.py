"""kivi_jax.memory: the cache's bytes, the prefill's chunks of rows, max_batch."""

import dataclasses
import json
from pathlib import Path

import jax
import numpy as np
import pytest

import kivi_jax
from kivi_jax import bench_generate, memory, sharding
from kivi_jax.models import llama
from kivi_jax.models.config import ModelConfig
from kivi_jax.models.loading import Model

CONFIG = ModelConfig(architecture="llama", vocab_size=32000, hidden_size=4096,
                     intermediate_size=11008, num_layers=32, num_heads=32, num_kv_heads=32,
                     head_dim=128, dtype="bfloat16")
# Weights as shapes only: nothing of 7B size is allocated.
MODEL = Model(CONFIG, jax.eval_shape(lambda: bench_generate.random_model(CONFIG).params))


@pytest.mark.parametrize("method", ["fp16", "kivi2", "skvq-k2v2-g16-fp8"])
def test_cache_bytes_is_what_init_cache_allocates(method):
  small = ModelConfig(architecture="llama", vocab_size=64, hidden_size=64,
                      intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                      head_dim=32, dtype="bfloat16")
  kv = kivi_jax.get_preset(method)
  calib = None
  if kv.needs_calibration:
    calib = bench_generate._calibration(bench_generate.random_model(small), kv)
  cache = kivi_jax.init_cache(small, kv, 3, 700, calibration=calib)
  assert memory.cache_bytes(small, kv, 3, 700) == cache.nbytes()


def test_cache_bytes_of_auto_follows_the_backend_each_call(monkeypatch):
  """`cache_bytes` keeps the bytes of each resolved layout, and resolves "auto"
  at every call as `init_cache` does: a pretended Hopper GPU, then the CPU
  again, each get their own layout's bytes."""
  from kivi_jax import cache
  from kivi_jax.pallas_kernels import decode_attention_pairs
  kv = kivi_jax.get_preset("kivi2")
  pairs, slots = (memory.cache_bytes(CONFIG, kv, 1, 1536, layout=lay) for lay in
                  ("pairs", "slots"))
  assert pairs != slots
  assert memory.cache_bytes(CONFIG, kv, 1, 1536) == slots
  monkeypatch.setattr(decode_attention_pairs, "hopper", lambda: True)  # a GPU pretended
  monkeypatch.setattr(cache, "kernel_backend", lambda impl: "gpu")
  assert memory.cache_bytes(CONFIG, kv, 1, 1536) == pairs
  assert jax.eval_shape(lambda: kivi_jax.init_cache(CONFIG, kv, 1, 1536)).layout == "pairs"
  monkeypatch.setattr(decode_attention_pairs, "hopper", lambda: False)
  assert memory.cache_bytes(CONFIG, kv, 1, 1536) == slots


def test_max_batch_plans_for_the_pair_layout_from_a_cpu():
  """`layout="pairs"` counts the Hopper GPU's cache here: KIVI-2's block at 1024
  + 512 holds the 1408 tokens a row quantizes (`block_capacity`), 196 MiB a row
  of Llama-2-7B's shapes against the slot layout's 208 (whole 512-token spans),
  so more rows fit the same memory."""
  kv = kivi_jax.get_preset("kivi2")
  small = ModelConfig(architecture="llama", vocab_size=64, hidden_size=256,
                      intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                      head_dim=128, dtype="bfloat16")
  cache = kivi_jax.init_cache(small, kv, 3, 1536, layout="pairs")
  assert memory.cache_bytes(small, kv, 3, 1536, layout="pairs") == cache.nbytes()
  pairs, slots = (memory.cache_bytes(CONFIG, kv, 1, 1536, layout=lay) for lay in
                  ("pairs", "slots"))
  assert (pairs, slots) == (196 * 2**20 + 4, 208 * 2**20 + 4)  # + the row's length
  # The README's prediction for the H200 (its allocator's limit as the rows run
  # there record it): 601 rows of KIVI-2 in the pair layout, 565 in the slots (the
  # pair layout's rows as they ran, in 1536-token blocks), 4.14 times fp16's 145;
  # KIVI-4 410, the SKVQ preset 555 (its own layout, as on the GPU).
  results = Path(__file__).resolve().parent.parent / "benchmarks/results/generate_h200.json"
  data = json.loads(results.read_text())
  runs = (("kivi2", "pairs"), ("kivi2", "slots"), ("fp16", "auto"), ("kivi4", "pairs"),
          ("skvq-k2v2-g16-fp8", "auto"))
  rows = {(method, lay): memory.max_batch(MODEL, kivi_jax.get_preset(method), 1024, 512,
                                          memory_bytes=data["bytes_limit"], flash=True,
                                          layout=lay)
          for method, lay in runs}
  assert rows == {("kivi2", "pairs"): 601, ("kivi2", "slots"): 565, ("fp16", "auto"): 145,
                  ("kivi4", "pairs"): 410, ("skvq-k2v2-g16-fp8", "auto"): 555}
  # The rows run since that estimate (825bfe4) are its plans.
  ran = {r["method"]: r["batch"] for r in data["rows"] if r.get("predicted_largest")
         and r["commit"] in ("c17b8d4", "9f9642d") and r["prompt"] == 1024}
  assert ran == {"kivi2": 601, "kivi4": 410, "skvq-k2v2-g16-fp8": 555}


def test_the_quantizations_float32_is_counted_where_jnp_quantizes():
  # The jnp writer quantizes a tensor in float32 (3 copies of the prompt's
  # keys or values, 4 bytes an element, in the estimate); the kernels read the
  # 16-bit tensor. A plan with flash attention is a GPU's, where the kernels
  # write KIVI's blocks (the pair layout's in groups of up to a span).
  kivi2, skvq = kivi_jax.get_preset("kivi2"), kivi_jax.get_preset("skvq-k2v2-g32")
  count = memory.jnp_quantized_tensors
  assert count(CONFIG, kivi2, True, "pairs") == count(CONFIG, kivi2, True, "slots") == 0
  assert count(CONFIG, kivi_jax.get_preset("fp16"), False) == 0
  assert count(CONFIG, dataclasses.replace(kivi2, group_size=256, residual_length=256), True,
               "pairs") == 2
  assert count(CONFIG, skvq, True) == 2  # SKVQ's layout: jnp everywhere
  assert count(CONFIG, kivi2, False) == 2  # this CPU: the reference writes
  assert count(CONFIG, dataclasses.replace(kivi2, v_bits=16), False) == 1
  kv = CONFIG.num_kv_heads * CONFIG.head_dim
  assert (memory.activation_bytes_per_row(CONFIG, 1000, True, 2)
          - memory.activation_bytes_per_row(CONFIG, 1000, True, 0)) == 1000 * 2 * kv * 4 * 3
  assert memory.prefill_bytes_per_row(CONFIG, skvq, 512, 1536, flash=True) > \
      memory.prefill_bytes_per_row(CONFIG, kivi2, 512, 1536, flash=True)


def test_max_batch_over_a_mesh_plans_each_devices_share():
  # Rows over data: with the weights whole on each device, a data axis of 2
  # holds twice one device's rows, each device planned as one device of half
  # the batch. Heads and the MLP over model: each device holds a share of the
  # weights (all but the embeddings and norms) and half of every row's cache:
  # more than twice the rows, the weights' half freed too. The batch is a
  # multiple of the data axis.
  kv = kivi_jax.get_preset("kivi2")
  plan = dict(memory_bytes=60 * 10**9, flash=True)
  one = memory.max_batch(MODEL, kv, 1024, 512, layout="slots", **plan)
  assert memory.max_batch(MODEL, kv, 1024, 512, mesh=(2, 1), **plan) == 2 * one
  for rows in (1, one, one + 1):
    assert memory.generate_bytes(MODEL, kv, 2 * rows, 1024, 512, True, mesh=(2, 1)) == \
        memory.generate_bytes(MODEL, kv, rows, 1024, 512, True, layout="slots")
  assert memory.max_batch(MODEL, kv, 1024, 512, mesh=(1, 2), **plan) > 2 * one
  split = sum(memory._bytes(MODEL.params["layers"][0][k]) for k in
              ("wqkv", "wo", "w_gate_up", "w_down")) * CONFIG.num_layers
  assert memory._device_bytes(MODEL.params, sharding.param_specs(MODEL.params), 2) == \
      memory._bytes(MODEL.params) - split // 2
  assert memory.max_batch(MODEL, kv, 1024, 512, mesh=kivi_jax.make_mesh(4, 2), **plan) % 4 == 0
  assert memory.device_cache_bytes(CONFIG, kv, 8, 1536, mesh=(4, 2)) == \
      memory.cache_bytes(CONFIG, kv, 8, 1536, "slots") // 8


@pytest.mark.parametrize("mesh, match", [
    ((0, 1), "mesh's data must be a positive integer"),
    ((2,), "a \\(data, model\\) pair"),
    ("data=2", "a \\(data, model\\) pair"),
])
def test_a_mesh_plan_names_a_bad_mesh(mesh, match):
  with pytest.raises(ValueError, match=match):
    memory.max_batch(MODEL, kivi_jax.get_preset("kivi2"), 1024, 512, memory_bytes=10**11,
                     flash=True, mesh=mesh)


def test_prefill_rows_fill_the_budget():
  kv = kivi_jax.get_preset("kivi2")
  per_row = memory.prefill_bytes_per_row(CONFIG, kv, 512, 1536, flash=True)
  # The chunks need not divide the batch (the last one repeats rows).
  assert memory.prefill_rows(96, CONFIG, kv, 512, 1536, 10 * per_row, True) == 10
  assert memory.prefill_rows(97, CONFIG, kv, 512, 1536, 10.5 * per_row, True) == 10
  assert memory.prefill_rows(6, CONFIG, kv, 512, 1536, 10 * per_row, True) == 6
  assert memory.prefill_rows(96, CONFIG, kv, 512, 1536, 0, True) == 1
  # At most PREFILL_TOKENS tokens a chunk, and at least a row.
  assert memory.prefill_rows(96, CONFIG, kv, 512, 1536, 100 * per_row, True) == \
      memory.PREFILL_TOKENS // 512
  assert memory.prefill_rows(96, CONFIG, kv, 2 * memory.PREFILL_TOKENS, 3 * memory.PREFILL_TOKENS,
                             1 << 50, True) == 1
  # Without flash attention a query chunk's scores join each row's share.
  assert memory.prefill_bytes_per_row(CONFIG, kv, 512, 1536, flash=False) > per_row


@pytest.mark.parametrize("method", ["fp16", "kivi2"])
def test_max_batch_is_the_largest_that_fits(method):
  kv = kivi_jax.get_preset(method)
  limit = 140 * 10**9
  best = memory.max_batch(MODEL, kv, 1024, 512, memory_bytes=limit, flash=True)
  assert memory.generate_bytes(MODEL, kv, best, 1024, 512, True) <= limit
  assert memory.generate_bytes(MODEL, kv, best + 1, 1024, 512, True) > limit
  # The cache dominates: KIVI-2 holds 3 bits per element and a 128-token ring.
  per_row = memory.cache_bytes(CONFIG, kv, 1, 1536)
  assert best * per_row > 0.85 * (limit - 13.5e9)
  # generate pads 1000 prompt tokens to 1024 and rounds the capacity for 500
  # more up to 1536 (memory.BUCKET): the same memory as 1024 + 512.
  assert memory.generate_bytes(MODEL, kv, best, 1000, 500, True) == \
      memory.generate_bytes(MODEL, kv, best, 1024, 512, True)
  assert memory.max_batch(MODEL, kv, 1000, 500, memory_bytes=limit, flash=True) == best


def test_max_batch_of_a_device_too_small_is_zero():
  assert memory.max_batch(MODEL, kivi_jax.get_preset("fp16"), 1024, 512,
                          memory_bytes=10**9, flash=True) == 0


@pytest.mark.parametrize("kwargs, match", [
    (dict(prompt_tokens=0, new_tokens=5), "prompt_tokens must be a positive integer"),
    (dict(prompt_tokens=5, new_tokens=2.5), "new_tokens must be a positive integer"),
    (dict(memory_bytes=-5), "memory_bytes must be a positive integer, got -5"),
    (dict(memory_bytes=0), "memory_bytes must be a positive integer, got 0"),
    (dict(memory_bytes=8e10), r"memory_bytes must be a positive integer, got 80000000000\.0"),
])
def test_max_batch_rejects_bad_requests(kwargs, match):
  kwargs = {"prompt_tokens": 1024, "new_tokens": 512, "memory_bytes": 10**12, **kwargs}
  with pytest.raises(ValueError, match=match):
    memory.max_batch(MODEL, kivi_jax.get_preset("fp16"), **kwargs)


SMALL = ModelConfig(architecture="llama", vocab_size=512, hidden_size=256,
                    intermediate_size=512, num_layers=2, num_heads=4, num_kv_heads=2,
                    head_dim=64, max_position_embeddings=1 << 20, dtype="bfloat16")
SMALL_MODEL = Model(SMALL, jax.eval_shape(lambda: bench_generate.random_model(SMALL).params))


@pytest.mark.parametrize("method, batch", [("fp16", 1), ("kivi2", 1), ("kivi2", 3)])
def test_max_context_is_the_longest_prompt_that_fits(method, batch):
  """The longest prompt whose `generate_bytes` fit: one token more does not."""
  kv = kivi_jax.get_preset(method)
  limit = 2 * 10**9
  n = memory.max_context(SMALL_MODEL, kv, 64, batch=batch, memory_bytes=limit, flash=True)
  assert n > 1000
  assert memory.generate_bytes(SMALL_MODEL, kv, batch, n, 64, True) <= limit
  assert memory.generate_bytes(SMALL_MODEL, kv, batch, n + 1, 64, True) > limit


def test_max_context_of_a_quantized_cache_is_bound_by_the_prefill():
  """KIVI-2's tokens take a fifth of fp16's bytes, but the prefill's activations
  (one layer's, for the whole prompt) grow with the prompt as well: its longest
  context is longer than fp16's by less than half the ratio of their caches'
  bytes a token."""
  n = {m: memory.max_context(SMALL_MODEL, kivi_jax.get_preset(m), 64, memory_bytes=2 * 10**9,
                             flash=True) for m in ("fp16", "kivi2")}
  per_token = {m: memory.cache_bytes(SMALL, kivi_jax.get_preset(m), 1, 1 << 16) for m in n}
  assert n["fp16"] < n["kivi2"] < n["fp16"] * per_token["fp16"] / per_token["kivi2"] / 2


def test_max_context_over_a_mesh_plans_each_device():
  # As max_batch's plan: data=2 holds two rows as one device holds one; the
  # model axis splits the weights and the cache, so a row's prompt is longer.
  kv = kivi_jax.get_preset("kivi2")
  plan = dict(memory_bytes=2 * 10**9, flash=True)
  one = memory.max_context(SMALL_MODEL, kv, 64, **plan)
  assert memory.max_context(SMALL_MODEL, kv, 64, batch=2, mesh=(2, 1), **plan) == one
  assert memory.max_context(SMALL_MODEL, kv, 64, mesh=(1, 2), **plan) > one
  with pytest.raises(ValueError, match="batch=1 does not split over the mesh's data axis of 2"):
    memory.max_context(SMALL_MODEL, kv, 64, mesh=(2, 1), **plan)


def test_max_context_stops_at_the_window():
  """`generate` refuses a cache past the model's window: so does the plan."""
  small = dataclasses.replace(SMALL, max_position_embeddings=2048)
  model = Model(small, SMALL_MODEL.params)
  kv = kivi_jax.get_preset("kivi2")
  assert memory.max_context(model, kv, 48, memory_bytes=10**12, flash=True) == 2000
  assert memory.max_context(model, kv, 2048, memory_bytes=10**12, flash=True) == 0
  assert memory.max_context(model, kv, 48, memory_bytes=10**6, flash=True) == 0


@pytest.mark.parametrize("kwargs, match", [
    (dict(new_tokens=0), "new_tokens must be a positive integer, got 0"),
    (dict(batch=0), "batch must be a positive integer, got 0"),
    (dict(batch=True), "batch must be a positive integer, got True"),
    (dict(memory_bytes=-1), "memory_bytes must be a positive integer, got -1"),
])
def test_max_context_rejects_bad_requests(kwargs, match):
  kwargs = {"new_tokens": 64, "memory_bytes": 10**9, **kwargs}
  with pytest.raises(ValueError, match=match):
    memory.max_context(SMALL_MODEL, kivi_jax.get_preset("kivi2"), **kwargs)


def test_max_batch_takes_numpy_integers():
  # Counts read from arrays (np.int64) plan the same batch as Python ints.
  fp16 = kivi_jax.get_preset("fp16")
  assert memory.max_batch(MODEL, fp16, np.int64(1024), np.int32(512),
                          memory_bytes=np.int64(80 * 10**9), flash=True) == \
      memory.max_batch(MODEL, fp16, 1024, 512, memory_bytes=80 * 10**9, flash=True) > 0
  with pytest.raises(ValueError, match="new_tokens must be a positive integer, got True"):
    memory.max_batch(MODEL, fp16, 1024, True, memory_bytes=10**12, flash=True)


def test_a_device_without_a_memory_limit_asks_for_one():
  if jax.default_backend() != "cpu":
    pytest.skip("accelerators report their limit")
  with pytest.raises(ValueError, match="memory_bytes="):
    memory.max_batch(MODEL, kivi_jax.get_preset("fp16"), 1024, 512)


def test_an_accelerators_free_memory_is_its_limit_less_what_is_in_use():
  class Device:  # what a GPU's allocator reports
    platform = "gpu"

    def memory_stats(self):
      return {"bytes_limit": 1000, "bytes_in_use": 300, "peak_bytes_in_use": 900}

  assert memory.device_memory_bytes(Device()) == 1000
  assert memory.free_memory_bytes(Device()) == 700


# Commits whose prefill kept every layer's q, k, v projection alive to its end
# (before c37d8ab's barrier): their rows peaked higher than the prefill now does.
PREFILL_BEFORE_THE_BARRIER = frozenset({
    "19d40c7", "1e7ce18", "2c3e4e8", "5b45ea6", "66b57a2", "6fe687a", "8f53887",
    "95da2b7", "9635e39", "d390edb", "eb0c10b"})


# Commits whose pair layout sized a block as the slot layout does (max_length
# rounded up to 512 tokens, before c87d28b): their rows are estimated in the slots.
PAIRS_IN_512_TOKEN_BLOCKS = frozenset({
    "01ffe1e", "4b01e11", "6fe687a", "8f53887", "9635e39", "c37d8ab", "fc2e335"})


# Commits whose `generate` copied the empty cache beside a one-chunk prefill
# (before 27af6b4 donated it): their longest rows held the cache twice.
EMPTY_CACHE_COPIED = frozenset({"9103f18"})


# Commits whose prefill ran a long prompt's MLP block whole (before f56e26d ran
# it over chunks of `llama.MLP_TOKENS` tokens): their longest rows are estimated so.
MLP_WHOLE = frozenset({"9103f18", "226f2b5"})


def _as_run(monkeypatch, commit: str) -> None:
  """`llama.MLP_TOKENS` as `commit`'s prefill had it."""
  if commit in MLP_WHOLE:
    monkeypatch.setattr(llama, "MLP_TOKENS", 1 << 40)
  else:
    monkeypatch.undo()


def test_a_chunk_of_rows_runs_its_mlp_whole():
  # `activation_bytes_per_row` counts the MLP of a prompt of several rows whole.
  assert memory.PREFILL_TOKENS <= llama.MLP_TOKENS


def test_the_estimate_covers_every_peak_measured_on_the_gpu(monkeypatch):
  # generate's rows of P2 on an H200 record their peak and how many rows a
  # prefill chunk ran; with those chunks the estimate must cover the peak
  # (it is what max_batch and the chunks plan on), and by no more than 2.5 GB
  # at the requests of up to 4096 tokens, so that max_batch stays near the
  # largest batch that fits. The longest contexts (a row of up to 602,816
  # tokens, prefilled in one chunk) are covered too, by less than the
  # activations' term, the estimate's loose one there: the cache is counted as
  # often as such a prefill holds it (once, its empty input donated to it;
  # twice in the rows of before the donation). Every row is estimated as the
  # code that ran it held memory, by today's estimate: the float32 of a
  # quantization only where jnp quantizes (no row here), though the plans of
  # before 825bfe4 counted it for every method.
  results = Path(__file__).resolve().parent.parent / "benchmarks/results/generate_h200.json"
  rows = [r for r in json.loads(results.read_text())["rows"]
          if r["kind"] in ("generate", "longest") and "peak_bytes" in r
          and r["commit"] not in PREFILL_BEFORE_THE_BARRIER]
  # c37d8ab's 539 rows of KIVI-2, fc2e335's three largest batches, 9103f18's five
  # longest, 226f2b5's four and 8eb877e's four.
  assert len(rows) >= 17 and sum(r["kind"] == "longest" for r in rows) >= 13
  models = {}
  for r in rows:
    length, _ = memory.generate_lengths(r["prompt"], r["new"], 1 << 30)
    config, _ = bench_generate.fit_window(bench_generate.SHAPES[r["shape"]], length)
    if config not in models:  # the weights as shapes, once a shape
      models[config] = Model(config, jax.eval_shape(
          lambda: bench_generate.random_model(config).params))
    layout = r.get("layout") or "slots"
    _as_run(monkeypatch, r["commit"])
    if r["commit"] in PAIRS_IN_512_TOKEN_BLOCKS:
      layout = "slots"
    estimate = memory.generate_bytes(models[config], kivi_jax.get_preset(r["method"]),
                                     r["batch"], r["prompt"], r["new"], True,
                                     rows=r.get("prefill_rows", 1), layout=layout,
                                     mesh=tuple(r["mesh"]) if r.get("mesh") else None)
    if r["commit"] in EMPTY_CACHE_COPIED and r.get("prefill_rows", 1) >= r["batch"]:
      estimate += r["cache_bytes"]
    where = f"{r['shape']} {r['method']} {r['batch']} x {r['prompt']} + {r['new']}"
    assert estimate >= r["peak_bytes"], where
    if r["prompt"] <= 4096:
      assert estimate <= r["peak_bytes"] + 2.5e9, where
    if r["kind"] == "longest":
      _, width = memory.generate_lengths(r["prompt"], r["new"], config.max_position_embeddings)
      jnp_quantized = memory.jnp_quantized_tensors(config, kivi_jax.get_preset(r["method"]),
                                                   True, layout)
      activations = memory.activation_bytes_per_row(config, width, True, jnp_quantized)
      assert estimate - r["peak_bytes"] < activations, where


def test_the_readmes_longest_context_figures(monkeypatch):
  # README's table of the longest contexts run on the H200 with the empty cache
  # donated to the prefill (226f2b5's rows, 0bfd948's plans; 8eb877e's, a long
  # prompt's MLP in chunks): today's estimate of each row's peak (as it ran),
  # the prompts `max_context` plans now, as `kivi-jax bench generate
  # --longest-context 512` plans them there (the windows widened, KIVI in the
  # pair layout, fp16 in its own), and 8eb877e's rows as it planned them.
  results = json.loads((Path(__file__).resolve().parent.parent
                        / "benchmarks/results/generate_h200.json").read_text())
  estimates, plans, then = {}, {}, {}
  for shape in ("llama2-7b", "llama3-8b"):
    config = bench_generate.fit_window(bench_generate.SHAPES[shape],
                                       bench_generate.LONGEST_SEARCH)[0]
    model = Model(config, jax.eval_shape(lambda: bench_generate.random_model(config).params))
    for r in results["rows"]:
      if (r["kind"] == "longest" and r["shape"] == shape
              and r["commit"] in ("226f2b5", "8eb877e")):
        _as_run(monkeypatch, r["commit"])
        estimates[r["commit"], shape, r["method"]] = round(memory.generate_bytes(
            model, kivi_jax.get_preset(r["method"]), 1, r["prompt"], r["new"], True,
            layout=r["layout"]) / 2**30, 1)
    monkeypatch.undo()
    for method in ("fp16", "kivi4", "kivi2"):
      layout = "slots" if method == "fp16" else "pairs"
      plans[shape, method] = bench_generate.longest_plan(
          shape, method, 512, results["bytes_limit"], layout)
      with monkeypatch.context() as m:  # before 825bfe4 every method counted the
        # float32 temporaries of a jnp quantization of keys and values
        m.setattr(memory, "jnp_quantized_tensors", lambda *args: 2)
        then[shape, method] = bench_generate.longest_plan(
            shape, method, 512, results["bytes_limit"], layout)
  assert estimates == {
      ("226f2b5", "llama2-7b", "fp16"): 75.1, ("226f2b5", "llama2-7b", "kivi4"): 77.5,
      ("226f2b5", "llama2-7b", "kivi2"): 78.9, ("226f2b5", "llama3-8b", "fp16"): 89.0,
      ("8eb877e", "llama2-7b", "fp16"): 116.3, ("8eb877e", "llama2-7b", "kivi4"): 98.9,
      ("8eb877e", "llama2-7b", "kivi2"): 90.9, ("8eb877e", "llama3-8b", "fp16"): 119.0}
  assert plans == {("llama2-7b", "fp16"): 209_856, ("llama2-7b", "kivi4"): 518_272,
                   ("llama2-7b", "kivi2"): 706_944, ("llama3-8b", "fp16"): 684_096,
                   ("llama3-8b", "kivi4"): 1_353_408, ("llama3-8b", "kivi2"): 1_646_144}
  # The table's rows of 8eb877e are its plans, run.
  ran = {(r["shape"], r["method"]): r["prompt"] for r in results["rows"]
         if r["kind"] == "longest" and r["commit"] == "8eb877e" and "peak_bytes" in r}
  assert len(ran) == 4 and all(then[k] == v for k, v in ran.items())
  assert then[("llama3-8b", "kivi2")] == 1_243_008
  # Those of 9f9642d (2026-12-06) are today's plans, run.
  ran = {(r["shape"], r["method"]): r["prompt"] for r in results["rows"]
         if r["kind"] == "longest" and r["commit"] == "9f9642d" and "peak_bytes" in r}
  assert ran == {("llama2-7b", "fp16"): plans["llama2-7b", "fp16"]}
