"""Qwen2-VL in Flax NNX: config, model, Hugging Face import/export."""

from mr1jax.models.qwen2_vl.config import ConfigError, Qwen2VLConfig, TextConfig, VisionConfig
from mr1jax.models.qwen2_vl.model import (REMAT_POLICIES, ImageTokenMismatchError, ModelInputs, Qwen2VL,
                                          prepare_inputs, set_remat)

__all__ = [
    "REMAT_POLICIES", "ConfigError", "ImageTokenMismatchError", "ModelInputs", "Qwen2VL", "Qwen2VLConfig",
    "TextConfig", "VisionConfig", "prepare_inputs", "set_remat",
]
