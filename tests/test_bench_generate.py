"""kivi-jax bench generate's pieces on the CPU: a tiny shape measured end to end,
the trace summary, the command's argument checks."""

import dataclasses
import gzip
import importlib
import json
import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from kivi_jax import bench
from kivi_jax import bench_generate as bg
from kivi_jax import memory
from kivi_jax import pallas_kernels
from kivi_jax.attention import decode_attention
from kivi_jax.cli import main, run_metadata
from kivi_jax.config import get_preset
from kivi_jax.models.config import ModelConfig
from kivi_jax.sharding import make_mesh

TINY = ModelConfig(architecture="llama", vocab_size=512, hidden_size=128,
                   intermediate_size=256, num_layers=2, num_heads=4, num_kv_heads=2,
                   head_dim=32, dtype="float32")


@pytest.fixture(scope="module")
def model():
  return bg.random_model(TINY)


@pytest.mark.parametrize("budget_s, calls", [(1e9, 4), (0.0, 2)])
def test_prefill_is_timed_up_to_three_times_within_its_budget(model, monkeypatch, budget_s,
                                                              calls):
  """One compiling call, then timed calls while fewer than three have run and
  they have taken under `PREFILL_TIMING_S` (a prefill of a minute runs twice)."""
  ran = []

  def counted(*args, **kwargs):
    ran.append(1)
    return prefill(*args, **kwargs)

  prefill = bg._prefill
  monkeypatch.setattr(bg, "_prefill", counted)
  monkeypatch.setattr(bg, "PREFILL_TIMING_S", budget_s)
  bg.time_generate(model, "kivi2", batch=2, prompt=40, new=2)
  assert len(ran) == calls


@pytest.mark.parametrize("method", ["fp16", "kivi2", "skvq-k2v2-g16-fp8"])
def test_generate_and_step_measure(model, method, monkeypatch, capsys):
  # The timed call compiles nothing: the first call, stopped in its decode
  # loop, compiled it all.
  gen = importlib.import_module("kivi_jax.generate")
  programs = []

  def counted(*args, **kwargs):
    programs.append((gen._prefill._cache_size(), gen._decode._cache_size()))
    return bg_generate(*args, **kwargs)

  bg_generate = bg.generate
  monkeypatch.setattr(bg, "generate", counted)
  # Enough new tokens that the decode loop, not timer noise, separates the
  # prefill alone from the whole call.
  row = bg.time_generate(model, method, batch=2, prompt=40, new=32)
  # Its stages on stderr, where a row stopped past its time finds them.
  stages = [line for line in capsys.readouterr().err.splitlines() if bg._STAGE.match(line)]
  assert len(stages) == 2 and "prefill: " in stages[0] and "generate compiled" in stages[1]
  programs.append((gen._prefill._cache_size(), gen._decode._cache_size()))
  assert len(programs) == 3 and programs[1] == programs[2]
  assert row["tokens_per_s"] > 0 and 0 < row["prefill_s"] < row["total_s"]
  assert row["cache_bytes"] < row["predicted_peak_bytes"]
  assert row["layout"] == "slots"  # a CPU's (the pair layout is Hopper's)
  step = bg.time_decode_step(model, method, batch=2, context=100, steps=3, repeats=2,
                             copy_tbps=1.0)
  assert step["layout"] == "slots"
  assert step["step_ms"] > 0 and step["floor_ms"] > step["weights_floor_ms"] > 0
  stages = [line for line in capsys.readouterr().err.splitlines() if bg._STAGE.match(line)]
  assert len(stages) == 1 and "prefilled and compiled" in stages[0]
  # A decode step reads every weight but the embedding table's gather.
  assert step["weight_bytes"] == sum(
      x.nbytes for x in jax.tree.leaves(model.params)) - \
      model.params["embed"].nbytes


def test_decode_step_prefills_in_chunks_of_rows(model, monkeypatch):
  """As `generate`, the step's context is prefilled a chunk of rows at a time
  (`memory.prefill_rows`), into one cache of every row."""
  chunks = []

  def one_row(batch, *args):
    chunks.append(batch)
    return 1
  monkeypatch.setattr(bg.memory, "prefill_rows", one_row)
  step = bg.time_decode_step(model, "kivi2", batch=2, context=100, steps=3, repeats=2,
                             copy_tbps=1.0)
  assert chunks == [2] and step["step_ms"] > 0
  capacity = 100 + 3 * (2 + 2)
  assert step["cache_bytes"] == memory.cache_bytes(model.config, get_preset("kivi2"), 2,
                                                   capacity)


