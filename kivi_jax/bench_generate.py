"""PROTOCOLS.md P2: end-to-end decode throughput, capacity and the decode step's floor.

Shapes of Llama-2-7B and Llama-3-8B with random bf16 weights (speed does not
depend on the values). Each measurement runs in a fresh process
(`python -m kivi_jax.bench_generate WORKER_JSON`), so a peak-memory figure is
that run's own and an out-of-memory ends only that run. What a run measures:

- `generate`: tokens/s = batch x new tokens / the whole call (prefill
  included), the prefill's seconds alone, peak device memory; the second
  call is timed (the first compiles), with greedy decoding and no EOS.
- `step`: one decode step (`model.forward` on one token per row, the cache
  donated) at a given context, median of timed steps after warm-up, against
  its floor: the bytes a step must read (the weights it multiplies by, the
  cache's live part) over the copy bandwidth measured in the same process.
  With `profile`, a `jax.profiler` trace of a few steps is summarized by
  kind of device work (matmuls, the attention and write kernels, copies,
  transposes, ...).
- `longest`: one row of the longest prompt `kivi_jax.max_context` plans
  with a number of new tokens, generated once (compiling included): that it
  decodes, and its peak memory.
- `hf`: HF transformers' eager `generate` in bf16 on the same shapes, the
  baseline (when torch and transformers are importable).
"""

from __future__ import annotations

import dataclasses
import functools
import gzip
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from kivi_jax import memory, sharding
from kivi_jax.bench import copy_bandwidth_tbps
from kivi_jax.cache import init_cache, n_quantized, resolve_layout
from kivi_jax.checks import is_integer, positive_int
from kivi_jax.config import get_preset
from kivi_jax.generate import _prefill, _rows, generate, prefill_chunk_rows
from kivi_jax.models import llama
from kivi_jax.models.config import ModelConfig
from kivi_jax.models.loading import Model

SHAPES = {
    "llama2-7b": ModelConfig(
        architecture="llama", vocab_size=32000, hidden_size=4096, intermediate_size=11008,
        num_layers=32, num_heads=32, num_kv_heads=32, head_dim=128, rms_norm_eps=1e-5,
        max_position_embeddings=4096, dtype="bfloat16"),
    "llama3-8b": ModelConfig(
        architecture="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
        num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128, rope_theta=500000.0,
        rms_norm_eps=1e-5, max_position_embeddings=131072, dtype="bfloat16"),
}
"""The P2 shapes; Llama-3-8B's window is Llama 3.1's 128k (rope scaling
changes values only)."""


def fit_window(config: ModelConfig, length: int) -> tuple[ModelConfig, dict]:
  """`config` with a context window of at least `length` tokens, and what the
  row records of it. P2 asks 4096 + 512 tokens of Llama-2-7B shapes, past
  Llama-2's 4096: with random weights a position past the window costs what
  any other does, so the window is widened to the request and the row says
  so (`window_widened_from`)."""
  if length <= config.max_position_embeddings:
    return config, {}
  return (dataclasses.replace(config, max_position_embeddings=length),
          {"window_widened_from": config.max_position_embeddings})


