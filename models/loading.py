"""Loading Llama and Mistral weights and tokenizers, with no torch needed.

Sources: an HF checkpoint directory (config.json plus safetensors, sharded or
not), a llama.cpp `.gguf` file (dequantized with the `gguf` package), or an
in-memory transformers model.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from pathlib import Path
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from jax.sharding import NamedSharding

from kivi_jax import sharding
from kivi_jax.models import llama
from kivi_jax.models.config import ModelConfig
from kivi_jax.models.gguf_file import GGUFFile, read_gguf

# transformers serves tokenizers here and nothing needs torch; without this its
# import advises every run that "PyTorch was not found".
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")


@dataclasses.dataclass(frozen=True)
class Model:
  """A loaded model: static config, parameter pytree and pure jitted steps.

  `forward(params, input_ids, cache, attention_mask=None, last_only=False) ->
  (logits, new_cache)` and `prefill` (the same for a prompt into an empty cache,
  logits of each row's last token) are jitted with the cache donated (updated
  in place on accelerators).
  """

  config: ModelConfig
  params: Any

  @functools.cached_property
  def forward(self) -> Callable:
    return jax.jit(functools.partial(llama.forward, config=self.config),
                   static_argnames="last_only", donate_argnames="cache")

  @functools.cached_property
  def prefill(self) -> Callable:
    return jax.jit(functools.partial(llama.prefill, config=self.config),
                   donate_argnames="cache")


# ----------------------------------------------------------------------------
# HF layout (torch `Linear` weights are [out, in]) -> the parameter pytree.


def _hf_layer_params(get: Callable[[str], np.ndarray], cfg: ModelConfig, i: int):
  p = f"model.layers.{i}."
  d, dh = cfg.hidden_size, cfg.head_dim
  return {
      "attn_norm": get(p + "input_layernorm.weight"),
      "wq": get(p + "self_attn.q_proj.weight").T.reshape(d, cfg.num_heads, dh),
      "wk": get(p + "self_attn.k_proj.weight").T.reshape(d, cfg.num_kv_heads, dh),
      "wv": get(p + "self_attn.v_proj.weight").T.reshape(d, cfg.num_kv_heads, dh),
      "wo": get(p + "self_attn.o_proj.weight").T.reshape(cfg.num_heads, dh, d),
      "mlp_norm": get(p + "post_attention_layernorm.weight"),
      "w_gate": get(p + "mlp.gate_proj.weight").T,
      "w_up": get(p + "mlp.up_proj.weight").T,
      "w_down": get(p + "mlp.down_proj.weight").T,
  }


def _expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
  d, f, dh = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
  return {
      "attn_norm": (d,), "mlp_norm": (d,),
      "wq": (d, cfg.num_heads, dh), "wk": (d, cfg.num_kv_heads, dh),
      "wv": (d, cfg.num_kv_heads, dh), "wo": (cfg.num_heads, dh, d),
      "w_gate": (d, f), "w_up": (d, f), "w_down": (f, d),
  }


def _checked_get(tensors: Mapping[str, Any], source: str) -> Callable[[str], np.ndarray]:
  def get(name):
    if name not in tensors:
      raise ValueError(f"{source}: missing weight {name!r}")
    return np.asarray(tensors[name])
  return get


def _assemble(get: Callable[[str], np.ndarray], cfg: ModelConfig, has_lm_head: bool,
              source: str, mesh=None):
  """Builds the parameter pytree, checking every shape against the config."""
  expected = _expected_shapes(cfg)
  layers = [_hf_layer_params(get, cfg, i) for i in range(cfg.num_layers)]
  for i, layer in enumerate(layers):
    for name, arr in layer.items():
      if arr.shape != expected[name]:
        raise ValueError(f"{source}: layer {i} {name} has shape {arr.shape}, the config "
                         f"implies {expected[name]}")
  layers = [llama.fuse_layer(layer) for layer in layers]
  params = {"embed": get("model.embed_tokens.weight"), "layers": tuple(layers),
            "final_norm": get("model.norm.weight")}
  if params["embed"].shape != (cfg.vocab_size, cfg.hidden_size):
    raise ValueError(f"{source}: embed_tokens has shape {params['embed'].shape}, the config "
                     f"implies {(cfg.vocab_size, cfg.hidden_size)}")
  if not cfg.tie_word_embeddings:
    if not has_lm_head:
      raise ValueError(f"{source}: missing weight 'lm_head.weight' (embeddings are not tied)")
    params["lm_head"] = get("lm_head.weight").T
  dtype = jnp.dtype(cfg.dtype)
  if mesh is None:
    return jax.tree.map(lambda a: jnp.asarray(a, dtype), params)
  # Host arrays sent shard by shard: each device receives its own slices only.
  return jax.tree.map(
      lambda a, spec: jax.device_put(np.asarray(a).astype(dtype), NamedSharding(mesh, spec)),
      params, sharding.param_specs(params))


def _load_hf_dir(path: Path, dtype: str, mesh) -> Model:
  config_file = path / "config.json"
  if not config_file.is_file():
    raise FileNotFoundError(f"{path}: no config.json (not an HF checkpoint directory)")
  cfg = ModelConfig.from_hf(json.loads(config_file.read_text()), dtype=dtype)
  if mesh is not None:
    sharding.check_mesh(mesh, cfg)
  files = sorted(path.glob("*.safetensors"))
  index = path / "model.safetensors.index.json"
  if index.is_file():
    shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    missing = [s for s in shards if not (path / s).is_file()]
    if missing:
      raise FileNotFoundError(f"{path}: shards named in {index.name} are missing: {missing}")
    files = [path / s for s in shards]
  if not files:
    raise FileNotFoundError(f"{path}: no *.safetensors weights found")
  from safetensors import safe_open
  tensors = {}
  # Over a mesh the file is read into host memory, not onto the first device.
  host = jax.devices("cpu")[0] if mesh is not None else None
  for f in files:
    # The flax framework reads bfloat16, which numpy's does not.
    with jax.default_device(host), safe_open(str(f), framework="flax") as sf:
      for name in sf.keys():
        tensors[name] = sf.get_tensor(name)
  params = _assemble(_checked_get(tensors, str(path)), cfg, "lm_head.weight" in tensors,
                     str(path), mesh)
  return Model(cfg, params)


def _load_transformers_model(hf_model, dtype: str, mesh) -> Model:
  cfg = ModelConfig.from_hf(hf_model.config, dtype=dtype)
  if mesh is not None:
    sharding.check_mesh(mesh, cfg)
  state = {k: v.detach().float().cpu().numpy() for k, v in hf_model.state_dict().items()}
  params = _assemble(_checked_get(state, type(hf_model).__name__), cfg,
                     "lm_head.weight" in state, type(hf_model).__name__, mesh)
  return Model(cfg, params)


# ----------------------------------------------------------------------------
# GGUF


def _unpermute_rope_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
  """Undoes llama.cpp's Q/K row permutation (interleaved RoPE -> HF's rotate_half).

  llama.cpp stores each head's rows as `reshape(2, Dh/2).T`; this is its inverse.
  """
  rows = w.shape[0]
  return (w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:])
          .swapaxes(1, 2).reshape(w.shape))


def gguf_model_config(reader: GGUFFile, dtype: str = "float32") -> ModelConfig:
  arch = reader.fields.get("general.architecture")
  if arch not in ("llama", "mistral"):
    raise ValueError(f"unsupported GGUF architecture {arch!r}; supported: llama, mistral")
  f = lambda k, default=None: reader.fields.get(f"{arch}.{k}", default)
  heads = int(f("attention.head_count"))
  hidden = int(f("embedding_length"))
  names = {t.name for t in reader.tensors}
  vocab = f("vocab_size") or len(reader.fields.get("tokenizer.ggml.tokens"))
  scaling = None
  if f("rope.scaling.type") == "linear":
    scaling = (("factor", float(f("rope.scaling.factor"))), ("rope_type", "linear"))
  elif f("rope.scaling.type") not in (None, "none"):
    raise ValueError(f"unsupported GGUF rope scaling {f('rope.scaling.type')!r}")
  window = f("attention.sliding_window")
  return ModelConfig(
      architecture="mistral" if window else "llama",
      vocab_size=int(vocab),
      hidden_size=hidden,
      intermediate_size=int(f("feed_forward_length")),
      num_layers=int(f("block_count")),
      num_heads=heads,
      num_kv_heads=int(f("attention.head_count_kv", heads)),
      head_dim=int(f("attention.key_length", hidden // heads)),
      rope_theta=float(f("rope.freq_base", 10000.0)),
      rope_scaling=scaling,
      rms_norm_eps=float(f("attention.layer_norm_rms_epsilon", 1e-6)),
      tie_word_embeddings="output.weight" not in names,
      sliding_window=int(window) if window else None,
      max_position_embeddings=int(f("context_length", 4096)),
      bos_token_id=reader.fields.get("tokenizer.ggml.bos_token_id"),
      eos_token_id=reader.fields.get("tokenizer.ggml.eos_token_id"),
      dtype=dtype,
  )


_GGUF_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_GGUF_LAYER_NAMES = {
    "attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}


def _load_gguf(path: Path, dtype: str, mesh) -> Model:
  from gguf.quants import dequantize
  reader = read_gguf(path)
  cfg = gguf_model_config(reader, dtype)
  if mesh is not None:
    sharding.check_mesh(mesh, cfg)
  tensors = {}
  for t in reader.tensors:
    parts = t.name.split(".")  # blk.<i>.<kind>.weight, or a global name
    if t.name in _GGUF_NAMES:
      name, kind = _GGUF_NAMES[t.name], None
    elif parts[0] == "blk" and parts[2] in _GGUF_LAYER_NAMES:
      kind = parts[2]
      name = f"model.layers.{parts[1]}.{_GGUF_LAYER_NAMES[kind]}.weight"
    else:
      continue
    w = dequantize(t.data, t.tensor_type).reshape(t.shape).astype(np.float32)
    if kind == "attn_q":
      w = _unpermute_rope_rows(w, cfg.num_heads)
    elif kind == "attn_k":
      w = _unpermute_rope_rows(w, cfg.num_kv_heads)
    tensors[name] = w
  params = _assemble(_checked_get(tensors, str(path)), cfg, "lm_head.weight" in tensors,
                     str(path), mesh)
  return Model(cfg, params)


# ----------------------------------------------------------------------------
# Public entry points


def load_model(source, dtype: str = "float32", mesh=None) -> Model:
  """Loads a Llama or Mistral model.

  Args:
    source: an HF checkpoint directory, a `.gguf` file path, or an in-memory
      transformers `LlamaForCausalLM` / `MistralForCausalLM`.
    dtype: parameter and activation dtype ("float32", "bfloat16", "float16").
    mesh: a `kivi_jax.make_mesh` mesh to split the weights over
      (`kivi_jax.sharding`): read on the host, each device receives only its
      own shards.
  """
  dtype = jnp.dtype(dtype).name
  if dtype not in ("float32", "bfloat16", "float16"):
    raise ValueError(f"dtype must be one of float32, bfloat16, float16; got {dtype!r}")
  if hasattr(source, "state_dict") and hasattr(source, "config"):
    return _load_transformers_model(source, dtype, mesh)
  path = _source_path(source, "model")
  if path.is_dir():
    return _load_hf_dir(path, dtype, mesh)
  if path.suffix == ".gguf":
    return _load_gguf(path, dtype, mesh)
  raise ValueError(f"{path}: expected an HF checkpoint directory or a .gguf file")


def _source_path(source, what: str) -> Path:
  """`source` (a path, or else a transformers `what`) as an existing path."""
  if not isinstance(source, (str, os.PathLike)):
    raise TypeError(f"source must be a path or a transformers {what}, got "
                    f"{type(source).__name__}")
  path = Path(source).expanduser()
  if not path.exists():
    raise FileNotFoundError(f"{what} path {str(path)!r} does not exist")
  return path


def _gguf_tokenizer(path: Path):
  """A GPT-2-style byte-level BPE tokenizer from a GGUF file's `tokenizer.ggml.*`."""
  from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
  from transformers import PreTrainedTokenizerFast
  reader = read_gguf(path)
  kind = reader.fields.get("tokenizer.ggml.model")
  if kind != "gpt2":
    raise ValueError(f"{path}: tokenizer model {kind!r} is not supported (only 'gpt2' BPE)")
  tokens = reader.fields.get("tokenizer.ggml.tokens")
  merges = [tuple(m.split(" ")) for m in reader.fields.get("tokenizer.ggml.merges")]
  types = reader.fields.get("tokenizer.ggml.token_type")
  tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges,
                             fuse_unk=False))
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  # Token type 3 is CONTROL (<|im_start|>, <|endoftext|>, ...): kept whole.
  tok.add_special_tokens([AddedToken(t, normalized=False, special=True)
                          for t, ty in zip(tokens, types) if ty == 3])
  special = lambda key: (lambda i: None if i is None else tokens[i])(
      reader.fields.get(f"tokenizer.ggml.{key}"))
  return PreTrainedTokenizerFast(
      tokenizer_object=tok, bos_token=special("bos_token_id"),
      eos_token=special("eos_token_id"), unk_token=special("unknown_token_id"),
      pad_token=special("padding_token_id"),
      chat_template=reader.fields.get("tokenizer.chat_template"))


def load_tokenizer(source):
  """The tokenizer of an HF checkpoint directory or a `.gguf` file.

  A transformers tokenizer passed in is returned as it is.
  """
  if hasattr(source, "encode") and hasattr(source, "decode"):
    return source
  path = _source_path(source, "tokenizer")
  if path.is_dir():
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(str(path))
  if path.suffix == ".gguf":
    return _gguf_tokenizer(path)
  raise ValueError(f"{path}: expected an HF checkpoint directory or a .gguf file")
