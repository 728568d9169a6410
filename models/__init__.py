"""Functional Llama and Mistral models and their weight loading."""

from models.config import ModelConfig
from models.llama import forward
from models.loading import Model, load_model, load_tokenizer

__all__ = ["Model", "ModelConfig", "forward", "load_model", "load_tokenizer"]