def random_model(config: ModelConfig, seed: int = 0, mesh=None) -> Model:
  """`config`'s model with normal weights (std 0.02, norms 1), made on the
  device layer by layer (over `mesh`, each device making its own shards)."""
  key = jax.random.key(seed)
  dtype = jnp.dtype(config.dtype)
  d, f = config.hidden_size, config.intermediate_size
  hq, hkv, dh = config.num_heads, config.num_kv_heads, config.head_dim

  place = {}
  if mesh is not None:
    sharding.check_mesh(mesh, config)
    place = {"out_shardings": {k: NamedSharding(mesh, sharding.layer_param_spec(k))
                               for k in sharding.LAYER_PARAMS}}

  @functools.partial(jax.jit, **place)
  def layer(key):
    k = jax.random.split(key, 7)

    def w(i, *shape):
      return (0.02 * jax.random.normal(k[i], shape, jnp.float32)).astype(dtype)
    return {"attn_norm": jnp.ones((d,), dtype), "mlp_norm": jnp.ones((d,), dtype),
            "wqkv": w(0, d, hkv, hq // hkv + 2, dh), "wo": w(3, hq, dh, d),
            "w_gate_up": w(4, d, 2, f), "w_down": w(6, f, d)}

  whole = {} if mesh is None else {"out_shardings": NamedSharding(mesh, P())}
  normal = jax.jit(lambda k, shape: (0.02 * jax.random.normal(k, shape)).astype(dtype),
                   static_argnums=1, **whole)
  ones = jax.jit(lambda: jnp.ones((d,), dtype), **whole)
  keys = jax.random.split(key, config.num_layers + 2)
  params = {"embed": normal(keys[0], (config.vocab_size, d)),
            "layers": tuple(layer(keys[2 + i]) for i in range(config.num_layers)),
            "final_norm": ones()}
  if not config.tie_word_embeddings:
    params["lm_head"] = normal(keys[1], (d, config.vocab_size))
  return Model(config, params)


def weight_bytes_read(model: Model) -> int:
  """Bytes of weights a decode step multiplies by: all but the embedding
  table (a gather of B rows), which is read whole only as a tied head."""
  total = sum(x.nbytes for x in jax.tree.leaves(model.params))
  return total if model.config.tie_word_embeddings else total - model.params["embed"].nbytes


def cache_bytes_read(cache) -> int:
  """Bytes of the cache a decode step reads: the ring and sinks whole, the
  block's live share (its quantized tokens over its capacity)."""
  live = float(np.mean(np.asarray(n_quantized(cache.lengths, cache.config))))
  total = 0
  for layer in cache.layers:
    for block in (layer.k, layer.v):
      total += sum(x.nbytes for x in jax.tree.leaves(block)) * live / cache.block_capacity
    total += sum(x.nbytes for x in (layer.ring_k, layer.ring_v))
    if layer.sink_k is not None:
      total += layer.sink_k.nbytes + layer.sink_v.nbytes
  return int(total)


def peak_bytes() -> int | None:
  stats = jax.devices()[0].memory_stats() or {}
  return stats.get("peak_bytes_in_use")


def _calibration(model: Model, kv_config):
  """For SKVQ presets that need one: a calibration with a random channel
  order and clip factors of 0.95 (speed does not depend on them)."""
  if not kv_config.needs_calibration:
    return None
  from kivi_jax.cache import equal_groups
  from kivi_jax.calibration import CALIBRATED_FIELDS, Calibration, model_fingerprint
  cfg = model.config
  hidden = cfg.num_kv_heads * cfg.head_dim
  rng = np.random.default_rng(0)
  perm = np.stack([rng.permutation(hidden) for _ in range(cfg.num_layers)]).astype(np.int32)
  groups = np.broadcast_to(equal_groups(hidden, kv_config.hidden_groups(hidden)),
                           perm.shape).astype(np.int32)
  clip = np.full(cfg.num_layers, 0.95, np.float32)
  return Calibration(model=model_fingerprint(model),
                     config={f: getattr(kv_config, f) for f in CALIBRATED_FIELDS},
                     perm_k=perm, groups_k=groups, clip_k=clip, perm_v=perm.copy(),
                     groups_v=groups.copy(), clip_v=clip.copy(), source="random (speed only)")


def _prompt(batch: int, tokens: int, vocab: int, seed: int = 0) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, vocab, (batch, tokens), dtype=np.int32)


PREFILL_TIMING_S = 30.0
"""Seconds of timed prefill calls after which `time_generate` takes no more."""


class _Compiled(Exception):
  """Ends `time_generate`'s first call once everything it runs is compiled."""