def test_measures_over_a_mesh():
  mesh = make_mesh(2, 2)
  model = bg.random_model(TINY, mesh=mesh)
  assert model.params["layers"][0]["w_gate_up"].sharding.spec == P(None, None, "model")
  assert bg.time_generate(model, "kivi2", batch=2, prompt=40, new=6,
                          mesh=mesh)["tokens_per_s"] > 0
  assert bg.time_decode_step(model, "kivi2", batch=2, context=100, steps=3, repeats=2,
                             copy_tbps=1.0, mesh=mesh)["step_ms"] > 0


def test_trace_summary_groups_device_kernels(tmp_path):
  events = [
      {"ph": "M", "name": "process_name", "pid": 1, "args": {"name": "/device:GPU:0"}},
      {"ph": "M", "name": "process_name", "pid": 2, "args": {"name": "/host:CPU"}},
      {"ph": "X", "pid": 1, "name": "kivi_decode_attention", "dur": 200},
      {"ph": "X", "pid": 1, "name": "kivi_mha_scores", "dur": 60},
      {"ph": "X", "pid": 1, "name": "kivi_mha_values", "dur": 40},
      {"ph": "X", "pid": 1, "name": "kivi_dense_decode", "dur": 100},
      {"ph": "X", "pid": 1, "name": "gemm_fusion_dot_7", "dur": 500},
      {"ph": "X", "pid": 1, "name": "memcpy128", "dur": 100},
      {"ph": "X", "pid": 1, "name": "input_transpose_fusion", "dur": 100},
      {"ph": "X", "pid": 2, "name": "PjitFunction", "dur": 9999},
  ]
  (tmp_path / "run").mkdir()
  with gzip.open(tmp_path / "run" / "perfetto_trace.json.gz", "wt") as f:
    json.dump({"traceEvents": events}, f)
  hlo = '%gemm_fusion_dot.7 = bf16[8] fusion(), metadata={op_name="jit(f)/BTD,DE->BTE"}'
  out = bg.summarize_trace(str(tmp_path), steps=2, hlo=hlo)
  assert out["device_ms_per_step"] == pytest.approx(0.55)
  assert out["by_kind_ms"] == pytest.approx({"matmul": 0.25, "attention kernel": 0.2,
                                             "copy": 0.05, "transpose": 0.05})
  assert out["top_kernels"][0]["op"] == "jit(f)/BTD,DE->BTE"


def _kernel_names():
  """The `name=` of every Pallas kernel the package defines."""
  root = pathlib.Path(pallas_kernels.__file__).parent
  names = set()
  for path in root.glob("*.py"):
    names.update(re.findall(r'name="(\w+)"', path.read_text()))
  return sorted(names)


def test_every_kernel_is_counted_as_attention_or_write():
  # A profile's kinds must see each kernel by its name: SKVQ's two kernels
  # had been counted as "other fusion" under a name they did not have.
  names = _kernel_names()
  assert {"kivi_decode_attention", "skvq_decode_scores", "kivi_quantize_pack"} <= set(names)
  for name in names:
    want = "write kernel" if "quantize_pack" in name or "update" in name else "attention kernel"
    assert bg.kernel_kind(name) == want, name


@pytest.mark.parametrize("args, match", [
    (["--requests", "1024"], "PROMPT\\+NEW pairs"),
    (["--methods", "kivi3"], "unknown cache method"),
    (["--shape", "llama-70b"], "unknown shape"),
    (["--mesh", "data=2"], "data=D,model=M"),
    (["--mesh", "data=2,model=x"], "data=D,model=M"),
    (["--mesh", "data=2,model=1", "--longest-context", "8"], "splits over no data axis"),
    (["--row-timeout", "0"], "--row-timeout must be a positive"),
    (["--row-timeout", "nan"], "--row-timeout must be a positive"),
    (["--batches", "0"], "--batches takes comma-separated positive integers, got '0'"),
    (["--step-batches", "1,x"], "--step-batches takes comma-separated positive integers"),
    (["--hf-batches", "-4"], "--hf-batches takes comma-separated positive integers"),
    (["--step-context", "0"], "--step-context must be a positive number of tokens, got 0"),
    (["--longest-context", "0"], "--longest-context must be a positive number of new tokens"),
])
def test_bench_generate_rejects_bad_arguments(args, match, capsys):
  assert main(["bench", "generate", *args]) == 2
  assert re.search(match, capsys.readouterr().err)


