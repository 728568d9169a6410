"""kv_perplexity against a slow reference loop and against plain perplexity."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kivi_jax
from conftest import tiny_hf_model, tiny_llama_config
from kivi_jax.eval import kv_perplexity

KIVI2 = kivi_jax.KIVIConfig(2, 2, 16, 32)
FP = kivi_jax.KIVIConfig(16, 16)


@pytest.fixture(scope="module")
def setup():
  model = kivi_jax.load_model(tiny_hf_model(tiny_llama_config()))
  tokens = np.random.default_rng(0).integers(0, 256, 400)
  return model, tokens


def _log_softmax(x):
  x = np.asarray(x, np.float64)
  return x - x.max(-1, keepdims=True) - np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1,
                                                                                   keepdims=True))


def test_matches_a_step_by_step_loop(setup):
  model, tokens = setup
  p, d, windows = 40, 30, 3
  result = kv_perplexity(model, tokens, KIVI2, prefill=p, decode=d, windows=windows,
                         progress=False)
  expected = []
  for w in range(windows):
    seq = tokens[w * (p + d):(w + 1) * (p + d)]
    cache = kivi_jax.init_cache(model.config, KIVI2, 1, p + d)
    logits, cache = model.forward(model.params, jnp.asarray(seq[None, :p]), cache)
    row = [-_log_softmax(logits[0, -1])[seq[p]]]
    for i in range(p, p + d - 1):
      logits, cache = model.forward(model.params, jnp.asarray(seq[None, i:i + 1]), cache)
      row.append(-_log_softmax(logits[0, 0])[seq[i + 1]])
    expected.append(row)
  np.testing.assert_allclose(result.nll, np.array(expected), rtol=1e-5, atol=1e-5)
  assert result.kv_ppl == pytest.approx(np.exp(np.mean(expected)), rel=1e-5)


def test_fp_cache_equals_prefill_perplexity(setup):
  model, tokens = setup
  p, d = 40, 30
  result = kv_perplexity(model, tokens, FP, prefill=p, decode=d, windows=2, progress=False)
  for w in range(2):
    seq = tokens[w * (p + d):(w + 1) * (p + d)]
    cache = kivi_jax.init_cache(model.config, FP, 1, p + d)
    logits, _ = model.forward(model.params, jnp.asarray(seq[None]), cache)
    nll = -np.take_along_axis(_log_softmax(logits[0, p - 1:-1]), seq[p:, None], 1)[:, 0]
    np.testing.assert_allclose(result.nll[w], nll, rtol=1e-5, atol=1e-5)
  kivi = kv_perplexity(model, tokens, KIVI2, prefill=p, decode=d, windows=2, progress=False)
  assert kivi.kv_ppl != pytest.approx(result.kv_ppl, rel=1e-4)


def test_rejects_too_few_tokens(setup):
  model, tokens = setup
  with pytest.raises(ValueError, match="windows=6 of prefill\\+decode=70 tokens need 420"):
    kv_perplexity(model, tokens, FP, prefill=40, decode=30, windows=6)