def time_generate(model: Model, method: str, batch: int, prompt: int, new: int,
                  impl: str = "auto", mesh=None) -> dict:
  """`generate` timed on its second call; the first compiles. That first call
  streams, and its streamer stops it once the decode loop has run a step (a
  streamed call runs the same compiled programs). The prefill is timed alone
  too (the median of up to three calls: `PREFILL_TIMING_S`), in `generate`'s
  chunks of rows (over `mesh`, of each data shard's rows). Peaks and their
  prediction are one device's."""
  start = time.perf_counter()
  kv = get_preset(method)
  calib = _calibration(model, kv)
  ids = _prompt(batch, prompt, model.config.vocab_size)
  length = prompt + new
  cache_total = memory.cache_bytes(model.config, kv, batch, length)
  rows = prefill_chunk_rows(model, kv, batch, prompt, length, impl, mesh)
  empty = init_cache(model.config, kv, rows, length, impl=impl, calibration=calib, mesh=mesh)
  args = (model.params, _rows(ids, mesh), _rows(np.ones_like(ids), mesh), empty)
  # Each result is dropped before the next call: two caches of the largest
  # batch do not fit at once.
  times = []
  # The first call compiles; then up to three timed, fewer where they take over
  # PREFILL_TIMING_S (the largest batches' prefills take a minute each).
  while len(times) < 4 and (len(times) < 2 or sum(times[1:]) < PREFILL_TIMING_S):
    t0 = time.perf_counter()
    jax.block_until_ready(_prefill(*args, config=model.config)[0])
    times.append(time.perf_counter() - t0)
  prefill_s = statistics.median(times[1:])
  _stage(start, f"prefill: {prefill_s:.2f} s a call ({len(times) - 1} timed after the first)")
  layout = empty.layout
  del empty, args

  def run(streamer=None):
    return np.asarray(generate(model, ids, kv_config=kv, max_new_tokens=new, impl=impl,
                               calibration=calib, pad_token_id=0, streamer=streamer,
                               mesh=mesh))

  streamed = []

  def stop_in_the_loop(tok, done):
    streamed.append(tok)
    if len(streamed) == 2:  # step 0 came from the prefill, step 1 from the loop
      raise _Compiled

  try:
    run(stop_in_the_loop)
  except _Compiled:
    pass
  _stage(start, f"generate compiled; the timed call of {new} new tokens starts")
  t0 = time.perf_counter()
  out = run()
  total = time.perf_counter() - t0
  assert out.shape == (batch, new)
  return {"tokens_per_s": batch * new / total, "total_s": total, "prefill_s": prefill_s,
          "prefill_rows": rows, "cache_bytes": cache_total, "layout": layout,
          "predicted_peak_bytes": memory.generate_bytes(
              model, kv, batch, prompt, new, memory.uses_flash_attention(model.config, impl),
              rows=rows, layout=layout, mesh=mesh)}


def _stage(start: float, what: str) -> None:
  """A worker's progress, on stderr with the seconds since `start`: a row
  stopped past its time keeps these lines in its `log` (how far it got)."""
  print(f"[{time.perf_counter() - start:.1f} s] {what}", file=sys.stderr, flush=True)


_STAGE = re.compile(r"\[\d+\.\d s\] ")  # the start of `_stage`'s lines


LONGEST_SEARCH = 1 << 24
"""Tokens up to which the longest context is looked for (`max_context`), the
shapes' windows widened to it (`fit_window`)."""


def longest_plan(shape: str, method: str, new: int, memory_bytes: int, layout: str,
                 mesh: tuple[int, int] | None = None) -> int:
  """The prompt the longest-context row of `method` at `shape` runs:
  `kivi_jax.max_context` with `new` tokens to decode, the window widened to
  `LONGEST_SEARCH`, `memory_bytes` for the allocator (each device's over a
  `mesh` `(1, model)`), cuDNN's prompt attention and the cache `layout` the
  device takes ("pairs" for KIVI on a Hopper GPU, "slots" for fp16 or a mesh)."""
  config = fit_window(SHAPES[shape], LONGEST_SEARCH)[0]
  model = Model(config, jax.eval_shape(lambda: random_model(config).params))
  return memory.max_context(model, get_preset(method), new, memory_bytes=memory_bytes,
                            flash=True, layout=layout, mesh=mesh)


