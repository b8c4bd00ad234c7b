"""Qwen2.5-VL in Flax NNX: the Qwen2-VL text decoder with a windowed vision tower.

`prepare_inputs`, `ModelInputs` and the Hugging Face import/export (`mr1jax.models.load_pretrained` /
`save_pretrained`) are shared with Qwen2-VL.
"""

from mr1jax.models.qwen2_5_vl.config import Qwen25VisionConfig, Qwen25VLConfig
from mr1jax.models.qwen2_5_vl.model import Qwen25VL
from mr1jax.models.qwen2_vl.model import ModelInputs, prepare_inputs

__all__ = ["ModelInputs", "Qwen25VL", "Qwen25VLConfig", "Qwen25VisionConfig", "prepare_inputs"]
