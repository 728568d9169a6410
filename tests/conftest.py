"""Shared fixtures and helpers: tiny random transformers models, the real SmolLM2 model,
TPU interpret-mode parameters."""

import dataclasses
import os
import shutil
import tempfile
from pathlib import Path

import jax
import pytest

# The parity tolerances assume float32 matmuls at full precision on the CPU.
jax.config.update("jax_default_matmul_precision", "highest")
# Eight CPU devices for the mesh tests (test_sharding.py); everything else runs on
# the first. Set before any backend starts.
jax.config.update("jax_num_cpu_devices", 8)


_COMPILE_CACHE = "JAX_COMPILATION_CACHE_DIR"


def pytest_configure(config):
  """One persistent compilation cache for the whole run, made by the main
  process and inherited by the xdist workers and every process a test starts
  (the CLI, notebook kernels): a program compiled once (SmolLM2's 30 unrolled
  layers take ~35 s on a CPU) is read back, not compiled again, in another
  module or process. Removed at the end of the run."""
  if not hasattr(config, "workerinput") and _COMPILE_CACHE not in os.environ:
    os.environ[_COMPILE_CACHE] = tempfile.mkdtemp(prefix="kivi-jax-test-compile-cache-")
    config._kivi_jax_compile_cache = os.environ[_COMPILE_CACHE]
  if _COMPILE_CACHE in os.environ:
    jax.config.update("jax_compilation_cache_dir", os.environ[_COMPILE_CACHE])


def pytest_unconfigure(config):
  made = getattr(config, "_kivi_jax_compile_cache", None)
  if made:
    shutil.rmtree(made, ignore_errors=True)


@pytest.fixture(autouse=True, scope="module")
def _free_compiled_programs():
  """Frees each test module's compiled programs after it. The whole suite in one
  process otherwise accumulates thousands of XLA:CPU executables, and past some
  point an unrelated compile crashed (SIGSEGV/SIGABRT in backend_compile)."""
  yield
  jax.clear_caches()


@pytest.fixture
def mlp_tokens(monkeypatch):
  """`set(n)`: `llama.MLP_TOKENS` (the tokens a layer's MLP block takes at once)
  set to `n` for the test. The jitted functions read it when traced, so the
  compiled programs are dropped at each setting and after the test, whether it
  passed or not."""
  from kivi_jax.models import llama

  def set_tokens(n):
    monkeypatch.setattr(llama, "MLP_TOKENS", n)
    jax.clear_caches()
  yield set_tokens
  monkeypatch.undo()
  jax.clear_caches()


@pytest.fixture(scope="session")
def smollm2_path():
  """SmolLM2-135M-Instruct's GGUF file, fetched on first use like the CLI does."""
  from kivi_jax.default_model import default_model_path
  return default_model_path(quiet=True)


def tpu_interpret_params():
  """TPU interpret mode for kernel tests: NaN-initialized memory stands in for
  poisoned outputs; races and stray reads raise."""
  from jax.experimental.pallas import tpu as pltpu
  return pltpu.InterpretParams(out_of_bounds_reads="raise", uninitialized_memory="nan",
                               detect_races=True)


@pytest.fixture
def tpu_lowering():
  """Lowering for a TPU (`.lower(lowering_platforms=("tpu",))`) on this machine:
  Pallas's TPU lowering asks the default device for its TPU generation, so for
  the test's length this device kind reads as a TPU v5e's (a private table of
  jax 0.10.2's; the test is skipped without it). What it checks that interpret
  mode does not: the lowering's rules (blocks of 8 x 128 tiles or whole axes,
  the primitives Mosaic takes); not Mosaic's own compile, which needs a TPU."""
  try:
    from jax._src.pallas.mosaic import tpu_info
    registry, chip = tpu_info.registry, tpu_info.ChipVersion.TPU_V5E
  except (ImportError, AttributeError):
    pytest.skip("this jax has no table of TPU generations to extend")
  kind = jax.devices()[0].device_kind
  before = registry.get(kind)
  registry[kind] = lambda: tpu_info.get_tpu_info_for_chip(chip, 1)
  yield
  if before is None:
    del registry[kind]
  else:
    registry[kind] = before


def first_layers(model, n):
  """A model's embedding, head and first `n` layers: real weights and
  activations at a fraction of the compile time of all its unrolled layers."""
  return dataclasses.replace(model, config=dataclasses.replace(model.config, num_layers=n),
                             params={**model.params, "layers": model.params["layers"][:n]})


def wikitext_calibration(model, tokenizer, kv_config):
  """`kv_config`'s calibration on the last 40,000 characters of WikiText-2's test
  file (2048 tokens), or None where it needs none."""
  if not kv_config.needs_calibration:
    return None
  import numpy as np

  import kivi_jax
  from kivi_jax import eval as kv_eval
  wikitext = Path(__file__).resolve().parents[2] / "shared/data/wikitext-2-raw/wiki.test.raw"
  with open(wikitext, newline="") as f:
    text = np.asarray(tokenizer.encode(f.read()[-40_000:], add_special_tokens=False))
  return kivi_jax.calibrate(model, kv_eval.calibration_batches(text, 2048), kv_config,
                            progress=False)


@dataclasses.dataclass(frozen=True)
class CacheShape:
  """What `init_cache` reads of a model config: one float32 layer."""
  num_kv_heads: int
  head_dim: int
  num_layers: int = 1
  dtype: str = "float32"


def tiny_llama_config(**overrides):
  from transformers import LlamaConfig
  kw = dict(vocab_size=256, hidden_size=64, intermediate_size=112, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
            rms_norm_eps=1e-5, tie_word_embeddings=False, attn_implementation="eager")
  kw.update(overrides)
  return LlamaConfig(**kw)


def tiny_hf_model(config, seed=0):
  import torch
  from transformers import AutoModelForCausalLM
  torch.manual_seed(seed)
  model = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
  # transformers initialises norms to ones; random norms exercise their weights too.
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "norm" in name:
        p.uniform_(0.5, 1.5)
  return model.eval()


def byte_tokenizer():
  """A GPT-2-style byte-level BPE with no merges: one token per byte, ids < 256,
  so it fits the tiny models' vocabulary."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers
  from transformers import PreTrainedTokenizerFast
  alphabet = pre_tokenizers.ByteLevel.alphabet()
  byte_to_char = {}
  # GPT-2's byte-to-unicode map: printable bytes map to themselves.
  printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
  extra = 0
  for b in range(256):
    if b in printable:
      byte_to_char[b] = chr(b)
    else:
      byte_to_char[b] = chr(256 + extra)
      extra += 1
  assert set(byte_to_char.values()) == set(alphabet)
  vocab = {c: b for b, c in byte_to_char.items()}
  tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  return PreTrainedTokenizerFast(tokenizer_object=tok)