def time_longest(model: Model, method: str, prompt: int, new: int,
                 impl: str = "auto", mesh=None) -> dict:
  """One `generate` call of one row of `prompt` + `new` tokens, its compiling
  included: P2's longest context asks that a row decodes there, and at what
  peak; the longest prompts' prefills take minutes, so once."""
  kv = get_preset(method)
  ids = _prompt(1, prompt, model.config.vocab_size)
  t0 = time.perf_counter()
  out = np.asarray(generate(model, ids, kv_config=kv, max_new_tokens=new, impl=impl,
                            calibration=_calibration(model, kv), pad_token_id=0, mesh=mesh))
  seconds = time.perf_counter() - t0
  assert out.shape == (1, new)
  flash = memory.uses_flash_attention(model.config, impl)
  length, _ = memory.generate_lengths(prompt, new, model.config.max_position_embeddings)
  layout = resolve_layout("auto", model.config, kv, impl, jnp.dtype(model.config.dtype), mesh)
  return {"seconds_with_compile": seconds, "layout": layout,
          "cache_bytes": memory.cache_bytes(model.config, kv, 1, length, layout),
          "predicted_peak_bytes": memory.generate_bytes(model, kv, 1, prompt, new, flash,
                                                        layout=layout, mesh=mesh)}


@functools.partial(jax.jit, static_argnames=("config", "steps"), donate_argnames=("cache",))
def _decode_steps(params, tok, cache, *, config: ModelConfig, steps: int):
  """`steps` greedy decode steps in one `fori_loop`, as `generate` runs them."""
  def step(_, carry):
    tok, cache = carry
    logits, cache = llama.forward(params, tok, cache, config=config)
    return jnp.argmax(logits, -1).astype(jnp.int32), cache
  return jax.lax.fori_loop(0, steps, step, (tok, cache))


def time_decode_step(model: Model, method: str, batch: int, context: int, steps: int = 16,
                     repeats: int = 3, impl: str = "auto", copy_tbps: float | None = None,
                     profile_dir: str | None = None, mesh=None, layout: str = "auto") -> dict:
  """Median ms of one decode step with `context` tokens cached per row (a
  loop of `steps` steps timed `repeats` times after a warm-up), against its
  floor; with `profile_dir`, a trace of one more loop summarized. `layout`:
  the cache's (`init_cache`'s). The context is prefilled in `generate`'s chunks
  of rows (all rows at once asked an H200 for 153 GiB at batch 256 of
  Llama-3-8B's shapes)."""
  start = time.perf_counter()
  kv = get_preset(method)
  calib = _calibration(model, kv)
  ids = _rows(_prompt(batch, context, model.config.vocab_size), mesh)
  capacity = context + steps * (repeats + 2)
  rows = prefill_chunk_rows(model, kv, batch, context, capacity, impl, mesh)
  empty = init_cache(model.config, kv, rows, capacity, impl=impl, calibration=calib,
                     mesh=mesh, layout=layout)
  logits, cache = _prefill(model.params, ids, jnp.ones_like(ids), empty, config=model.config)
  del empty
  tok = jnp.argmax(logits, -1).astype(jnp.int32)[:, None]
  run = functools.partial(_decode_steps, model.params, config=model.config, steps=steps)
  copy_tbps = copy_tbps or copy_bandwidth_tbps()
  weights, kv_read = weight_bytes_read(model), cache_bytes_read(cache)
  tok, cache = jax.block_until_ready(run(tok, cache))  # compiles
  _stage(start, f"prefilled and compiled; {repeats} loops of {steps} steps timed next")
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    tok, cache = jax.block_until_ready(run(tok, cache))
    times.append((time.perf_counter() - t0) / steps)
  ms = 1e3 * statistics.median(times)
  floor_ms = (weights + kv_read) / (copy_tbps * 1e12) * 1e3
  row = {"step_ms": ms, "layout": cache.layout, "floor_ms": floor_ms, "weight_bytes": weights,
         "cache_bytes_read": kv_read, "cache_bytes": cache.nbytes(), "copy_tbps": copy_tbps,
         "weights_floor_ms": weights / (copy_tbps * 1e12) * 1e3}
  if profile_dir is not None:
    hlo = _decode_steps.lower(model.params, tok, cache, config=model.config,
                              steps=steps).compile().as_text()
    with jax.profiler.trace(profile_dir, create_perfetto_trace=True):
      jax.block_until_ready(run(tok, cache))
    row["profile"] = summarize_trace(profile_dir, steps, hlo)
  return row


