"""Qwen2.5-VL configuration: the Qwen2-VL config with a different vision tower.

The text decoder (`TextConfig`), special token ids, head tying, validation and the text half of the
Hugging Face import are Qwen2-VL's (`mr1jax.models.qwen2_vl.config`). The vision tower differs:

* its width is ``vision_config.hidden_size`` (1280) and the merger's output width ``out_hidden_size`` (the
  language model's hidden size); Qwen2-VL names these ``embed_dim`` and ``hidden_size``. Internally both
  families use `embed_dim` / `out_hidden_size`;
* a SwiGLU MLP of ``intermediate_size`` (3420) with ``hidden_act`` silu;
* window attention: windows of ``window_size`` pixels (112 = 4 x 4 merged units = 8 x 8 patches), with
  full attention in the blocks ``fullatt_block_indexes``;
* ``tokens_per_second`` scales the temporal M-RoPE index of videos.

Published vision configs often omit fields; `Qwen25VLConfig.from_hf` fills them with transformers'
defaults (`Qwen2_5_VLVisionConfig`), except the ones the Instruct checkpoints themselves pin.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

from mr1jax.models.qwen2_vl.config import ConfigError, Qwen2VLConfig, TextConfig, VisionConfig


@dataclasses.dataclass(frozen=True)
class Qwen25VisionConfig(VisionConfig):
    """The Qwen2.5-VL ViT (669M parameters in the 3B / 7B models)."""

    hidden_act: str = "silu"
    intermediate_size: int = 3420
    window_size: int = 112                # pixels; windows are window_size / patch_size patches square
    fullatt_block_indexes: tuple[int, ...] = (7, 15, 23, 31)
    tokens_per_second: int = 2            # the checkpoints say 2 (transformers' class default is 4)
    out_hidden_size: int = 2048

    @property
    def mlp_dim(self) -> int:
        return self.intermediate_size

    @property
    def window_patches(self) -> int:
        """Side of one attention window in patches (8): whole merged units of window_size pixels."""
        return (self.window_size // self.spatial_merge_size // self.patch_size) * self.spatial_merge_size

    def check_activation(self) -> None:
        if self.hidden_act != "silu":
            raise ConfigError(f"vision.hidden_act must be 'silu', got {self.hidden_act!r}")
        if self.window_patches <= 0:
            raise ConfigError(
                f"vision.window_size ({self.window_size}) must cover at least one merged unit of "
                f"{self.patch_size * self.spatial_merge_size} pixels")
        bad = [i for i in self.fullatt_block_indexes if not 0 <= i < self.depth]
        if bad:
            raise ConfigError(f"vision.fullatt_block_indexes {bad} are outside the {self.depth} vision blocks")


@dataclasses.dataclass(frozen=True)
class Qwen25VLConfig(Qwen2VLConfig):
    """Full Qwen2.5-VL config (same fields as `Qwen2VLConfig`; `vision` is a `Qwen25VisionConfig`)."""

    model_type: ClassVar[str] = "qwen2_5_vl"
    architecture: ClassVar[str] = "Qwen2_5_VLForConditionalGeneration"

    vision: Qwen25VisionConfig = dataclasses.field(default_factory=Qwen25VisionConfig)

    @classmethod
    def _vision_from_hf(cls, vd: dict[str, Any], text: TextConfig) -> Qwen25VisionConfig:
        """The nested and the hub form name these fields alike; missing ones take transformers' defaults
        (tokens_per_second: the checkpoints' 2 unless given)."""
        d = Qwen25VisionConfig
        vrope = vd.get("rope_parameters") or {}
        depth = int(vd.get("depth", d.depth))
        return Qwen25VisionConfig(
            depth=depth,
            embed_dim=int(vd.get("hidden_size", d.embed_dim)),
            num_heads=int(vd.get("num_heads", d.num_heads)),
            hidden_act=vd.get("hidden_act", d.hidden_act),
            intermediate_size=int(vd.get("intermediate_size", d.intermediate_size)),
            in_channels=int(vd.get("in_channels", vd.get("in_chans", 3))),
            patch_size=int(vd.get("patch_size", vd.get("spatial_patch_size", 14))),
            temporal_patch_size=int(vd.get("temporal_patch_size", 2)),
            spatial_merge_size=int(vd.get("spatial_merge_size", 2)),
            out_hidden_size=int(vd.get("out_hidden_size", text.hidden_size)),
            window_size=int(vd.get("window_size", d.window_size)),
            fullatt_block_indexes=tuple(int(i) for i in vd.get("fullatt_block_indexes", d.fullatt_block_indexes)),
            tokens_per_second=int(vd.get("tokens_per_second", d.tokens_per_second)),
            rope_theta=float(vrope.get("rope_theta", 10000.0)),
        )

    def _vision_to_hf(self) -> dict[str, Any]:
        v = self.vision
        return {
            "model_type": "qwen2_5_vl_vision",
            "depth": v.depth,
            "hidden_size": v.embed_dim,
            "out_hidden_size": v.out_hidden_size,
            "intermediate_size": v.intermediate_size,
            "hidden_act": v.hidden_act,
            "num_heads": v.num_heads,
            "in_channels": v.in_channels,
            "patch_size": v.patch_size,
            "spatial_merge_size": v.spatial_merge_size,
            "temporal_patch_size": v.temporal_patch_size,
            "window_size": v.window_size,
            "fullatt_block_indexes": list(v.fullatt_block_indexes),
            "tokens_per_second": v.tokens_per_second,
            "rope_parameters": {"rope_type": "axial", "rope_theta": v.rope_theta},
        }

    # ------------------------------------------------------------------ presets
    @classmethod
    def qwen2_5_vl_3b_instruct(cls) -> "Qwen25VLConfig":
        """Qwen2.5-VL-3B-Instruct (3,754,622,976 parameters, tied embeddings)."""
        text = TextConfig(vocab_size=151936, hidden_size=2048, intermediate_size=11008, num_layers=36,
                          num_heads=16, num_kv_heads=2)
        return cls(text=text, vision=Qwen25VisionConfig(out_hidden_size=2048), tie_word_embeddings=True)

    @classmethod
    def qwen2_5_vl_7b_instruct(cls) -> "Qwen25VLConfig":
        """Qwen2.5-VL-7B-Instruct (8,292,166,656 parameters, untied head): Vision-R1's backbone."""
        text = TextConfig(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_layers=28,
                          num_heads=28, num_kv_heads=4)
        return cls(text=text, vision=Qwen25VisionConfig(out_hidden_size=3584), tie_word_embeddings=False)

    @classmethod
    def _tiny_vision(cls, depth: int, out_hidden_size: int) -> Qwen25VisionConfig:
        """32 wide, 2 heads; windows of 4 x 4 patches (56 px); full attention in blocks 1, 3, 5, ..."""
        return Qwen25VisionConfig(depth=depth, embed_dim=32, num_heads=2, intermediate_size=48,
                                  out_hidden_size=out_hidden_size, window_size=56,
                                  fullatt_block_indexes=tuple(range(1, depth, 2)))
