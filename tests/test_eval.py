"""kv_perplexity and passkey on a tiny random model against slow step-by-step loops."""

import jax.numpy as jnp
import numpy as np
import pytest

import kivi_jax
from conftest import byte_tokenizer, tiny_hf_model, tiny_llama_config
from kivi_jax import eval as kv_eval
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


@pytest.mark.parametrize("depth", [0.0, 0.3, 0.5, 0.77, 1.0])
def test_passkey_prompt_puts_the_key_at_the_depth(depth):
  tok = byte_tokenizer()
  ids, start = kv_eval.passkey_prompt(tok, 1000, depth, "40917")
  text = tok.decode(ids.tolist())
  line = " The pass key is 40917. Remember it. 40917 is the pass key."
  assert text.count("40917") == 2 and text.startswith(kv_eval.PASSKEY_INTRO)
  assert text.endswith(kv_eval.PASSKEY_QUESTION)
  assert tok.decode(ids[start:start + len(line)].tolist()) == line
  # Filler copies before the key over all copies: the depth, to half a copy.
  intro, filler = len(kv_eval.PASSKEY_INTRO), len(kv_eval.PASSKEY_FILLER)
  n = text.count(kv_eval.PASSKEY_FILLER)
  assert abs((start - intro) / filler / n - depth) <= 0.5 / n
  # As long as it can be: one more filler copy would not fit.
  assert 1000 - filler < ids.size <= 1000


def test_passkey_prompt_rejects_bad_depth_and_length():
  tok = byte_tokenizer()
  with pytest.raises(ValueError, match=r"depth must lie in \[0, 1\], got 1.5"):
    kv_eval.passkey_prompt(tok, 1000, 1.5, "12345")
  with pytest.raises(ValueError, match="length=100 leaves no room"):
    kv_eval.passkey_prompt(tok, 100, 0.5, "12345")


def test_passkey_matches_a_step_by_step_loop(setup):
  model, _ = setup
  tok = byte_tokenizer()
  # 2 x 2 x 3 = 12 trials in batches of 5: batches span buckets, the last is short.
  kw = dict(lengths=(420, 512), depths=2, trials=3, seed=7, answer_tokens=6)
  result = kv_eval.passkey(model, tok, KIVI2, batch_size=5, progress=False, **kw)
  assert len(result.records) == 12 and set(result.accuracy) == {
      (420, 0), (420, 1), (512, 0), (512, 1)}
  for r in result.records:
    assert r["bucket"] / 2 <= r["depth"] < (r["bucket"] + 1) / 2
    ids, _ = kv_eval.passkey_prompt(tok, r["length"] - 6, r["depth"], r["passkey"])
    cache = kivi_jax.init_cache(model.config, KIVI2, 1, ids.size + 6)
    logits, cache = model.forward(model.params, jnp.asarray(ids[None]), cache)
    answer = []
    for _ in range(6):
      answer.append(int(np.argmax(logits[0, -1])))
      logits, cache = model.forward(model.params, jnp.asarray([[answer[-1]]]), cache)
    assert r["answer"] == tok.decode(answer)
    assert r["success"] == (r["passkey"] in r["answer"])
  again = kv_eval.passkey(model, tok, KIVI2, batch_size=3, progress=False, **kw)
  assert again.records == result.records
  other = kv_eval.passkey(model, tok, KIVI2, batch_size=5, progress=False,
                          **(kw | dict(seed=8)))
  assert [r["passkey"] for r in other.records] != [r["passkey"] for r in result.records]


def test_passkey_rejects_lengths_past_the_context_window(setup):
  model, _ = setup
  with pytest.raises(ValueError, match=r"lengths: 1024 is outside the model's context "
                     r"window \(1 to 512 tokens\)"):
    kv_eval.passkey(model, byte_tokenizer(), KIVI2, lengths=(256, 1024))
  with pytest.raises(ValueError, match="seed must be a non-negative integer, got -1"):
    kv_eval.passkey(model, byte_tokenizer(), KIVI2, lengths=(256,), seed=-1)


def test_calibration_batches_are_the_texts_tail():
  tokens = np.arange(10_000)
  batches = kv_eval.calibration_batches(tokens, n_tokens=4096, seq=512, batch=4)
  assert [b.shape for b in batches] == [(4, 512), (4, 512)]
  np.testing.assert_array_equal(np.concatenate([b.ravel() for b in batches]),
                                tokens[-4096:])
  with pytest.raises(ValueError, match="n_tokens=1000 must be a multiple of seq x batch"):
    kv_eval.calibration_batches(tokens, n_tokens=1000)
  with pytest.raises(ValueError, match="at most the text's 10000 tokens"):
    kv_eval.calibration_batches(tokens, n_tokens=16384)