_KINDS = (
    ("attention kernel",
     r"kivi_decode|kivi_dense_decode|kivi_mha|kivi_ring_attention|skvq_decode|decode_attention"
     r"|kivi_prompt_attention|mosaic"),
    ("write kernel", r"kivi_quantize_pack|quantize_pack|kivi_ring_update"),
    ("cudnn attention", r"cudnn|fmha|flash|sdpa"),
    ("matmul", r"gemm|cublas|sm90_xmma|cutlass|nvjet|dot"),
    ("copy", r"memcpy|^copy|copy_fusion|\bcopy\b"),
    ("transpose", r"transpose"),
    ("reduction", r"reduce|reduction"),
    ("scatter/gather", r"scatter|gather|dynamic.update.slice|dynamic.slice"),
)


def kernel_kind(name: str) -> str:
  low = name.lower()
  for kind, pattern in _KINDS:
    if re.search(pattern, low):
      return kind
  return "other fusion"


def device_kernels(log_dir: str) -> list[dict]:
  """The device's kernels (complete events, `dur` in us) of the perfetto trace
  `jax.profiler.trace` wrote under `log_dir`."""
  path = sorted(Path(log_dir).rglob("perfetto_trace.json.gz"))[-1]
  events = json.load(gzip.open(path))
  events = events["traceEvents"] if isinstance(events, dict) else events
  procs = {e["pid"]: e["args"]["name"] for e in events
           if e.get("ph") == "M" and e.get("name") == "process_name"}
  device = {pid for pid, name in procs.items() if "GPU" in name or "TPU" in name}
  return [e for e in events if e.get("ph") == "X" and e.get("pid") in device]


def summarize_trace(log_dir: str, steps: int, hlo: str = "") -> dict:
  """Device time per step by kind of work, and the 15 costliest kernels,
  from the perfetto trace `jax.profiler.trace` wrote under `log_dir`; with
  the program's optimized `hlo`, each kernel's JAX operations beside it."""
  by_kind, by_name = defaultdict(float), defaultdict(lambda: [0.0, 0])
  for e in device_kernels(log_dir):
    ms = e.get("dur", 0) / 1e3
    by_kind[kernel_kind(e["name"])] += ms / steps
    by_name[e["name"]][0] += ms / steps
    by_name[e["name"]][1] += 1
  top = sorted(by_name.items(), key=lambda kv: -kv[1][0])[:15]
  ops = {m[1]: m[2] for m in re.finditer(r'%([\w.-]+) = .*?op_name="([^"]*)"', hlo)}
  return {"device_ms_per_step": sum(by_kind.values()),
          "by_kind_ms": dict(sorted(by_kind.items(), key=lambda kv: -kv[1])),
          "top_kernels": [{"name": n[:120], "ms_per_step": v[0], "launches_per_step":
                           v[1] / steps, "op": _op_of(n, ops)[:160]} for n, v in top]}


def _op_of(kernel: str, ops: dict) -> str:
  """The JAX operation an XLA kernel name comes from: its fusion's name with
  `_` for `.` (as the profiler shows it), looked up in the HLO's metadata."""
  for name in (kernel, re.sub(r"_(\d+)$", r".\1", kernel)):
    if name in ops:
      return ops[name]
  return ""


def hf_generate(shape: str, batch: int, prompt: int, new: int) -> dict:
  """HF transformers' eager `generate` (bf16, greedy, `new` tokens, no EOS) on
  `shape` with random weights, timed after a warm-up of 8 tokens (eager
  mode compiles nothing)."""
  import torch
  from transformers import AutoModelForCausalLM, LlamaConfig
  c, widened = fit_window(SHAPES[shape], prompt + new)
  hf_config = LlamaConfig(
      vocab_size=c.vocab_size, hidden_size=c.hidden_size,
      intermediate_size=c.intermediate_size, num_hidden_layers=c.num_layers,
      num_attention_heads=c.num_heads, num_key_value_heads=c.num_kv_heads,
      rope_theta=c.rope_theta, rms_norm_eps=c.rms_norm_eps,
      max_position_embeddings=c.max_position_embeddings)
  torch.manual_seed(0)
  with torch.device("cuda"):
    model = AutoModelForCausalLM.from_config(hf_config, torch_dtype=torch.bfloat16,
                                             attn_implementation="eager").eval()
  ids = torch.as_tensor(_prompt(batch, prompt, c.vocab_size), device="cuda")
  kw = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False,
            attention_mask=torch.ones_like(ids), pad_token_id=0)
  with torch.no_grad():
    model.generate(ids, **{**kw, "max_new_tokens": 8, "min_new_tokens": 8})  # warm-up
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    out = model.generate(ids, **kw)
    torch.cuda.synchronize()
    total = time.perf_counter() - t0
  assert out.shape == (batch, prompt + new)
  return {"tokens_per_s": batch * new / total, "total_s": total,
          "peak_bytes": torch.cuda.max_memory_allocated(), "torch": torch.__version__,
          **widened}


