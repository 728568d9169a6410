"""What `generate` holds on a device, and how many rows of a request fit.

Peak device memory of `generate` is the weights, the cache (its whole
capacity, allocated before the prefill) and a workspace: the prefill's
activations for one chunk of rows, or a decode step's temporaries, whichever
is larger. The prefill takes its rows in chunks (`prefill_rows`) so that its
activations stay within `workspace_bytes`; a decode step's temporaries grow
with the batch (logits, the flushed group) but stay small beside the cache.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import numpy as np

from kivi_jax import sharding
from kivi_jax.cache import block_writer, init_cache, resolve_layout
from kivi_jax.checks import positive_int
from kivi_jax.config import KIVIConfig
from kivi_jax.models import llama

FIXED_WORKSPACE = 1 << 30
"""Bytes kept free beyond the per-row estimates (XLA's own scratch, cuBLAS
and cuDNN workspaces, the token buffers)."""

ACTIVATION_MARGIN = 1
"""Factor on the layer-by-layer sum of a prefill row's activations
(`activation_bytes_per_row`): the prefill forms each layer's cache before the next
layer runs, so one layer's activations are live at a time."""

QUERY_CHUNK = 512
"""Queries per chunk of the prompt attention where cuDNN does not run it
(`kivi_jax.attention.prompt_attention`)."""


def cache_bytes(model_config, kv_config: KIVIConfig, batch: int, max_length: int,
                layout: str = "auto") -> int:
  """Bytes of `init_cache(model_config, kv_config, batch, max_length,
  layout=layout)`, every array counted (codes, scales, zeros, ring, sinks,
  channel maps, lengths). "auto" is the layout this backend takes; "pairs"
  plans for a Hopper GPU from elsewhere."""
  if kv_config.needs_calibration:
    # A calibration changes values, not shapes.
    kv_config = dataclasses.replace(kv_config, reorder=False, clip=1.0)
  # "auto" resolved here, each call, as `init_cache` resolves it (it follows
  # the backend); the shapes of a resolved layout are the same every time.
  layout = resolve_layout(layout, model_config, kv_config, "auto",
                          jax.numpy.dtype(model_config.dtype))
  return _resolved_cache_bytes(model_config, kv_config, batch, max_length, layout)


@functools.lru_cache(maxsize=1024)
def _resolved_cache_bytes(model_config, kv_config: KIVIConfig, batch: int, max_length: int,
                          layout: str) -> int:
  """`cache_bytes` of a resolved layout: one `eval_shape` a distinct request
  (`max_context`'s search asks several times a probe, some 40 probes)."""
  return _bytes(jax.eval_shape(lambda: init_cache(model_config, kv_config, batch, max_length,
                                                  layout=layout)))


def mesh_shape(mesh) -> tuple[int, int]:
  """`(data, model)`: the axes' sizes of a `kivi_jax.make_mesh` mesh, or a
  `(data, model)` pair as it is (a plan for devices not at hand); `(1, 1)` for
  None (one device)."""
  if mesh is None:
    return 1, 1
  if isinstance(mesh, jax.sharding.Mesh):
    if tuple(mesh.axis_names) != (sharding.DATA, sharding.MODEL):
      raise ValueError(f"mesh must have the axes ('data', 'model') (kivi_jax.make_mesh), "
                       f"got {mesh.axis_names}")
    return mesh.shape[sharding.DATA], mesh.shape[sharding.MODEL]
  if not isinstance(mesh, tuple) or len(mesh) != 2:
    raise ValueError(f"mesh must be a kivi_jax.make_mesh mesh or a (data, model) pair, "
                     f"got {mesh!r}")
  return positive_int("mesh's data", mesh[0]), positive_int("mesh's model", mesh[1])


def device_cache_bytes(model_config, kv_config: KIVIConfig, batch: int, max_length: int,
                       layout: str = "auto", mesh=None) -> int:
  """The bytes of `cache_bytes` one device holds with the cache split over
  `mesh` (`mesh_shape`'s argument): each row's arrays by rows over data and by
  kv heads over model (`kivi_jax.sharding.cache_specs`), SKVQ's channel maps
  whole on every device (a split cache takes the slot layout)."""
  data, model = mesh_shape(mesh)
  if (data, model) == (1, 1):
    return cache_bytes(model_config, kv_config, batch, max_length, layout)
  row = _row_cache_bytes(model_config, kv_config, max_length, "slots")
  maps = cache_bytes(model_config, kv_config, 1, max_length, "slots") - row
  return maps + -(-batch // data) * row // model


def _bytes(tree) -> int:
  """Bytes of a pytree of arrays or of `jax.ShapeDtypeStruct`s."""
  return int(sum(np.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree)))


