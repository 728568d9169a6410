"""kivi-jax: KIVI and SKVQ KV-cache quantization for LLM inference in JAX."""

from kivi_jax.cache import KVCache, init_cache
from kivi_jax.calibration import Calibration, calibrate
from kivi_jax.checkpoint import cache_info, restore_cache, save_cache
from kivi_jax.config import PRESETS, KIVIConfig, get_preset
from kivi_jax.generate import generate, prefill_cache
from kivi_jax.memory import max_batch, max_context
from kivi_jax.models import Model, ModelConfig, load_model, load_tokenizer
from kivi_jax.sharding import make_mesh, shard_model

__all__ = [
    "Calibration", "KIVIConfig", "KVCache", "Model", "ModelConfig", "PRESETS", "cache_info",
    "calibrate", "generate", "get_preset", "init_cache", "load_model", "load_tokenizer",
    "make_mesh", "max_batch", "max_context", "prefill_cache", "restore_cache", "save_cache",
    "shard_model",
]
