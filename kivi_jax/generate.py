"""Batched generation: one jitted prefill, then one jitted `lax.while_loop` decode.

The cache is the loop state and is donated to both jitted calls, so on an
accelerator it is updated in place. Rows may be padded on either side; each row
keeps its own length and its own quantization groups (SPEC.md, "Batches").

`generate` can also continue a cache made earlier (`prefill_cache`, or
`kivi_jax.restore_cache` in another process): the prompts are appended to a
copy of it, so one prefilled document answers many questions.
"""

from __future__ import annotations

import functools
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import Array
from jax.sharding import PartitionSpec as P

from kivi_jax import memory, sharding
from kivi_jax.cache import KVCache, by_shard, init_cache, write_rows, zeros_rows
from kivi_jax.checks import is_integer, positive_int
from kivi_jax.config import KIVIConfig
from kivi_jax.models import llama
from kivi_jax.models.config import ModelConfig


def sample(logits: Array, rng: Array, temperature, top_k: int | None, top_p) -> Array:
  """Next tokens `[B]` from float logits `[B, V]`; greedy when `temperature` is
  None. `temperature` and `top_p` (None: no filter) may be traced: one
  compiled loop serves every value."""
  if temperature is None:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits.astype(jnp.float32) / temperature
  if top_k is not None:
    kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  if top_p is not None:
    # Keep the smallest prefix of tokens (by probability) whose mass reaches top_p.
    sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    cutoff = jnp.min(jnp.where(mass_before < top_p, sorted_logits, jnp.inf), axis=-1,
                     keepdims=True)
    logits = jnp.where(logits < cutoff, -jnp.inf, logits)
  return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


