"""Quality of a cache method on a real model: KV-perplexity and passkey retrieval.

PROTOCOLS.md Q1: a KV-cache quantizer changes what decode steps read from the
past, so the score comes from decode steps only: prefill `P` tokens into a
fresh cache, then teacher-force `D` tokens one decode step at a time, each step
reading the cache as the method leaves it. Q2: a 5-digit passkey hidden in
filler text, asked for at the end, answered by greedy decoding.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from kivi_jax.cache import init_cache
from kivi_jax.checks import nonnegative_int, positive_int
from kivi_jax.config import KIVIConfig
from kivi_jax.models import llama
from kivi_jax.models.config import ModelConfig

QUICK = dict(prefill=512, decode=256, windows=4)
FULL = dict(prefill=2048, decode=512, windows=8)


@dataclasses.dataclass(frozen=True)
class PerplexityResult:
  """`kv_ppl = exp(mean(nll))`; `nll` float64 `[windows, decode]`, one per predicted token."""

  kv_ppl: float
  nll: np.ndarray


def _nll(logits, targets):
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  return -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]


@functools.partial(jax.jit, static_argnames=("config", "prefill"))
def _window_nll(params, tokens, cache, *, config: ModelConfig, prefill: int):
  """NLL `[B, D]` of tokens `[prefill, prefill + D)` of each row of `tokens` `[B, P + D]`."""
  logits, cache = llama.prefill(params, tokens[:, :prefill], cache, config=config)
  first = _nll(logits, tokens[:, prefill])

  def step(cache, xs):
    token, target = xs
    logits, cache = llama.forward(params, token[:, None], cache, config=config)
    return cache, _nll(logits[:, 0], target)

  feed = tokens[:, prefill:-1].T  # [D - 1, B]
  _, rest = jax.lax.scan(step, cache, (feed, tokens[:, prefill + 1:].T))
  return jnp.concatenate([first[:, None], rest.T], axis=1)


def kv_perplexity(model, token_ids, kv_config: KIVIConfig, prefill: int = 512,
                  decode: int = 256, windows: int = 4, progress: bool = True,
                  calibration=None) -> PerplexityResult:
  """KV-perplexity of `model` with a `kv_config` cache (PROTOCOLS.md Q1).

  Args:
    model: a `kivi_jax.Model`.
    token_ids: int `[N]`, the whole tokenized text; window `w` covers tokens
      `[w (P + D), (w + 1) (P + D))`.
    kv_config: the cache method.
    prefill, decode, windows: `P`, `D` and the number of windows.
    progress: show a progress bar over windows.
    calibration: a `kivi_jax.calibrate` result, for SKVQ configs that need one
      (made on text disjoint from the windows).
  """
  token_ids = np.asarray(token_ids)
  if token_ids.ndim != 1:
    raise ValueError(f"token_ids must be 1-D, got shape {token_ids.shape}")
  prefill = positive_int("prefill", prefill)
  decode = positive_int("decode", decode)
  windows = positive_int("windows", windows)
  span = prefill + decode
  if windows * span > token_ids.size:
    raise ValueError(f"windows={windows} of prefill+decode={span} tokens need "
                     f"{windows * span} tokens; token_ids has {token_ids.size}")
  nll = []
  for w in tqdm(range(windows), desc=f"KV-ppl k{kv_config.k_bits}v{kv_config.v_bits}",
                disable=not progress, leave=False):
    tokens = jnp.asarray(token_ids[w * span:(w + 1) * span][None], jnp.int32)
    cache = init_cache(model.config, kv_config, 1, span, calibration=calibration)
    nll.append(np.asarray(_window_nll(model.params, tokens, cache, config=model.config,
                                      prefill=prefill)[0], np.float64))
  nll = np.stack(nll)
  return PerplexityResult(float(np.exp(nll.mean())), nll)


CALIBRATION_TOKENS = 8192
CALIBRATION_SEQ = 512
CALIBRATION_BATCH = 4


def calibration_batches(token_ids: np.ndarray, n_tokens: int = CALIBRATION_TOKENS,
                        seq: int = CALIBRATION_SEQ, batch: int = CALIBRATION_BATCH
                        ) -> list[np.ndarray]:
  """The last `n_tokens` of the text as `[batch, seq]` arrays: calibration data
  disjoint from KV-ppl's windows, which are cut from the start."""
  if n_tokens % (seq * batch) or n_tokens > len(token_ids):
    raise ValueError(f"n_tokens={n_tokens} must be a multiple of seq x batch = "
                     f"{seq * batch} and at most the text's {len(token_ids)} tokens")
  tail = np.asarray(token_ids[-n_tokens:]).reshape(-1, batch, seq)
  return list(tail)


def wikitext_tokens(tokenizer, path) -> np.ndarray:
  """PROTOCOLS.md Q1 step 1: the whole file, bytes kept, no special tokens."""
  with open(path, newline="", encoding="utf-8") as f:
    text = f.read()
  return np.asarray(tokenizer.encode(text, add_special_tokens=False), np.int32)


PASSKEY_INTRO = ("There is an important info hidden inside a lot of irrelevant text. Find it "
                 "and memorize it. I will quiz you about the important information there.")