def _worker(spec: dict) -> dict:
  """One measurement (the module docstring's kinds), in this process."""
  kind = spec["kind"]
  if kind not in ("device", "hf", "generate", "step", "longest"):
    raise ValueError(f"unknown measurement kind {kind!r}")
  if kind == "device":
    if jax.default_backend() == "cpu":
      return {"error": "no accelerator", "log": [f"jax {jax.__version__} sees only the CPU"]}
    layouts = device_layouts(spec["shape"], spec["methods"]) if spec.get("shape") else {}
    return {"device": jax.devices()[0].device_kind, "jax": jax.__version__,
            "bytes_limit": memory.device_memory_bytes(), "copy_tbps": copy_bandwidth_tbps(),
            "layouts": layouts}
  if kind == "hf":
    return hf_generate(spec["shape"], spec["batch"], spec["prompt"], spec["new"])
  jax.config.update("jax_compilation_cache_dir", spec.get("compile_cache") or
                    os.path.join(tempfile.gettempdir(), "kivi-jax-compile-cache"))
  mesh = sharding.make_mesh(*spec["mesh"]) if spec.get("mesh") else None
  if kind == "generate":
    config, widened = fit_window(SHAPES[spec["shape"]], spec["prompt"] + spec["new"])
    row = {**time_generate(random_model(config, mesh=mesh), spec["method"], spec["batch"],
                           spec["prompt"], spec["new"], mesh=mesh), **widened}
  elif kind == "longest":
    config, widened = fit_window(SHAPES[spec["shape"]], spec["prompt"] + spec["new"])
    row = {**time_longest(random_model(config, mesh=mesh), spec["method"], spec["prompt"],
                          spec["new"], mesh=mesh), **widened}
  else:  # "step"
    row = time_decode_step(random_model(SHAPES[spec["shape"]], mesh=mesh), spec["method"],
                           spec["batch"], spec["context"], copy_tbps=spec.get("copy_tbps"),
                           profile_dir=spec.get("profile_dir"), mesh=mesh)
  row["peak_bytes"] = peak_bytes()
  return row


def measure(spec: dict, timeout: float = 1800) -> dict:
  """`spec` measured in a fresh process: its row, or `{"error": ...}` (out of
  memory, say, or "timed out": the process killed after `timeout` seconds)
  with the process's last lines (a timed-out row's, the stages it reached:
  `_stage`)."""
  env = dict(os.environ)
  # Let the allocator hand out nearly the whole device (the default is 75%).
  env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")
  # `-m` puts the working directory first on the path, where a checkout's
  # kivi_jax/ (without the models/ and pallas_kernels/ an install maps into it)
  # would shadow the package this process runs: start in that package's parent.
  home = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  try:
    proc = subprocess.run([sys.executable, "-m", "kivi_jax.bench_generate", json.dumps(spec)],
                          capture_output=True, text=True, env=env, timeout=timeout, cwd=home)
  except subprocess.TimeoutExpired as e:
    text = e.stderr or e.stdout or ""
    text = text.decode(errors="replace") if isinstance(text, bytes) else text
    lines = text.strip().splitlines()
    return {**spec, "error": "timed out", "timeout_s": timeout,
            "log": [line for line in lines if _STAGE.match(line)] or lines[-3:]}
  for line in reversed(proc.stdout.splitlines()):
    if line.startswith("{"):
      return {**spec, **json.loads(line)}
  tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
  oom = any("RESOURCE_EXHAUSTED" in l or "out of memory" in l.lower() for l in tail)
  return {**spec, "error": "out of memory" if oom else "failed", "log": tail}