def _prefill_chunks(params, input_ids, attention_mask, empty: KVCache, *,
                    config: ModelConfig):
  """Prefills `B` prompts in chunks of the `R` rows of `empty` (an empty cache):
  `(logits [B, V], cache of B rows)`.

  Chunk `i` runs rows `min(i R, B - R) ..`, so `R` need not divide `B` (the
  last chunk repeats up to `R - 1` rows of the one before, the same prompts
  giving the same cache). Each chunk starts from `empty` and its cache is
  written in place into the result's rows, so the result is the only
  full-size cache and the activations are a chunk's
  (`kivi_jax.memory.prefill_rows`).

  Over a mesh (`empty.mesh`) each of its `D` data shards takes chunks of its
  own rows: chunk `i` runs rows `min(i R / D, B / D - R / D) ..` of every
  shard's `B / D`, so no row moves between devices."""
  b = input_ids.shape[0]
  rows = empty.lengths.shape[0]
  if rows == b:
    return llama.prefill(params, input_ids, empty, attention_mask, config=config)
  shards = 1 if empty.mesh is None else empty.mesh.shape[sharding.DATA]
  own, r = b // shards, rows // shards  # a shard's rows, and a chunk's of them
  if empty.mesh is None:
    place = lambda x, spec: x  # noqa: E731
  else:
    place = lambda x, spec: jax.lax.with_sharding_constraint(  # noqa: E731
        x, jax.sharding.NamedSharding(empty.mesh, spec))

  def take(x, start):
    part = jax.lax.dynamic_slice_in_dim(by_shard(x, shards), start, r, 1)
    return place(part.reshape(rows, *x.shape[1:]), P(sharding.DATA))

  def chunk(i, out):
    logits, cache = out
    start = jnp.minimum(i * r, own - r)
    part_logits, part = llama.prefill(params, take(input_ids, start), empty,
                                      take(attention_mask, start), config=config)
    logits = jax.lax.dynamic_update_slice_in_dim(
        by_shard(logits, shards), by_shard(part_logits, shards), start, 1).reshape(logits.shape)
    return place(logits, P(sharding.DATA)), write_rows(cache, part, start, shards)

  logits = place(jnp.zeros((b, config.vocab_size), jnp.float32), P(sharding.DATA))
  cache = zeros_rows(empty, b)
  if empty.mesh is not None:
    cache = jax.tree.map(lambda spec, x: place(x, spec), sharding.cache_specs(cache), cache)
  return jax.lax.fori_loop(0, -(-own // r), chunk, (logits, cache))


_prefill = jax.jit(_prefill_chunks, static_argnames=("config",))

_prefill_over_empty = jax.jit(_prefill_chunks, static_argnames=("config",),
                              donate_argnames=("empty",))
"""`_prefill` with `empty` donated, for a batch prefilled in one chunk: the
cache it writes takes the empty cache's buffers, one cache less at the peak
(on an H200 rows of 99,072 to 301,440 tokens held their cache once, where
undonated a row of 551,552 held it twice: benchmarks/NOTES.md, "The longest
context"). Chunks of fewer rows than the batch cannot: the result is larger
than their empty cache."""


# With a streamer, `generate` runs the decode loop in calls of growing length
# (1, 2, 4, ... up to this many steps) and streams each call's steps from the
# host: the first tokens show at once, and the loop has no host callback, so
# the persistent compilation cache can keep it across processes. Every length
# shares one compiled loop: the steps' bounds are traced.
STREAM_CHUNK = 16

_SAMPLING = ("greedy", "top_k", "nucleus", "pad_token_id")


def _emit(step, logits, done, tokens, rng, eos_ids, temperature, top_p, *, greedy, top_k,
          nucleus, pad_token_id):
  """Step `step`'s tokens sampled from `logits` into `tokens` (padding for
  rows already done): `(tokens, done, tok)`."""
  tok = sample(logits, jax.random.fold_in(rng, step), None if greedy else temperature,
               top_k, top_p if nucleus else None)
  tok = jnp.where(done, pad_token_id, tok)
  return tokens.at[:, step].set(tok), done | jnp.isin(tok, eos_ids), tok


@functools.partial(jax.jit, static_argnames=("max_new_tokens", *_SAMPLING))
def _start(first_logits, rng, eos_ids, temperature, top_p, *, max_new_tokens: int,
           **sampling):
  """Step 0 from the prefill's logits: `(tokens [B, max_new_tokens], done, tok)`."""
  b = first_logits.shape[0]
  tokens = jnp.full((b, max_new_tokens), sampling["pad_token_id"], jnp.int32)
  return _emit(0, first_logits, jnp.zeros((b,), bool), tokens, rng, eos_ids, temperature,
               top_p, **sampling)


@functools.partial(jax.jit, static_argnames=("config", *_SAMPLING),
                   donate_argnames=("cache", "tokens"))
def _decode(params, cache: KVCache, tokens, tok, done, start, stop, rng, eos_ids,
            temperature, top_p, *, config: ModelConfig, **sampling):
  """Steps `start .. stop - 1`, or until every row is done, in one
  `lax.while_loop`: `(tokens, tok, done, the next step, cache)`."""
  def cond(state):
    step, _, _, done, _ = state
    return (step < stop) & ~jnp.all(done)

  def body(state):
    step, tokens, tok, done, cache = state
    # Finished rows feed padding, so their caches stop growing.
    logits, cache = llama.forward(params, tok[:, None], cache,
                                  (~done)[:, None].astype(jnp.int32), config=config)
    tokens, done, tok = _emit(step, logits[:, 0], done, tokens, rng, eos_ids, temperature,
                              top_p, **sampling)
    return step + 1, tokens, tok, done, cache

  step, tokens, tok, done, cache = jax.lax.while_loop(
      cond, body, (jnp.asarray(start, jnp.int32), tokens, tok, done, cache))
  # Returning the cache lets the donated input buffers back the loop state.
  return tokens, tok, done, step, cache


def _stream(streamer, tokens: np.ndarray, first: int, last: int, eos: list[int]) -> None:
  """`streamer(tokens [B], done [B])` for steps `first .. last - 1`; `done`: the
  row ended at an earlier step (its token is then padding)."""
  ended = np.logical_or.accumulate(np.isin(tokens[:, :last], eos), axis=1)
  for step in range(first, last):
    streamer(tokens[:, step], ended[:, step - 1] if step else np.zeros(len(tokens), bool))


@functools.partial(jax.jit, static_argnames=("config",))
def _continue(params, input_ids, attention_mask, cache: KVCache, *, config: ModelConfig):
  """`input_ids` appended to `cache`: logits `[B, V]` of each row's last real
  token and a new cache. `cache` is not donated: the caller's stays valid, so one
  cache (a document) can take many continuations (questions)."""
  return llama.forward(params, input_ids, cache, attention_mask, config=config,
                       last_only=True)


def _token_id(name, value, vocab: int) -> int:
  if not is_integer(value) or not 0 <= value < vocab:
    raise ValueError(f"{name} must be a token id in [0, {vocab}) (the vocabulary size), "
                     f"got {value!r}")
  return int(value)


def _prompts(model, input_ids, attention_mask) -> tuple[np.ndarray, np.ndarray]:
  """`input_ids` and its mask as checked numpy arrays."""
  input_ids = np.asarray(input_ids)
  if input_ids.ndim != 2 or not np.issubdtype(input_ids.dtype, np.integer):
    raise ValueError(f"input_ids must be an integer array [batch, tokens], got dtype "
                     f"{input_ids.dtype} and shape {input_ids.shape}")
  if input_ids.size == 0:
    raise ValueError(f"input_ids must be non-empty, got shape {input_ids.shape}")
  vocab = model.config.vocab_size
  if input_ids.min() < 0 or input_ids.max() >= vocab:
    raise ValueError(f"input_ids must lie in [0, {vocab}) (the vocabulary size)")
  if attention_mask is None:
    attention_mask = np.ones_like(input_ids)
  attention_mask = np.asarray(attention_mask)
  if attention_mask.shape != input_ids.shape:
    raise ValueError(f"attention_mask has shape {attention_mask.shape}, input_ids "
                     f"{input_ids.shape}")
  if not np.isin(attention_mask, (0, 1)).all():
    raise ValueError("attention_mask must hold only 0 (padding) and 1 (real tokens)")
  if (attention_mask.sum(1) == 0).any():
    raise ValueError("attention_mask: every row needs at least one real token")
  return input_ids, attention_mask


_PAST_THE_WINDOW = ("; to go past it on purpose, pass dataclasses.replace(model, "
                    "config=dataclasses.replace(model.config, max_position_embeddings=...))")


def _check_free(nbytes: int, what: str, remedy: str) -> None:
  free = memory.free_memory_bytes()
  if free is not None and nbytes > free:
    raise ValueError(f"{what} takes {nbytes / 2**30:.2f} GiB and the device has "
                     f"{free / 2**30:.2f} GiB free: {remedy}")


def _prefill_checked(model, input_ids, attention_mask, kv_config: KIVIConfig,
                     max_length: int, max_new_tokens: int, calibration,
                     impl: str, mesh) -> tuple[Array, KVCache]:
  """Checked prompts (`_prompts`) into a new cache of `max_length` tokens a row,
  which must leave room for `max_new_tokens` more (split over `mesh`, if given)."""
  if not isinstance(kv_config, KIVIConfig):
    raise ValueError(f"kv_config must be a KIVIConfig (kivi_jax.get_preset(...)), got "
                     f"{type(kv_config).__name__}")
  b, t = input_ids.shape
  if t > max_length:
    raise ValueError(f"the prompt ({t} tokens) is longer than the cache "
                     f"(max_length={max_length})")
  if t + max_new_tokens > max_length:
    raise ValueError(f"max_new_tokens={max_new_tokens} after a {t}-token prompt runs "
                     f"past max_length={max_length}")
  window = model.config.max_position_embeddings
  if max_length > window:
    raise ValueError(
        f"max_length={max_length} (the cache's tokens per row) exceeds the model's context "
        f"window, max_position_embeddings={window}{_PAST_THE_WINDOW}")
  if mesh is not None:
    sharding.check_mesh(mesh, model.config, kv_config, b)
  cache_total = memory.cache_bytes(model.config, kv_config, b, max_length)
  devices = 1 if mesh is None else mesh.size
  _check_free(cache_total // devices,
              f"the cache of {b} rows x {max_length} tokens (max_length)"
              + ("" if mesh is None else f" split over {devices} devices"),
              "pass fewer rows or a shorter max_new_tokens (kivi_jax.max_batch says how "
              "many rows fit)")
  width = memory.bucket(t, max_length)  # the prompts padded (masked) to it
  rows = prefill_chunk_rows(model, kv_config, b, width, max_length, impl, mesh)
  empty = init_cache(model.config, kv_config, rows, max_length, impl=impl,
                     calibration=calibration, mesh=mesh)
  pad = ((0, 0), (0, width - t))
  prefill = _prefill_over_empty if rows == b else _prefill
  return prefill(_params(model, mesh), _rows(np.pad(input_ids, pad), mesh),
                 _rows(np.pad(attention_mask, pad), mesh), empty, config=model.config)


def prefill_chunk_rows(model, kv_config: KIVIConfig, batch: int, prompt_tokens: int,
                       max_length: int, impl: str, mesh=None) -> int:
  """The rows a prefill runs at once (`_prefill`'s chunks): `memory.chunk_rows`
  for this backend's prompt attention; over a `mesh`, as many of each data
  shard's rows, beside the share of the cache one device holds."""
  return memory.chunk_rows(model.config, kv_config, batch, prompt_tokens, max_length,
                           memory.uses_flash_attention(model.config, impl), mesh=mesh)


def _params(model, mesh):
  """The model's parameters, split over `mesh` if given (a no-op where they
  already are: `kivi_jax.shard_model` once saves the move per call)."""
  return model.params if mesh is None else sharding.shard_params(model.params, mesh)


def _rows(x: np.ndarray, mesh) -> Array:
  """An int32 `[B, ...]` array, its rows split over `mesh`'s data axis if given."""
  x = jnp.asarray(x, jnp.int32)
  if mesh is None:
    return x
  return jax.device_put(x, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(
      sharding.DATA)))


def prefill_cache(model, input_ids, *, kv_config: KIVIConfig, max_length: int,
                  attention_mask=None, impl: str = "auto", calibration=None,
                  mesh=None) -> KVCache:
  """A new cache holding the prompts `input_ids`, with room for `max_length` tokens a row.

  Prefill a long document once, then ask questions about it with
  `generate(model, question_ids, cache=cache, ...)` (each takes a copy; the cache
  stays as it is), or keep it with `kivi_jax.save_cache`.

  Args:
    model: a `kivi_jax.Model`.
    input_ids: int `[B, T]` prompts, padded on either side.
    kv_config: how the cache is quantized.
    max_length: tokens a row can hold: the prompt, what will be appended to it
      and everything generated after.
    attention_mask: `[B, T]`, 1 for real tokens; None means no padding.
    impl, calibration, mesh: as for `generate`.
  """
  input_ids, attention_mask = _prompts(model, input_ids, attention_mask)
  _, cache = _prefill_checked(model, input_ids, attention_mask, kv_config,
                              positive_int("max_length", max_length), 0, calibration,
                              impl, mesh)
  return cache


def _continuation(model, input_ids, attention_mask, cache: KVCache, max_new_tokens: int,
                  kv_config, max_length, calibration, impl, mesh) -> tuple[Array, KVCache]:
  """Checked prompts appended to a copy of `cache`: `(logits [B, V], the copy)`."""
  if not isinstance(cache, KVCache):
    raise ValueError(f"cache must be a KVCache, got {type(cache).__name__}")
  for name, value in (("max_length", max_length), ("calibration", calibration),
                      ("impl", impl), ("mesh", mesh)):
    if value is not None:
      raise ValueError(f"{name} belongs to the given cache: pass {name}=None with cache=")
  if kv_config is not None and kv_config != cache.config:
    raise ValueError(f"kv_config differs from the given cache's config, {cache.config}")
  b, t = input_ids.shape
  rows = cache.lengths.shape[0]
  if b != rows:
    raise ValueError(f"input_ids has {b} rows and the cache {rows}")
  lengths = np.asarray(cache.lengths)
  need = lengths + attention_mask.sum(1) + max_new_tokens
  i = int(np.argmax(need))
  row = (f"row {i} of the cache holds {lengths[i]} tokens: {int(attention_mask[i].sum())} "
         f"more and max_new_tokens={max_new_tokens} need {need[i]}")
  window = model.config.max_position_embeddings
  # The cache's capacity may pass the window (its block and ring are whole
  # groups and spans): the window is checked on its own, as a new cache's is.
  if need[i] > window:
    raise ValueError(f"{row}, past the model's context window, max_position_embeddings="
                     f"{window}{_PAST_THE_WINDOW}")
  if need[i] > cache.capacity:
    raise ValueError(f"{row}, past the cache's capacity of {cache.capacity} (make it with a "
                     f"larger max_length)")
  devices = 1 if cache.mesh is None else cache.mesh.size
  _check_free(cache.nbytes() // devices, "a copy of the cache to continue",
              "free the arrays you no longer need, or continue a cache of fewer rows")
  pad = ((0, 0), (0, memory.bucket(t, cache.capacity) - t))
  return _continue(_params(model, cache.mesh), _rows(np.pad(input_ids, pad), cache.mesh),
                   _rows(np.pad(attention_mask, pad), cache.mesh), cache,
                   config=model.config)


def generate(model, input_ids, *, kv_config: KIVIConfig | None = None,
             max_new_tokens: int, cache: KVCache | None = None, attention_mask=None,
             temperature: float = 0.0, top_k: int | None = None,
             top_p: float | None = None, seed: int = 0,
             eos_token_id: int | Sequence[int] | None = None,
             pad_token_id: int | None = None, max_length: int | None = None,
             streamer: Callable[[np.ndarray, np.ndarray], None] | None = None,
             impl: str | None = None, calibration=None, mesh=None) -> Array:
  """Generates `max_new_tokens` tokens for each prompt of a batch.

  Args:
    model: a `kivi_jax.Model` (from `kivi_jax.load_model`).
    input_ids: int `[B, T]` prompts, padded on either side.
    kv_config: how the cache is quantized (with `cache`: None, or the cache's).
    max_new_tokens: tokens to generate per row.
    cache: continue this cache (from `prefill_cache` or `restore_cache`, say): the
      prompts are appended to a copy of it, which then takes the new tokens; the
      cache passed stays valid and unchanged.
    attention_mask: `[B, T]`, 1 for real tokens; None means no padding.
    temperature: 0 for greedy decoding, else the softmax temperature.
    top_k, top_p: optional sampling filters. Every temperature and top_p
      share one compiled loop (a top_k of its own).
    seed: PRNG seed; the same seed gives the same tokens.
    eos_token_id: a row stops after generating one of these; None never stops.
    pad_token_id: fills a row after its EOS; defaults to the first EOS id, or 0.
    max_length: cache capacity per row; defaults to `T + max_new_tokens` rounded
      up to a multiple of `memory.BUCKET` within the model's window (a given `cache`
      has its own).
    streamer: called as `streamer(tokens [B], done [B])` (numpy) for each step, in
      order; `done` marks rows that ended earlier (their token is padding). The
      steps come in bursts of up to `STREAM_CHUNK` (the first at once), and
      `generate` returns once every step has been streamed. Any function: the
      compiled loop is the same for all.
    impl: what reads the cache in decode steps (`KVCache.impl`): "auto" (the
      default) takes the Pallas kernel of the backend where it applies; "gpu"
      also writes it with the quantize-and-pack kernel. A given `cache` has its own.
    calibration: a `kivi_jax.calibrate` result, for SKVQ configs that need one
      (a given `cache` holds its own).
    mesh: a `kivi_jax.make_mesh(data=..., model=...)` mesh to run over: rows
      split over its data axis, heads and MLP columns over its model axis
      (`kivi_jax.sharding`); the batch must split evenly. A given `cache` has its own.

  Returns:
    int32 `[B, max_new_tokens]`.
  """
  input_ids, attention_mask = _prompts(model, input_ids, attention_mask)
  max_new_tokens = positive_int("max_new_tokens", max_new_tokens)
  vocab = model.config.vocab_size
  top_p_value = 1.0 if top_p is None else top_p  # 1.0: traced, unused without nucleus
  for name, value in (("temperature", temperature), ("top_p", top_p_value)):
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
      raise ValueError(f"{name} must be a number, got {value!r}")
  if not temperature >= 0:
    raise ValueError(f"temperature must be >= 0, got {temperature!r}")
  if top_k is not None and not 0 < positive_int("top_k", top_k) <= vocab:
    raise ValueError(f"top_k must be at most the vocabulary size ({vocab}), got {top_k}")
  if top_p is not None and not 0.0 < top_p <= 1.0:
    raise ValueError(f"top_p must lie in (0, 1], got {top_p!r}")
  if not is_integer(seed):
    raise ValueError(f"seed must be an integer, got {seed!r}")
  if streamer is not None and not callable(streamer):
    raise ValueError(f"streamer must be a function of (tokens, done), got "
                     f"{type(streamer).__name__}")
  if eos_token_id is None:
    eos = []
  elif isinstance(eos_token_id, (int, np.integer)):
    eos = [_token_id("eos_token_id", eos_token_id, vocab)]
  else:
    eos = [_token_id("eos_token_id", e, vocab) for e in eos_token_id]
  if pad_token_id is None:
    pad_token_id = eos[0] if eos else 0
  pad_token_id = _token_id("pad_token_id", pad_token_id, vocab)

  if cache is not None:
    logits, cache = _continuation(model, input_ids, attention_mask, cache, max_new_tokens,
                                  kv_config, max_length, calibration, impl, mesh)
  else:
    if kv_config is None:
      raise ValueError("kv_config is required (kivi_jax.get_preset('kivi2'), say), unless "
                       "a cache to continue is given")
    if max_length is None:
      max_length, _ = memory.generate_lengths(input_ids.shape[1], max_new_tokens,
                                              model.config.max_position_embeddings)
    else:
      max_length = positive_int("max_length", max_length)
    logits, cache = _prefill_checked(model, input_ids, attention_mask, kv_config,
                                     max_length, max_new_tokens, calibration,
                                     impl or "auto", mesh)
  params = _params(model, cache.mesh)
  sampling = dict(greedy=temperature == 0, top_k=top_k, nucleus=top_p is not None,
                  pad_token_id=pad_token_id)
  traced = (jax.random.key(seed), jnp.asarray(eos if eos else [-1], jnp.int32),
            jnp.float32(temperature), jnp.float32(top_p_value))
  tokens, done, tok = _start(logits, *traced, max_new_tokens=max_new_tokens, **sampling)
  del logits
  step, chunk = 1, 1
  if streamer is not None:
    _stream(streamer, np.asarray(tokens), 0, 1, eos)
  while step < max_new_tokens:
    stop = max_new_tokens if streamer is None else min(step + chunk, max_new_tokens)
    tokens, tok, done, reached, cache = _decode(params, cache, tokens, tok, done, step, stop,
                                                *traced, config=model.config, **sampling)
    if streamer is None:
      break
    reached = int(reached)
    _stream(streamer, np.asarray(tokens), step, reached, eos)
    if reached < stop:  # every row is done
      break
    step, chunk = reached, min(2 * chunk, STREAM_CHUNK)
  return tokens