PASSKEY_FILLER = (" The grass is green. The sky is blue. The sun is yellow. Here we go. "
                  "There and back again.")
PASSKEY_QUESTION = " What is the pass key? The pass key is"


def _passkey_line(passkey: str) -> str:
  return f" The pass key is {passkey}. Remember it. {passkey} is the pass key."


def passkey_prompt(tokenizer, length: int, depth: float, passkey: str) -> tuple[np.ndarray,
                                                                             int]:
  """PROTOCOLS.md Q2's prompt, at most `length` tokens, the key at `depth` of the filler.

  Built from separately tokenized pieces (each starts with its space, as BPE
  would split the whole text): the intro, `n` copies of the filler sentence
  with the key line between copy `round(depth * n)` and the next, the question.

  Returns:
    int32 token ids, and the index of the key line's first token.
  """
  if not 0.0 <= depth <= 1.0:
    raise ValueError(f"depth must lie in [0, 1], got {depth!r}")
  enc = lambda s: tokenizer.encode(s, add_special_tokens=False)  # noqa: E731
  intro, filler, key, question = (enc(s) for s in (
      PASSKEY_INTRO, PASSKEY_FILLER, _passkey_line(passkey), PASSKEY_QUESTION))
  n = (length - len(intro) - len(key) - len(question)) // len(filler)
  if n < 1:
    raise ValueError(f"length={length} leaves no room for filler text around the pass key")
  before = round(depth * n)
  ids = intro + filler * before + key + filler * (n - before) + question
  return np.asarray(ids, np.int32), len(intro) + len(filler) * before


@dataclasses.dataclass(frozen=True)
class PasskeyResult:
  """`accuracy[(length, bucket)]`, and one record per trial: length, bucket, depth,
  passkey, the generated answer and whether it contains the passkey."""

  accuracy: dict
  records: list


def passkey(model, tokenizer, kv_config: KIVIConfig, lengths=(512, 1024, 2048, 4096, 8192),
            depths: int = 5, trials: int = 20, seed: int = 0, batch_size: int = 4,
            answer_tokens: int = 8, progress: bool = True, calibration=None
            ) -> PasskeyResult:
  """Passkey retrieval accuracy with a `kv_config` cache (PROTOCOLS.md Q2).

  For each length and each of `depths` equal depth buckets of [0, 1], `trials`
  prompts of at most `length - answer_tokens` tokens hide a random 5-digit
  passkey at a uniform depth within the bucket; greedy decoding (a jitted
  prefill, then one jitted decode loop per batch) generates `answer_tokens`
  tokens, and a trial succeeds when they contain the passkey. Passkeys and
  depths depend on `seed`, length and bucket only, so every method sees the
  same prompts. `calibration`: as `kv_perplexity`'s.
  """
  from kivi_jax.generate import generate

  depths = positive_int("depths", depths)
  trials = positive_int("trials", trials)
  batch_size = positive_int("batch_size", batch_size)
  answer_tokens = positive_int("answer_tokens", answer_tokens)
  seed = nonnegative_int("seed", seed)
  limit = model.config.max_position_embeddings
  for length in lengths:
    if not 0 < length <= limit:
      raise ValueError(f"lengths: {length} is outside the model's context window "
                       f"(1 to {limit} tokens)")
  batches = []
  for length in lengths:
    work = []
    for bucket in range(depths):
      rng = np.random.default_rng([seed, length, bucket])
      for _ in range(trials):
        key = str(rng.integers(10000, 100000))
        depth = float((bucket + rng.random()) / depths)
        ids, _ = passkey_prompt(tokenizer, length - answer_tokens, depth, key)
        work.append(dict(length=length, bucket=bucket, depth=depth, passkey=key, ids=ids))
    batches += [work[i:i + batch_size] for i in range(0, len(work), batch_size)]
  records = []
  for batch in tqdm(batches, desc=f"passkey k{kv_config.k_bits}v{kv_config.v_bits}",
                    disable=not progress, leave=False):
    # Left padding keeps each prompt's last token at the end of the row.
    width = max(len(w["ids"]) for w in batch)
    ids = np.zeros((len(batch), width), np.int32)
    mask = np.zeros_like(ids)
    for row, w in enumerate(batch):
      ids[row, width - len(w["ids"]):] = w["ids"]
      mask[row, width - len(w["ids"]):] = 1
    out = np.asarray(generate(model, ids, attention_mask=mask, kv_config=kv_config,
                              max_new_tokens=answer_tokens, max_length=width + answer_tokens,
                              calibration=calibration))
    for w, tokens in zip(batch, out):
      answer = tokenizer.decode(tokens.tolist(), skip_special_tokens=True)
      records.append({k: w[k] for k in ("length", "bucket", "depth", "passkey")}
                     | {"answer": answer, "success": w["passkey"] in answer})
  accuracy = {}
  for r in records:
    accuracy.setdefault((r["length"], r["bucket"]), []).append(r["success"])
  return PasskeyResult({k: float(np.mean(v)) for k, v in accuracy.items()}, records)
