"""Functional Llama and Mistral models and their weight loading."""

from kivi_jax.models.config import ModelConfig
from kivi_jax.models.llama import forward
from kivi_jax.models.loading import Model, load_model, load_tokenizer

__all__ = ["Model", "ModelConfig", "forward", "load_model", "load_tokenizer"]
