"""Loading HF checkpoint directories (sharded too) and the errors for bad ones."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
import torch

import kivi_jax
from conftest import tiny_hf_model, tiny_llama_config
from kivi_jax.models.config import ModelConfig

FP = kivi_jax.KIVIConfig(16, 16)


@pytest.fixture(scope="module")
def hf_model():
  return tiny_hf_model(tiny_llama_config())


@pytest.fixture(scope="module")
def ids():
  return np.random.default_rng(0).integers(0, 256, (1, 16))


def _logits(model, ids):
  cache = kivi_jax.init_cache(model.config, FP, 1, ids.shape[1])
  return np.asarray(model.forward(model.params, jnp.asarray(ids), cache)[0])


@pytest.mark.parametrize("shard", [None, "40KB"])
def test_hf_directory_loads_like_the_model(tmp_path, hf_model, ids, shard):
  kw = {"max_shard_size": shard} if shard else {}
  hf_model.save_pretrained(tmp_path, **kw)
  if shard:
    assert (tmp_path / "model.safetensors.index.json").is_file()
  loaded = kivi_jax.load_model(tmp_path)
  with torch.no_grad():
    ref = hf_model(torch.tensor(ids)).logits.numpy()
  np.testing.assert_allclose(_logits(loaded, ids), ref, atol=1e-4, rtol=0)


def test_bfloat16_load(tmp_path, hf_model, ids):
  hf_model.save_pretrained(tmp_path)
  model = kivi_jax.load_model(tmp_path, dtype="bfloat16")
  assert model.params["embed"].dtype == jnp.bfloat16
  ref = _logits(kivi_jax.load_model(tmp_path), ids)
  # bfloat16 keeps 8 bits of mantissa: logits of this 2-layer model agree to ~2%.
  assert np.abs(_logits(model, ids) - ref).max() < 0.05 * np.abs(ref).max()


def test_errors_name_the_problem(tmp_path, hf_model):
  with pytest.raises(FileNotFoundError, match="does not exist"):
    kivi_jax.load_model(tmp_path / "nope")
  with pytest.raises(FileNotFoundError, match="no config.json"):
    kivi_jax.load_model(tmp_path)
  with pytest.raises(ValueError, match="dtype must be one of"):
    kivi_jax.load_model(tmp_path, dtype="int8")
  with pytest.raises(TypeError, match="source must be a path"):
    kivi_jax.load_model(42)
  with pytest.raises(TypeError, match="source must be a path or a transformers tokenizer"):
    kivi_jax.load_tokenizer(hf_model)

  hf_model.save_pretrained(tmp_path, max_shard_size="40KB")
  config = json.loads((tmp_path / "config.json").read_text())
  shard = sorted(tmp_path.glob("model-*.safetensors"))[0]
  shard.rename(tmp_path / "moved.bin")
  with pytest.raises(FileNotFoundError, match="shards named in .* are missing"):
    kivi_jax.load_model(tmp_path)
  (tmp_path / "moved.bin").rename(shard)

  bad = dict(config, intermediate_size=96)
  (tmp_path / "config.json").write_text(json.dumps(bad))
  with pytest.raises(ValueError, match=r"w_gate has shape \(64, 112\), the config implies"):
    kivi_jax.load_model(tmp_path)

  (tmp_path / "config.json").write_text(json.dumps(dict(config, model_type="gpt2")))
  with pytest.raises(ValueError, match="unsupported architecture 'gpt2'"):
    kivi_jax.load_model(tmp_path)

  (tmp_path / "config.json").write_text(json.dumps(dict(config, tie_word_embeddings=False)))
  for f in tmp_path.glob("*.safetensors*"):
    f.unlink()
  with pytest.raises(FileNotFoundError, match="no .*safetensors"):
    kivi_jax.load_model(tmp_path)
  (tmp_path / "model.txt").write_text("")
  with pytest.raises(ValueError, match="expected an HF checkpoint directory or a .gguf"):
    kivi_jax.load_model(tmp_path / "model.txt")


def test_config_from_transformers_4_style_dict():
  cfg = ModelConfig.from_hf({
      "model_type": "llama", "vocab_size": 10, "hidden_size": 8, "intermediate_size": 16,
      "num_hidden_layers": 1, "num_attention_heads": 2, "rope_theta": 500000.0,
      "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                       "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}})
  assert cfg.rope_theta == 500000.0 and cfg.num_kv_heads == 2 and cfg.head_dim == 4
  assert cfg.rope_scaling_dict["rope_type"] == "llama3"
  with pytest.raises(ValueError, match="rope_scaling type must be one of"):
    ModelConfig.from_hf({"model_type": "llama", "vocab_size": 10, "hidden_size": 8,
                         "intermediate_size": 16, "num_hidden_layers": 1,
                         "num_attention_heads": 2, "rope_scaling": {"type": "yarn"}})
  with pytest.raises(ValueError, match="attention_bias=True is not supported"):
    ModelConfig.from_hf({"model_type": "llama", "attention_bias": True})
