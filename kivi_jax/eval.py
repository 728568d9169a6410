"""Quality of a cache method on a real model (PROTOCOLS.md Q1, KV-perplexity).

A KV-cache quantizer changes what decode steps read from the past, so the
score comes from decode steps only: prefill `P` tokens into a fresh cache, then
teacher-force `D` tokens one decode step at a time, each step reading the cache
as the method leaves it.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from kivi_jax.cache import init_cache
from kivi_jax.config import KIVIConfig
from models import llama
from models.config import ModelConfig

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
  logits, cache = llama.forward(params, tokens[:, :prefill], cache, config=config)
  first = _nll(logits[:, -1], tokens[:, prefill])

  def step(cache, xs):
    token, target = xs
    logits, cache = llama.forward(params, token[:, None], cache, config=config)
    return cache, _nll(logits[:, 0], target)

  feed = tokens[:, prefill:-1].T  # [D - 1, B]
  _, rest = jax.lax.scan(step, cache, (feed, tokens[:, prefill + 1:].T))
  return jnp.concatenate([first[:, None], rest.T], axis=1)


def kv_perplexity(model, token_ids, kv_config: KIVIConfig, prefill: int = 512,
                  decode: int = 256, windows: int = 4, progress: bool = True
                  ) -> PerplexityResult:
  """KV-perplexity of `model` with a `kv_config` cache (PROTOCOLS.md Q1).

  Args:
    model: a `models.Model`.
    token_ids: int `[N]`, the whole tokenized text; window `w` covers tokens
      `[w (P + D), (w + 1) (P + D))`.
    kv_config: the cache method.
    prefill, decode, windows: `P`, `D` and the number of windows.
    progress: show a progress bar over windows.
  """
  token_ids = np.asarray(token_ids)
  if token_ids.ndim != 1:
    raise ValueError(f"token_ids must be 1-D, got shape {token_ids.shape}")
  for name, value in (("prefill", prefill), ("decode", decode), ("windows", windows)):
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
      raise ValueError(f"{name} must be a positive integer, got {value!r}")
  span = prefill + decode
  if windows * span > token_ids.size:
    raise ValueError(f"windows={windows} of prefill+decode={span} tokens need "
                     f"{windows * span} tokens; token_ids has {token_ids.size}")
  nll = []
  for w in tqdm(range(windows), desc=f"KV-ppl k{kv_config.k_bits}v{kv_config.v_bits}",
                disable=not progress, leave=False):
    tokens = jnp.asarray(token_ids[w * span:(w + 1) * span][None], jnp.int32)
    cache = init_cache(model.config, kv_config, 1, span)
    nll.append(np.asarray(_window_nll(model.params, tokens, cache, config=model.config,
                                      prefill=prefill)[0], np.float64))
  nll = np.stack(nll)
  return PerplexityResult(float(np.exp(nll.mean())), nll)


def wikitext_tokens(tokenizer, path) -> np.ndarray:
  """PROTOCOLS.md Q1 step 1: the whole file, bytes kept, no special tokens."""
  with open(path, newline="", encoding="utf-8") as f:
    text = f.read()
  return np.asarray(tokenizer.encode(text, add_special_tokens=False), np.int32)
