"""Logit parity with transformers' PyTorch Llama and Mistral, float32, 16-bit cache."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import MistralConfig

import kivi_jax
from conftest import tiny_hf_model, tiny_llama_config

FP = kivi_jax.KIVIConfig(k_bits=16, v_bits=16)
# float32 end to end; differences are summation order only (observed ~1e-6).
TOL = 1e-4

CONFIGS = {
    "llama-gqa-untied": tiny_llama_config(),
    "llama-mha-tied": tiny_llama_config(num_key_value_heads=4, tie_word_embeddings=True),
    "llama3-rope-scaling": tiny_llama_config(
        rope_theta=500000.0, max_position_embeddings=1024,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
    "llama-linear-rope": tiny_llama_config(
        rope_scaling={"rope_type": "linear", "factor": 2.0}),
    "mistral-window": MistralConfig(
        vocab_size=256, hidden_size=64, intermediate_size=112, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=1, head_dim=16,
        max_position_embeddings=512, sliding_window=12, tie_word_embeddings=False),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_prefill_and_greedy_decode_match_transformers(name):
  hf = tiny_hf_model(CONFIGS[name])
  model = kivi_jax.load_model(hf)
  prompt = np.random.default_rng(1).integers(0, 256, (2, 24))
  steps = 20

  # Reference: greedy decoding with transformers, keeping every step's logits.
  with torch.no_grad():
    out = hf.generate(torch.tensor(prompt), max_new_tokens=steps, do_sample=False,
                      output_logits=True, return_dict_in_generate=True,
                      pad_token_id=0)
    full = out.sequences.numpy()
    prefill_ref = hf(torch.tensor(prompt)).logits.numpy()
  step_ref = np.stack([l.numpy() for l in out.logits], 1)  # [B, steps, V]

  cache = kivi_jax.init_cache(model.config, FP, 2, prompt.shape[1] + steps)
  logits, cache = model.forward(model.params, jnp.asarray(prompt), cache)
  np.testing.assert_allclose(np.asarray(logits), prefill_ref, atol=TOL, rtol=0)
  ours = [np.asarray(logits[:, -1])]
  for i in range(steps - 1):
    token = full[:, prompt.shape[1] + i][:, None]
    logits, cache = model.forward(model.params, jnp.asarray(token), cache)
    ours.append(np.asarray(logits[:, 0]))
  np.testing.assert_allclose(np.stack(ours, 1), step_ref, atol=TOL, rtol=0)

  # The prompt path: flash-style attention over the prompt alone, the last
  # token's logits only.
  fresh = kivi_jax.init_cache(model.config, FP, 2, prompt.shape[1] + steps)
  last, _ = model.prefill(model.params, jnp.asarray(prompt), fresh)
  np.testing.assert_allclose(np.asarray(last), prefill_ref[:, -1], atol=TOL, rtol=0)

  tokens = kivi_jax.generate(model, prompt, kv_config=FP, max_new_tokens=steps)
  np.testing.assert_array_equal(np.asarray(tokens), full[:, prompt.shape[1]:])


@pytest.mark.parametrize("name", ["llama-gqa-untied", "mistral-window"])
def test_mlp_over_token_chunks_matches_transformers(name, mlp_tokens):
  # Past `MLP_TOKENS` tokens a layer runs its MLP block over chunks of them:
  # here chunks of 5 tokens a row for 2 rows of 23, the last chunk starting at
  # 18 and overlapping the one before it.
  mlp_tokens(10)
  hf = tiny_hf_model(CONFIGS[name])
  model = kivi_jax.load_model(hf)
  prompt = np.random.default_rng(2).integers(0, 256, (2, 23))
  with torch.no_grad():
    ref = hf(torch.tensor(prompt)).logits.numpy()
    greedy = hf.generate(torch.tensor(prompt), max_new_tokens=8, do_sample=False,
                         pad_token_id=0).numpy()[:, prompt.shape[1]:]
  empty = lambda: kivi_jax.init_cache(model.config, FP, 2, 32)  # noqa: E731 (donated)
  logits, _ = model.forward(model.params, jnp.asarray(prompt), empty())
  np.testing.assert_allclose(np.asarray(logits), ref, atol=TOL, rtol=0)
  last, _ = model.prefill(model.params, jnp.asarray(prompt), empty())
  np.testing.assert_allclose(np.asarray(last), ref[:, -1], atol=TOL, rtol=0)
  tokens = kivi_jax.generate(model, prompt, kv_config=FP, max_new_tokens=8)
  np.testing.assert_array_equal(np.asarray(tokens), greedy)


def test_sliding_window_is_exercised():
  # The Mistral case above must actually cut attention: a window-free model differs.
  cfg = CONFIGS["mistral-window"]
  assert cfg.sliding_window < 24
  hf = tiny_hf_model(cfg)
  model = kivi_jax.load_model(hf)
  prompt = jnp.asarray(np.random.default_rng(1).integers(0, 256, (1, 24)))
  import dataclasses
  unwindowed = dataclasses.replace(model.config, sliding_window=None)
  from kivi_jax.models.llama import forward
  a, _ = forward(model.params, prompt, kivi_jax.init_cache(model.config, FP, 1, 24),
                 config=model.config)
  b, _ = forward(model.params, prompt, kivi_jax.init_cache(model.config, FP, 1, 24),
                 config=unwindowed)
  assert np.abs(np.asarray(a[:, -1]) - np.asarray(b[:, -1])).max() > 1e-3


def test_overflowing_the_cache_poisons_only_that_row():
  model = kivi_jax.load_model(tiny_hf_model(CONFIGS["llama-gqa-untied"]))
  kv = kivi_jax.KIVIConfig(2, 2, 16, 16)
  cache = kivi_jax.init_cache(model.config, kv, 2, 200)
  cap = cache.capacity
  ids = jnp.asarray(np.random.default_rng(0).integers(0, 256, (2, cap - 2)))
  mask = jnp.asarray(np.array([[1] * (cap - 2), [1] * 10 + [0] * (cap - 12)]))
  logits, cache = model.forward(model.params, ids, cache, mask)
  assert np.isfinite(np.asarray(logits[0])).all()
  # Row 0 has cap - 2 tokens: 3 more overflow; row 1 has room.
  logits, _ = model.forward(model.params, ids[:, :3], cache)
  assert np.isnan(np.asarray(logits[0])).all()
  assert np.isfinite(np.asarray(logits[1])).all()
  with pytest.raises(ValueError, match=f"{cap + 1} new tokens exceed the cache capacity"):
    model.forward(model.params, jnp.zeros((1, cap + 1), jnp.int32),
                  kivi_jax.init_cache(model.config, kv, 1, 200))


def test_forward_names_the_argument_whose_shape_does_not_fit():
  model = kivi_jax.load_model(tiny_hf_model(CONFIGS["llama-gqa-untied"]))
  cache = kivi_jax.init_cache(model.config, kivi_jax.KIVIConfig(2, 2, 16, 16), 2, 64)
  ids = jnp.zeros((2, 3), jnp.int32)
  with pytest.raises(ValueError, match=r"input_ids has 3 rows, the cache 2"):
    model.forward(model.params, jnp.zeros((3, 3), jnp.int32), cache)
  with pytest.raises(ValueError, match=r"input_ids must be \[batch, tokens\], got shape \(3,\)"):
    model.prefill(model.params, ids[0], cache)
  with pytest.raises(ValueError, match=r"attention_mask has shape \(2, 2\), input_ids \(2, 3\)"):
    model.forward(model.params, ids, cache, jnp.ones((2, 2), jnp.int32))