@pytest.mark.parametrize("kw, match", [
    (dict(batches=(8, 0)), r"batches must be positive integers, got \(8, 0\)"),
    (dict(step_batches=(1.5,)), r"step_batches must be positive integers"),
    (dict(hf_batches=(-1,)), r"hf_batches must be positive integers"),
    (dict(step_context=0), r"step_context must be a positive integer, got 0"),
    (dict(batches=(True,)), r"batches must be positive integers, got \(True,\)"),
    (dict(shape="llama-70b"), r"unknown shape 'llama-70b'"),
    (dict(methods=("kivi2", "kivi3")), r"unknown cache method 'kivi3'"),
    (dict(requests=((1024, 0),)), r"a request's new tokens must be a positive integer, got 0"),
    (dict(requests=((1024,),)), r"requests must be \(prompt, new tokens\) pairs"),
    (dict(requests=(1024, 512)), r"requests must be \(prompt, new tokens\) pairs"),
    (dict(row_timeout=0), r"row_timeout must be a positive number of seconds, got 0"),
    (dict(longest_new=0), r"longest_new must be a positive integer, got 0"),
])
def test_generate_benchmark_refuses_bad_arguments_before_any_work(kw, match, monkeypatch):
  monkeypatch.setattr(bg, "measure", lambda *a, **k: pytest.fail("measured"))
  with pytest.raises(ValueError, match=match):
    bg.generate_benchmark(**{"shape": "llama2-7b", **kw})


def test_generate_benchmark_takes_numpy_batches_and_writes_them_as_ints(tmp_path, monkeypatch):
  """Batch sizes and requests read from an array (numpy integers) run, and the
  rows they make are written out: JSON has no numpy integers."""
  monkeypatch.setattr(bg, "device_info", lambda *_: {
      "kind": "device", "device": "fake", "bytes_limit": 80 * 2**30, "copy_tbps": 4.0})
  specs = []
  monkeypatch.setattr(bg, "measure", lambda spec, **_: specs.append(spec) or {**spec})
  out = tmp_path / "rows.json"
  bg.generate_benchmark("llama2-7b", methods=("kivi2",), requests=((np.int64(64), np.int32(8)),),
                        batches=(np.int64(2),), step_batches=(np.int32(1),), largest=False,
                        hf_batches=(np.int64(4),), out=str(out), progress=lambda _: None)
  rows = json.loads(out.read_text())["rows"]
  assert [(r["kind"], r["batch"]) for r in rows] == [("step", 1), ("generate", 2), ("hf", 4)]
  assert all(type(s["batch"]) is int for s in specs)
  assert (rows[1]["prompt"], rows[1]["new"]) == (64, 8)