def device_info(shape: str | None = None, methods=()) -> dict:
  """The device, its allocator's limit and its copy bandwidth, measured in a
  worker (this process keeps off the device, so its children can take it),
  and with `shape` the layout each method's cache takes there
  (`device_layouts`)."""
  return measure({"kind": "device", "shape": shape, "methods": list(methods)})


def device_layouts(shape: str, methods) -> dict[str, str]:
  """The layout each method's cache of `shape` takes on this backend
  (`init_cache`'s "auto"): what `max_batch` and `max_context` plan with, from
  the driver's process, which runs on the CPU."""
  config = SHAPES[shape]
  return {m: resolve_layout("auto", config, get_preset(m), "auto", jnp.dtype(config.dtype))
          for m in methods}


def _positive_ints(name: str, values) -> tuple[int, ...]:
  """`values` as Python ints (a row's batch goes into JSON) if every one is a
  Python or numpy integer above 0; else a ValueError naming `name`."""
  values = tuple(values)
  if not all(is_integer(v) and v > 0 for v in values):
    raise ValueError(f"{name} must be positive integers, got {values}")
  return tuple(int(v) for v in values)


def _earlier_rows(out: str | None) -> dict | None:
  """The results already in `out`, to be added to: a file of earlier runs keeps
  its own fields as they are (its first run's metadata, a note written beside
  its rows) and gains rows only, each saying where, when and at which commit it
  was measured (this run's shape or methods would misdescribe the earlier rows).
  None where `out` is not a file yet."""
  if not out or not Path(out).is_file():
    return None
  try:
    earlier = json.loads(Path(out).read_text())
  except json.JSONDecodeError as e:
    raise ValueError(f"out: {out} is not JSON ({e}); name a new file or one this "
                     f"benchmark wrote") from None
  if not isinstance(earlier, dict) or not isinstance(earlier.get("rows"), list):
    raise ValueError(f"out: {out} holds no benchmark rows (a JSON object with a 'rows' "
                     f"list); name a new file or one this benchmark wrote")
  return earlier


