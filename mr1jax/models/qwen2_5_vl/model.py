"""Qwen2.5-VL in Flax NNX: `Qwen2VL` (text decoder, M-RoPE, head, sampler / trainer interface) with the
windowed vision tower. Everything the trainer calls (`forward`, `image_features`, `hidden_states`, `logits`,
`decode_hidden`, `prepare_inputs`) is inherited unchanged: the vision tower is the only difference."""

from __future__ import annotations

from mr1jax.models.qwen2_5_vl.vision import WindowVisionTower
from mr1jax.models.qwen2_vl.model import Qwen2VL


class Qwen25VL(Qwen2VL):
    """Qwen2.5-VL for conditional generation (Hugging Face layout: `visual`, `model`, `lm_head`)."""

    vision_class = WindowVisionTower