def prefill_bytes_per_row(model_config, kv_config: KIVIConfig, prompt_tokens: int,
                          max_length: int, flash: bool, layout: str = "auto") -> int:
  """An upper estimate of what one row of a chunk adds to the prefill's
  workspace: the chunk's own cache twice (the empty cache it starts from and
  the one it writes, which lands in the result's rows at the chunk's end), the
  row's activations in one layer (`activation_bytes_per_row`) and its float32
  logits.

  Compiled for an H200 (jax 0.11.2, 2026-12-04), Llama-2-7B shapes, 1024-token
  prompts, the temporaries grew by 0.33 GB a chunk row for KIVI-2 (its own
  cache 0.20) and 0.90 for the bf16 cache (0.80): this gives 0.64 and 1.84 with
  the input cache (benchmarks/NOTES.md, "The prefill's memory a row")."""
  own_cache = _row_cache_bytes(model_config, kv_config, max_length, layout)
  quantized = jnp_quantized_tensors(model_config, kv_config, flash, layout)
  return (activation_bytes_per_row(model_config, prompt_tokens, flash, quantized)
          + 2 * own_cache + model_config.vocab_size * 4)


def jnp_quantized_tensors(model_config, kv_config: KIVIConfig, flash: bool,
                          layout: str = "auto") -> int:
  """How many of the keys and values the prefill quantizes in jnp (with float32
  temporaries): those of fewer than 16 bits whose blocks no kernel writes
  (`kivi_jax.cache.block_writer`) on a GPU where `flash` (cuDNN's prompt
  attention plans for one), else on this backend."""
  impl = "gpu" if flash else "auto"
  layout = resolve_layout(layout, model_config, kv_config, impl,
                          jax.numpy.dtype(model_config.dtype))
  if block_writer(impl, kv_config, model_config.head_dim, layout) is not None:
    return 0
  return int(kv_config.quantizes_keys) + int(kv_config.quantizes_values)


def activation_bytes_per_row(model_config, prompt_tokens: int, flash: bool,
                             jnp_quantized: int = 2) -> int:
  """An upper estimate of a prefill row's activations in one layer:
  `ACTIVATION_MARGIN` times the residual stream and the normed input, q, k
  (before and after RoPE), v and the attention output, the MLP's gate, up and
  their product for at most `llama.MLP_TOKENS` tokens (a longer prompt runs
  the MLP block over chunks of its tokens, into one more residual stream), the
  flushed keys and values, the float32 temporaries of quantizing the
  `jnp_quantized` of them that jnp quantizes (`jnp_quantized_tensors`; the kernels
  read the 16-bit tensors), and, without flash attention, one query chunk's
  scores and probabilities. (A chunk of several rows takes at most
  `PREFILL_TOKENS` tokens, no more than `MLP_TOKENS`: its MLP runs whole.)

  Against the H200's peaks (benchmarks/NOTES.md, "The estimate without the
  kernels' float32"): the largest batches at 1024 + 512 tokens (Llama-2-7B
  shapes, 8 rows a chunk) peaked 0.07-1.3 GiB under `generate_bytes`; rows of
  180,608 to 602,816 tokens held the weights, the cache and 66 KB a token at
  Llama-2-7B's shapes, 41 at Llama-3-8B's, where this counts 83-85 and 52-55."""
  c = model_config
  t = prompt_tokens
  itemsize = np.dtype(c.dtype).itemsize
  kv = c.num_kv_heads * c.head_dim
  act = t * (2 * c.hidden_size + 2 * c.num_heads * c.head_dim + 3 * kv + 2 * kv) * itemsize
  act += min(t, llama.MLP_TOKENS) * 3 * c.intermediate_size * itemsize
  if t > llama.MLP_TOKENS:
    act += t * c.hidden_size * itemsize
  act += t * jnp_quantized * kv * 4 * 3
  if not flash:
    act += 2 * c.num_heads * min(t, QUERY_CHUNK) * t * 4
  return int(ACTIVATION_MARGIN * act)


def _row_cache_bytes(model_config, kv_config: KIVIConfig, max_length: int, layout: str) -> int:
  """The bytes one more row adds to a cache (`cache_bytes` less what a cache
  holds once, its channel maps)."""
  return (cache_bytes(model_config, kv_config, 2, max_length, layout)
          - cache_bytes(model_config, kv_config, 1, max_length, layout))


