"""Static architecture description of a Llama or Mistral model."""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

SUPPORTED_ARCHITECTURES = ("llama", "mistral")
_ROPE_TYPES = ("default", "linear", "llama3")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Everything the forward pass needs to know about the architecture.

  `rope_scaling` is a sorted tuple of `(key, value)` pairs (hashable, so the
  config can be a static `jit` argument); `dtype` is the dtype of the loaded
  parameters and of activations.
  """

  architecture: str
  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  rope_theta: float = 10000.0
  rope_scaling: tuple[tuple[str, Any], ...] | None = None
  rms_norm_eps: float = 1e-6
  tie_word_embeddings: bool = False
  sliding_window: int | None = None
  max_position_embeddings: int = 4096
  bos_token_id: int | None = None
  eos_token_id: int | None = None
  dtype: str = "float32"

  def __post_init__(self):
    if self.architecture not in SUPPORTED_ARCHITECTURES:
      raise ValueError(
          f"architecture must be one of {SUPPORTED_ARCHITECTURES}, got {self.architecture!r}")
    if self.num_heads % self.num_kv_heads:
      raise ValueError(
          f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads "
          f"({self.num_kv_heads})")
    rope_type = self.rope_scaling_dict.get("rope_type", "default")
    if rope_type not in _ROPE_TYPES:
      raise ValueError(f"rope_scaling type must be one of {_ROPE_TYPES}, got {rope_type!r}")

  @property
  def rope_scaling_dict(self) -> dict[str, Any]:
    return dict(self.rope_scaling or ())

  @classmethod
  def from_hf(cls, hf: Mapping[str, Any] | Any, dtype: str = "float32") -> "ModelConfig":
    """From a transformers config object or a `config.json` dict (4.x or 5.x keys)."""
    d = hf if isinstance(hf, Mapping) else hf.to_dict()
    model_type = d.get("model_type")
    if model_type not in SUPPORTED_ARCHITECTURES:
      raise ValueError(
          f"unsupported architecture {model_type!r} (model_type in the config); "
          f"supported: {SUPPORTED_ARCHITECTURES}")
    for flag in ("attention_bias", "mlp_bias"):
      if d.get(flag):
        raise ValueError(f"{flag}=True is not supported (Llama and Mistral without biases)")
    # transformers 5 nests rope settings in `rope_parameters`; 4.x and older
    # config.json files use top-level `rope_theta` and `rope_scaling`.
    rope = dict(d.get("rope_parameters") or d.get("rope_scaling") or {})
    theta = rope.pop("rope_theta", d.get("rope_theta", 10000.0))
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type == "default":
      scaling = None
    else:
      rope["rope_type"] = rope_type
      rope.pop("type", None)
      scaling = tuple(sorted(rope.items()))
    heads = d["num_attention_heads"]
    eos = d.get("eos_token_id")
    if isinstance(eos, (list, tuple)):
      eos = eos[0]
    sliding = d.get("sliding_window") if model_type == "mistral" else None
    return cls(
        architecture=model_type,
        vocab_size=d["vocab_size"],
        hidden_size=d["hidden_size"],
        intermediate_size=d["intermediate_size"],
        num_layers=d["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=d.get("num_key_value_heads") or heads,
        head_dim=d.get("head_dim") or d["hidden_size"] // heads,
        rope_theta=float(theta),
        rope_scaling=scaling,
        rms_norm_eps=d.get("rms_norm_eps", 1e-6),
        tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
        sliding_window=sliding,
        max_position_embeddings=d.get("max_position_embeddings", 4096),
        bos_token_id=d.get("bos_token_id"),
        eos_token_id=eos,
        dtype=dtype,
    )