def test_the_largest_batch_over_a_mesh_is_planned_for_each_device(monkeypatch):
  """Over a mesh the largest batch is `max_batch`'s for each device's memory
  (a multiple of the data axis), and after an out-of-memory row the next
  try stays one."""
  monkeypatch.setattr(bg, "device_info", lambda *_: {
      "kind": "device", "device": "fake", "bytes_limit": 80 * 2**30, "copy_tbps": 4.0})
  specs, calls = [], []

  def measure(spec, **_):  # the first row of all runs out of memory
    specs.append(spec)
    calls.append(spec)
    return {**spec, **({"error": "out of memory"} if len(calls) == 1 else {})}
  monkeypatch.setattr(bg, "measure", measure)
  bg.generate_benchmark("llama2-7b", methods=("kivi2",), requests=((1024, 512),), batches=(),
                        step_batches=(), hf_batches=(), mesh=(2, 1), progress=lambda _: None)
  shapes = bg.Model(bg.SHAPES["llama2-7b"], jax.eval_shape(
      lambda: bg.random_model(bg.SHAPES["llama2-7b"]).params))
  best = memory.max_batch(shapes, get_preset("kivi2"), 1024, 512, memory_bytes=80 * 2**30,
                          flash=True, mesh=(2, 1))
  assert [(s["batch"], s["mesh"]) for s in specs] == [(best, [2, 1]),
                                                      (best // 2 * 9 // 10 * 2, [2, 1])]
  assert best % 2 == 0 and best > 2 * 100
  # The longest context, a batch of one, over the model axis: each device's plan.
  specs.clear()
  bg.generate_benchmark("llama2-7b", methods=("kivi2",), requests=(), step_batches=(),
                        hf_batches=(), mesh=(1, 2), longest_new=512, progress=lambda _: None)
  plan = bg.longest_plan("llama2-7b", "kivi2", 512, 80 * 2**30, "slots", (1, 2))
  assert [(s["kind"], s["prompt"], s["mesh"]) for s in specs] == [("longest", plan, [1, 2])]
  assert plan > bg.longest_plan("llama2-7b", "kivi2", 512, 80 * 2**30, "slots")


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="needs a machine without accelerator")
def test_benches_refuse_a_machine_without_accelerator(capsys, monkeypatch):
  assert bg._worker({"kind": "device"})["error"] == "no accelerator"
  # The worker's answer, as the sweep gets it, stops the sweep with a clear error.
  monkeypatch.setattr(bg, "measure", lambda spec, **_: {**spec, **bg._worker(spec)})
  with pytest.raises(RuntimeError, match="measures a GPU or TPU: jax sees only the CPU"):
    bg.generate_benchmark("llama2-7b")
  assert main(["bench", "attention", "--lengths", "64"]) == 2
  assert "times the GPU kernels against cuDNN: jax's backend here is 'cpu'" in (
      capsys.readouterr().err)


def test_the_attention_step_is_decode_attention_over_its_inputs():
  """`bench.attention_step` (what `bench attention` and scripts/trace_attention.py
  time): each copy its own query and new token appended, and the step is
  `decode_attention` of that input."""
  config = get_preset("kivi2")
  key = jax.random.key(0)
  layer, lens = bench._kivi_layer(key, config, 2, 2, 299, 128, jnp.bfloat16, "reference")
  step, inputs = bench.attention_step(key, config, layer, lens, 8, "reference", copies=2)
  assert len(inputs) == 2 and inputs[0][0].shape == (2, 1, 8, 128)
  assert not np.array_equal(inputs[0][0], inputs[1][0])
  for q, appended, flushed, n in inputs:
    want = decode_attention(q, appended, flushed, n, jnp.ones_like(n), config, None,
                            "reference")
    np.testing.assert_array_equal(np.asarray(step(q, appended, flushed, n), np.float32),
                                  np.asarray(want, np.float32))


@pytest.mark.parametrize("args, match", [
    (["bench", "attention", "--lengths", "0,64"], "--lengths takes comma-separated positive"),
    (["bench", "attention", "--kv-heads", "3"], "q_heads=32 must be a multiple of kv_heads=3"),
    (["bench", "attention", "--batch", "0"], "batch must be a positive integer, got 0"),
    (["bench", "attention", "--methods", "kivi3"], "unknown cache method"),
    (["eval", "passkey", "--lengths", "512,x"], "--lengths takes comma-separated positive"),
])
def test_benches_and_evals_name_bad_lists_and_shapes(args, match, capsys):
  assert main(args) == 2
  assert re.search(match, capsys.readouterr().err)


def test_bench_generate_without_requests_measures_steps_only(monkeypatch):
  seen = {}
  monkeypatch.setattr(bg, "generate_benchmark", lambda **kw: seen.update(kw))
  assert main(["bench", "generate", "--requests", "", "--hf-batches", ""]) == 0
  assert seen["requests"] == () and seen["hf_batches"] == () and seen["step_batches"] == (1, 32)
  assert seen["longest_new"] is None
  assert main(["bench", "generate", "--longest-context", "512"]) == 0
  assert seen["longest_new"] == 512


def test_worker_imports_this_package_from_any_directory(tmp_path, monkeypatch):
  # From a checkout, `python -m` in the worker would put the working directory's
  # kivi_jax/ first on the path; a decoy there must not be what the worker runs.
  (tmp_path / "kivi_jax").mkdir()
  (tmp_path / "kivi_jax" / "__init__.py").write_text("raise ImportError('the decoy ran')\n")
  monkeypatch.chdir(tmp_path)
  row = bg.measure({"kind": "nope"}, timeout=300)
  assert row["error"] == "failed"
  assert "unknown measurement kind 'nope'" in row["log"][-1]


def test_worker_widens_the_window_for_a_longer_request(monkeypatch):
  # P2's 4096 + 512 of Llama-2-7B shapes passes Llama-2's 4096-token window:
  # generate refuses such a request, so the worker widens the random model's
  # window to it and the row says so.
  monkeypatch.setitem(bg.SHAPES, "tiny", dataclasses.replace(TINY, max_position_embeddings=32))
  spec = {"kind": "generate", "shape": "tiny", "method": "kivi2", "batch": 2, "new": 6}
  with pytest.raises(ValueError, match="max_position_embeddings=32"):
    bg.time_generate(bg.random_model(bg.SHAPES["tiny"]), "kivi2", batch=2, prompt=40, new=6)
  row = bg._worker({**spec, "prompt": 40})
  assert row["window_widened_from"] == 32 and row["tokens_per_s"] > 0
  assert "window_widened_from" not in bg._worker({**spec, "prompt": 26})


def test_the_longest_context_decodes_once_and_says_at_what_peak(model, monkeypatch):
  """`longest` rows: one `generate` call of one row (its compiling included),
  the window widened to the prompt where it is past the shape's."""
  calls = []

  def counted(*args, **kwargs):
    calls.append(args[1].shape)
    return bg_generate(*args, **kwargs)

  bg_generate = bg.generate
  monkeypatch.setattr(bg, "generate", counted)
  row = bg.time_longest(model, "kivi2", prompt=40, new=4)
  assert calls == [(1, 40)]
  assert row["seconds_with_compile"] > 0 and row["cache_bytes"] < row["predicted_peak_bytes"]
  assert row["layout"] == "slots"  # a CPU's; the row says which it ran in
  monkeypatch.setitem(bg.SHAPES, "tiny", dataclasses.replace(TINY, max_position_embeddings=32))
  row = bg._worker({"kind": "longest", "shape": "tiny", "method": "fp16", "prompt": 40,
                    "new": 4})
  assert row["window_widened_from"] == 32 and calls[-1] == (1, 40)


def test_the_longest_context_is_planned_and_shortened_while_out_of_memory(monkeypatch):
  """Each method's longest prompt as `max_context` plans it for the device (the
  shape's window widened), a tenth shorter while its row runs out of memory."""
  planned = []

  def max_context(model, kv, new, *, memory_bytes, flash, layout, mesh):
    assert mesh is None
    planned.append((model.config.max_position_embeddings, kv, new, memory_bytes, flash,
                    layout))
    return 1000

  specs = []

  def fake_measure(spec, timeout=None):
    if spec["kind"] == "device":
      assert (spec["shape"], spec["methods"]) == ("llama2-7b", ["kivi2"])
      return {"kind": "device", "device": "fake", "bytes_limit": 2**36, "copy_tbps": 1.0,
              "layouts": {"kivi2": "pairs"}}
    specs.append(spec)
    return {**spec, "error": "out of memory"} if spec["prompt"] > 850 else spec

  monkeypatch.setattr(bg.memory, "max_context", max_context)
  monkeypatch.setattr(bg, "measure", fake_measure)
  result = bg.generate_benchmark("llama2-7b", methods=("kivi2",), requests=(),
                                 step_batches=(), hf_batches=(), longest_new=512,
                                 progress=lambda s: None)
  assert planned == [(bg.LONGEST_SEARCH, get_preset("kivi2"), 512, 2**36, True, "pairs")]
  assert [(s["kind"], s["batch"], s["prompt"], s["new"]) for s in specs] == [
      ("longest", 1, 1000, 512), ("longest", 1, 900, 512), ("longest", 1, 810, 512)]
  assert "layouts" not in result


def test_the_largest_batch_is_planned_in_the_layout_the_device_takes(monkeypatch):
  """The sweep's own process runs on the CPU, where every cache takes the slot
  layout; `max_batch` plans with the layout the device's worker reports (a
  Hopper GPU's pair layout holds KIVI-2's rows in fewer bytes)."""
  planned = {}

  def max_batch(model, kv, prompt, new, *, memory_bytes, flash, layout, mesh):
    assert mesh is None
    planned[kv] = layout
    return 0

  monkeypatch.setattr(bg.memory, "max_batch", max_batch)
  monkeypatch.setattr(bg, "measure", lambda spec, **_: {
      "kind": "device", "device": "fake", "bytes_limit": 2**36, "copy_tbps": 1.0,
      "layouts": bg.device_layouts(spec["shape"], spec["methods"])})
  from kivi_jax import cache
  from kivi_jax.pallas_kernels import decode_attention_pairs
  monkeypatch.setattr(decode_attention_pairs, "hopper", lambda: True)  # a GPU pretended
  monkeypatch.setattr(cache, "kernel_backend", lambda impl: "gpu")
  bg.generate_benchmark("llama2-7b", methods=("fp16", "kivi2"), requests=((1024, 512),),
                        batches=(), step_batches=(), hf_batches=(), progress=lambda s: None)
  assert planned == {get_preset("fp16"): "slots", get_preset("kivi2"): "pairs"}


def test_a_row_past_its_time_is_stopped_and_recorded():
  # The worker cannot even import jax in a hundredth of a second.
  row = bg.measure({"kind": "device"}, timeout=0.01)
  assert row["error"] == "timed out" and row["timeout_s"] == 0.01


def test_a_timed_out_rows_log_keeps_the_stages_it_reached(monkeypatch):
  """What the worker wrote to stderr before it was stopped: its stages, not
  the warnings after them (a row of 2026-12-06 timed out with an empty log)."""
  err = ("[15.2 s] prefill: 13.80 s a call (1 timed after the first)\n"
         "W1206 a warning from XLA\n"
         "[96.0 s] generate compiled; the timed call of 512 new tokens starts\n"
         "W1206 another\n").encode()

  def stopped(cmd, timeout, **kwargs):
    raise bg.subprocess.TimeoutExpired(cmd, timeout, stderr=err)

  monkeypatch.setattr(bg.subprocess, "run", stopped)
  row = bg.measure({"kind": "generate"}, timeout=540)
  assert row["error"] == "timed out" and row["log"] == [
      "[15.2 s] prefill: 13.80 s a call (1 timed after the first)",
      "[96.0 s] generate compiled; the timed call of 512 new tokens starts"]


@pytest.mark.parametrize("text", ["not json", "[1, 2]", '{"note": "no rows"}'])
def test_an_out_file_of_no_rows_is_refused_before_any_measurement(monkeypatch, tmp_path,
                                                                  text):
  def fake_measure(spec, timeout=None):
    raise AssertionError("measured before the out file was checked")

  monkeypatch.setattr(bg, "measure", fake_measure)
  out = tmp_path / "other.json"
  out.write_text(text)
  with pytest.raises(ValueError, match="out: .*other.json"):
    bg.generate_benchmark("llama2-7b", methods=("kivi2",), requests=((1024, 512),),
                          batches=(), step_batches=(), hf_batches=(), out=str(out),
                          progress=lambda s: None)
  assert out.read_text() == text  # left as it was


def test_the_sweep_goes_on_past_a_timed_out_row(monkeypatch, tmp_path):
  # A timed-out largest batch is recorded, not retried smaller (only running
  # out of memory is), and the next method and request still run.
  calls = []

  def fake_measure(spec, timeout=None):
    calls.append((spec["kind"], spec.get("method"), spec.get("batch"), timeout))
    if spec["kind"] == "device":
      return {"kind": "device", "device": "fake", "bytes_limit": 2**36, "copy_tbps": 1.0}
    if spec.get("method") == "kivi2":
      return {**spec, "error": "timed out", "timeout_s": timeout}
    return {**spec, "tokens_per_s": 1.0}

  monkeypatch.setattr(bg, "measure", fake_measure)
  out = tmp_path / "rows.json"
  # A file of an earlier run: its fields (a note among them) and rows stay.
  earlier = {"protocol": "P2 end-to-end decode", "device": "older", "date": "2026-01-01",
             "note": "how the rows were made", "rows": [{"kind": "generate", "batch": 3}]}
  out.write_text(json.dumps(earlier))
  result = bg.generate_benchmark("llama2-7b", methods=("kivi2", "fp16"),
                                 requests=((1024, 512),), batches=(), step_batches=(),
                                 hf_batches=(), out=str(out), row_timeout=7,
                                 progress=lambda s: None)
  assert [c[:2] for c in calls[1:]] == [("generate", "kivi2"), ("generate", "fp16")]
  assert all(c[3] == 7 for c in calls[1:])
  assert result["rows"][0] == earlier["rows"][0]
  assert result["rows"][1]["error"] == "timed out"
  # Its fields as they were: none of this run's (its shape, methods, device)
  # added beside rows it did not measure.
  assert {k: v for k, v in result.items() if k != "rows"} == {
      k: v for k, v in earlier.items() if k != "rows"}
  # Each new row says where and when it ran: the worker's device, this run's
  # jax, date and commit.
  meta = run_metadata()
  assert all(row["device"] == "fake" and row["jax"] == meta["jax"]
             and row["date"] == meta["date"] and row["commit"] == meta["commit"]
             for row in result["rows"][1:])
  assert json.loads(out.read_text()) == result