def decode_bytes_per_row(model_config, kv_config: KIVIConfig, max_length: int) -> int:
  """An upper estimate of one row's decode-step temporaries: the float32
  logits three times (with two, `generate_bytes` fell 0.37 GB short of the
  peak measured for 1439 rows of Llama-3-8B shapes on an H200, 2026-12-03,
  where this share is the larger), the flushed group's keys and values as
  read and as written, the decode kernel's float32 partials (query rows
  padded to 16), and the scores the folded pair kernels pass through HBM
  (float32 a token and kv head of `max_length`, `decode_attention_pairs`)."""
  c = model_config
  itemsize = np.dtype(c.dtype).itemsize
  kv = c.num_kv_heads * c.head_dim
  group = kv_config.group_size
  return int(3 * c.vocab_size * 4 + 4 * group * kv * itemsize
             + c.num_kv_heads * max(16, c.num_heads // c.num_kv_heads) * c.head_dim * 4
             + c.num_kv_heads * max_length * 4)


PREFILL_TOKENS = 8192
"""The most prompt tokens a prefill chunk takes (at least one row). Larger
chunks buy no speed and cost rows of the batch: Llama-2-7B shapes on an H200,
1024-token prompts, took 25.3, 25.0 and 24.7 ms a row at 2, 4 and 8 rows a
chunk (benchmarks/results/generate_h200.json, 2026-12-04)."""


def prefill_rows(batch: int, model_config, kv_config: KIVIConfig, prompt_tokens: int,
                 max_length: int, budget_bytes: int, flash: bool, layout: str = "auto") -> int:
  """The most rows, at most `batch` and `PREFILL_TOKENS` tokens, whose prefill
  workspace (`prefill_bytes_per_row`) fits in `budget_bytes` (at least 1)."""
  per_row = prefill_bytes_per_row(model_config, kv_config, prompt_tokens, max_length, flash,
                                  layout)
  return int(max(1, min(batch, budget_bytes // per_row, PREFILL_TOKENS // prompt_tokens)))


def chunk_rows(model_config, kv_config: KIVIConfig, batch: int, prompt_tokens: int,
               max_length: int, flash: bool, layout: str = "auto", mesh=None) -> int:
  """The rows `generate`'s prefill runs at once: `prefill_rows` of the batch
  beside its cache's `workspace_bytes`; over `mesh` (`mesh_shape`'s argument),
  that many of each data shard's rows beside the cache one device holds
  (`device_cache_bytes`), times the data axis."""
  data, _ = mesh_shape(mesh)
  layout = _split_layout(layout, mesh)
  held = device_cache_bytes(model_config, kv_config, batch, max_length, layout, mesh)
  return data * prefill_rows(-(-batch // data), model_config, kv_config, prompt_tokens,
                             max_length, workspace_bytes(held), flash, layout)


def _split_layout(layout: str, mesh) -> str:
  """`layout`, "auto" over a `mesh` resolved to the slots a split cache keeps
  (`kivi_jax.cache.resolve_layout`)."""
  return "slots" if mesh is not None and layout == "auto" else layout


def workspace_bytes(cache_total: int) -> int:
  """What the prefill's activations may take: a tenth of the cache, and at
  least `FIXED_WORKSPACE`."""
  return max(FIXED_WORKSPACE, cache_total // 10)


def _allocator(device) -> tuple[int, int] | None:
  """`(bytes_limit, bytes_in_use)` of `device`'s allocator; None where it reports
  no limit (a CPU)."""
  stats = device.memory_stats()
  if not stats or "bytes_limit" not in stats:
    return None
  return int(stats["bytes_limit"]), int(stats.get("bytes_in_use", 0))


def device_memory_bytes(device=None) -> int:
  """Bytes the device's allocator may hand out (`memory_stats()["bytes_limit"]`)."""
  device = device or jax.devices()[0]
  allocator = _allocator(device)
  if allocator is None:
    raise ValueError(f"{device.platform} device {device} reports no memory limit: pass "
                     "memory_bytes=")
  return allocator[0]


def free_memory_bytes(device=None) -> int | None:
  """Bytes a new allocation may take on `device` now: its allocator's limit
  less what is in use; for a CPU, the host's available memory (Linux's
  `MemAvailable`). None where neither is known."""
  device = device or jax.devices()[0]
  allocator = _allocator(device)
  if allocator is not None:
    return allocator[0] - allocator[1]
  if device.platform == "cpu":
    try:
      with open("/proc/meminfo") as f:
        for line in f:
          if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    except OSError:
      pass
  return None


def uses_flash_attention(model_config, impl: str = "auto") -> bool:
  """Whether the prompt attention runs cuDNN's flash attention
  (`kivi_jax.attention.prompt_attention`)."""
  from kivi_jax.cache import kernel_backend
  return (kernel_backend(impl) == "gpu" and jax.default_backend() == "gpu"
          and model_config.dtype in ("bfloat16", "float16"))


BUCKET = 64
"""`generate` pads prompts and continuations (masked) to a multiple of this many
tokens and rounds its default cache capacity up to one, so requests of similar
length share compiled programs; `generate_bytes` counts the same."""


def bucket(n: int, limit: int) -> int:
  """`n` rounded up to a multiple of `BUCKET`, at most `limit` (not below `n`)."""
  return max(n, min(-(-n // BUCKET) * BUCKET, limit))


def generate_lengths(prompt_tokens: int, new_tokens: int, max_positions: int) -> tuple[int, int]:
  """`generate`'s default cache capacity and its prompts' padded width."""
  length = bucket(prompt_tokens + new_tokens, max_positions)
  return length, bucket(prompt_tokens, length)


def generate_bytes(model, kv_config: KIVIConfig, batch: int, prompt_tokens: int,
                   new_tokens: int, flash: bool, rows: int | None = None,
                   layout: str = "auto", mesh=None) -> int:
  """An upper estimate of `generate`'s peak device memory for `batch` rows:
  weights, the cache, `FIXED_WORKSPACE`, and the larger of the prefill's
  chunk of activations and a decode step's temporaries; `flash`: whether the
  prompt attention is cuDNN's (`uses_flash_attention`); `rows`: the rows a
  prefill chunk runs, by default `prefill_rows`'; `layout`: the cache's
  (`cache_bytes`). Over `mesh` (`mesh_shape`'s argument), what one device
  holds: its shards of the weights (`kivi_jax.sharding.param_specs`) and of
  the cache (`device_cache_bytes`), and the prefill's and a decode step's
  workspace for its data shard's rows (`batch` and `rows` then multiples of
  the data axis), each row's activations counted whole (the model axis splits
  some of them)."""
  config = model.config
  data, split = mesh_shape(mesh)
  weights = _device_bytes(model.params, sharding.param_specs(model.params), split)
  length, width = generate_lengths(prompt_tokens, new_tokens, config.max_position_embeddings)
  layout = _split_layout(layout, mesh)
  cache = device_cache_bytes(config, kv_config, batch, length, layout, mesh)
  own = -(-batch // data)  # a data shard's rows
  if rows is None:
    rows = chunk_rows(config, kv_config, batch, width, length, flash, layout, mesh)
  prefill = -(-rows // data) * prefill_bytes_per_row(config, kv_config, width, length, flash,
                                                     layout)
  if rows >= batch:
    # One chunk: the cache it writes is the result, counted above, and
    # `generate` donates its empty input to it (`_prefill_over_empty`): no
    # copy beside it. On an H200 rows of 99,072 to 301,440 tokens peaked at the
    # weights, the cache once and 106-110 KB a token at Llama-2-7B's shapes,
    # 136 at Llama-3-8B's, their MLP whole (benchmarks/NOTES.md, "The longest
    # context"); with the MLP in chunks, rows of up to 602,816 tokens at 66 and 41
    # (the estimate's 83-85 and 52-55: `activation_bytes_per_row`).
    prefill -= 2 * own * _row_cache_bytes(config, kv_config, length, layout)
  decode = own * decode_bytes_per_row(config, kv_config, length)
  return weights + cache + FIXED_WORKSPACE + max(prefill, decode)


def _device_bytes(params, specs, model: int) -> int:
  """Bytes one device holds of `params` laid out by `specs` (PartitionSpecs)
  with `model` devices on the model axis (the weights split over nothing else)."""
  def share(spec, x):
    return int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize // (
        model if sharding.MODEL in spec else 1)
  return sum(jax.tree.leaves(jax.tree.map(share, specs, params)))


def max_batch(model, kv_config: KIVIConfig, prompt_tokens: int, new_tokens: int, *,
              memory_bytes: int | None = None, flash: bool | None = None,
              layout: str = "auto", mesh=None) -> int:
  """How many rows of `prompt_tokens + new_tokens` `generate` can hold at once.

  Args:
    model: a `kivi_jax.Model` (its weights are counted as they are; they may be
      `jax.ShapeDtypeStruct`s).
    kv_config: the cache method.
    prompt_tokens, new_tokens: per row; the cache holds their sum.
    memory_bytes: what the device may hold; by default the allocator's limit
      on the first device (on a GPU, `XLA_PYTHON_CLIENT_MEM_FRACTION` of it).
    flash: whether the prompt attention is cuDNN's flash attention; by
      default `uses_flash_attention` on this backend.
    layout: the cache's (`init_cache`'s); "auto", this backend's. With
      `memory_bytes` and `flash`, "pairs" plans for a Hopper GPU from elsewhere.
    mesh: the `kivi_jax.make_mesh` mesh `generate` runs over, or its `(data,
      model)` shape to plan for devices not at hand: the batch is then a
      multiple of the data axis and `memory_bytes` each device's.

  Returns:
    The largest batch whose `generate_bytes` fit in `memory_bytes`; 0 if not
    even one row (one a data shard) fits.
  """
  prompt_tokens = positive_int("prompt_tokens", prompt_tokens)
  new_tokens = positive_int("new_tokens", new_tokens)
  memory_bytes, flash = _plan(model, memory_bytes, flash)
  data, _ = mesh_shape(mesh)
  return data * _largest(lambda own: generate_bytes(
      model, kv_config, data * own, prompt_tokens, new_tokens, flash, layout=layout,
      mesh=mesh) <= memory_bytes)


def max_context(model, kv_config: KIVIConfig, new_tokens: int, *, batch: int = 1,
                memory_bytes: int | None = None, flash: bool | None = None,
                layout: str = "auto", mesh=None) -> int:
  """The longest prompt `batch` rows can bring to `generate` and still decode
  `new_tokens` more (PROTOCOLS.md P2's longest context): `max_batch` turned
  around, the arguments as its (over a `mesh`, `batch` a multiple of its data
  axis: a batch of one splits over the model axis alone). At most the model's window
  (`max_position_embeddings`) less `new_tokens`, past which `generate`
  refuses; 0 if not even a one-token prompt fits.

  At long prompts the prefill's activations (one layer's, for the whole
  prompt, by `prefill_bytes_per_row`'s estimate) weigh about as much as a
  quantized cache's tokens or more (Llama-2-7B shapes, KIVI-2: 83 KB a token
  against its cache's 98; Llama-3-8B: 53 against 25): they, as much as the
  cache, bound a quantized cache's longest context (benchmarks/NOTES.md,
  "The longest context")."""
  new_tokens = positive_int("new_tokens", new_tokens)
  batch = positive_int("batch", batch)
  data, _ = mesh_shape(mesh)
  if batch % data:
    raise ValueError(f"batch={batch} does not split over the mesh's data axis of {data} "
                     f"devices: pass a multiple of {data} (or a mesh with data=1)")
  memory_bytes, flash = _plan(model, memory_bytes, flash)
  return _largest(lambda prompt: generate_bytes(
      model, kv_config, batch, prompt, new_tokens, flash, layout=layout,
      mesh=mesh) <= memory_bytes, limit=model.config.max_position_embeddings - new_tokens)


def _plan(model, memory_bytes, flash) -> tuple[int, bool]:
  """`max_batch`'s and `max_context`'s `memory_bytes` and `flash`, defaults filled."""
  if memory_bytes is None:
    memory_bytes = device_memory_bytes()
  else:
    memory_bytes = positive_int("memory_bytes", memory_bytes)
  if flash is None:
    flash = uses_flash_attention(model.config)
  return memory_bytes, flash


def _largest(fits, limit: int | None = None) -> int:
  """The largest `n` from 1 to `limit` with `fits(n)`, where `fits` holds up to
  some `n` and not past it (by doubling, then bisection); 0 if `fits(1)` fails."""
  if (limit is not None and limit < 1) or not fits(1):
    return 0
  lo, hi = 1, 2
  while (limit is None or hi <= limit) and fits(hi):
    lo, hi = hi, hi * 2
  if limit is not None:
    hi = min(hi, limit + 1)
  while hi - lo > 1:  # fits(lo); not fits(hi), or hi past the limit
    mid = (lo + hi) // 2
    lo, hi = (mid, hi) if fits(mid) else (lo, mid)
  return lo