def generate_benchmark(shape: str = "llama2-7b",
                       methods=("fp16", "kivi4", "kivi2", "skvq-k2v2-g16-fp8"),
                       requests=((1024, 512), (4096, 512)), batches=(1, 8, 32),
                       step_batches=(1, 32), step_context: int = 1280, largest: bool = True,
                       hf_batches=(32, 64, 128), out: str | None = None,
                       mesh: tuple[int, int] | None = None, row_timeout: float = 1800,
                       longest_new: int | None = None, progress=print) -> dict:
  """P2 for one shape, every measurement in its own process (`measure`).

  One decode step of each method at `step_batches` with `step_context`
  tokens cached, profiled; then for each request (prompt, new tokens) and
  method, `generate` at `batches` and at the largest batch
  `kivi_jax.memory.max_batch` predicts (a tenth fewer rows while that runs
  out of memory); and HF's `generate` at `hf_batches` (until one runs out of
  memory). With `out`, the result is written after every row, added to the
  rows already there: a sweep longer than one session on a machine can go on
  in the next. With `mesh` (data, model), the kivi-jax rows run over a mesh of
  that many devices (`kivi_jax.make_mesh`). A row whose process runs past
  `row_timeout` seconds is recorded as timed out, its `log` the stages it
  reached, and the sweep goes on (a timed-out largest batch is not retried
  smaller). With `longest_new`, last,
  each method's longest context: one row of the longest prompt that
  `kivi_jax.max_context` plans with `longest_new` new tokens (the window
  widened up to `LONGEST_SEARCH` tokens), a tenth shorter while that runs out
  of memory.
  """
  if shape not in SHAPES:
    raise ValueError(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")
  for method in methods:
    get_preset(method)  # an unknown one named before any work
  batches, step_batches, hf_batches = (
      _positive_ints(name, values) for name, values in (
          ("batches", batches), ("step_batches", step_batches), ("hf_batches", hf_batches)))
  if not all(isinstance(r, (tuple, list)) and len(r) == 2 for r in requests):
    raise ValueError(f"requests must be (prompt, new tokens) pairs, got {tuple(requests)}")
  requests = tuple((positive_int("a request's prompt", p),
                    positive_int("a request's new tokens", n)) for p, n in requests)
  step_context = positive_int("step_context", step_context)
  if longest_new is not None:
    longest_new = positive_int("longest_new", longest_new)
  if not row_timeout > 0:
    raise ValueError(f"row_timeout must be a positive number of seconds, got {row_timeout}")
  if mesh is not None and longest_new is not None and mesh[0] != 1:
    raise ValueError(f"the longest context is a batch of one row, which splits over no "
                     f"data axis: run it over a mesh of data=1 (got data={mesh[0]})")
  earlier = _earlier_rows(out)
  info = device_info(shape, methods)
  if info.get("error") == "no accelerator":
    raise RuntimeError("the generate benchmark measures a GPU or TPU: jax sees only the CPU "
                       "here")
  if "error" in info:
    raise RuntimeError(f"the device worker failed: {info}")
  progress(f"{info['device']}: {info['bytes_limit'] / 2**30:.1f} GiB for the allocator, "
           f"copy {info['copy_tbps']:.2f} TB/s")
  config = SHAPES[shape]
  shapes = Model(config, jax.eval_shape(lambda: random_model(config).params))
  from kivi_jax.cli import run_metadata
  # The driver runs on the CPU: it plans with the layouts the device takes.
  layouts = info.pop("layouts", None) or {}
  info = {k: v for k, v in info.items() if k != "kind"}
  result = earlier or {"protocol": "P2 end-to-end decode", **run_metadata(), **info,
                       "rows": []}

  def run(spec):
    # The worker measured on the device; this process knows the date and commit.
    meta = {**{k: v for k, v in run_metadata().items() if k in ("jax", "date", "commit")},
            "device": info["device"]}
    if mesh is not None and spec["kind"] != "hf":
      spec = {**spec, "mesh": list(mesh)}
    progress(f"measuring {json.dumps({k: v for k, v in spec.items() if k != 'profile_dir'})}")
    row = {**measure({"shape": shape, **spec}, timeout=row_timeout), **meta}
    result["rows"].append(row)
    if out:
      Path(out).parent.mkdir(parents=True, exist_ok=True)
      Path(out).write_text(json.dumps(result, indent=1) + "\n")
    shown = {k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()
             if k in ("kind", "mesh", "method", "batch", "prompt", "new", "step_ms", "floor_ms",
                      "tokens_per_s", "prefill_s", "seconds_with_compile", "peak_bytes",
                      "error")}
    progress(json.dumps(shown))
    return row

  for method in methods:
    for batch in step_batches:
      run({"kind": "step", "method": method, "batch": batch, "context": step_context,
           "copy_tbps": info["copy_tbps"], "profile_dir": tempfile.mkdtemp()})
  for prompt, new in requests:
    for method in methods:
      # Over a mesh, each device's memory for its shards (a split cache: slots).
      best = memory.max_batch(shapes, get_preset(method), prompt, new,
                              memory_bytes=info["bytes_limit"], flash=True,
                              layout="slots" if mesh else layouts.get(method, "auto"),
                              mesh=mesh)
      for batch in sorted({b for b in batches if b < best}):
        run({"kind": "generate", "method": method, "batch": batch, "prompt": prompt,
             "new": new})
      while largest and best > 0:
        row = run({"kind": "generate", "method": method, "batch": best, "prompt": prompt,
                   "new": new, "predicted_largest": True})
        if row.get("error") != "out of memory":
          break
        step = mesh[0] if mesh else 1  # a multiple of the data axis
        best = best // step * 9 // 10 * step
    for batch in hf_batches:
      if run({"kind": "hf", "batch": batch, "prompt": prompt, "new": new}).get("error"):
        break
  if longest_new is not None:
    for method in methods:
      prompt = longest_plan(shape, method, longest_new, info["bytes_limit"],
                            "slots" if mesh else layouts.get(method, "auto"), mesh)
      while prompt > 0:
        row = run({"kind": "longest", "method": method, "batch": 1, "prompt": prompt,
                   "new": longest_new, "predicted_longest": True})
        if row.get("error") != "out of memory":
          break
        prompt = prompt * 9 // 10
  return result


if __name__ == "__main__":
  print(json.dumps(_worker(json.loads(sys.argv[1]))), flush=True)
