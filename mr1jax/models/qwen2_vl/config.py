"""Qwen2-VL configuration: dataclasses, Hugging Face config.json import/export, presets, validation.

Hugging Face stores Qwen2-VL configs in two shapes and both are accepted by `Qwen2VLConfig.from_hf`:

* the *flat* form found on the hub (text fields at the top level, ``rope_scaling={"type": "mrope", ...}``,
  ``rope_theta`` at the top level, vision fields such as ``in_chans`` / ``spatial_patch_size``);
* the *nested* form `transformers>=5` writes with ``save_pretrained`` (``text_config`` / ``vision_config``
  sub-dicts and ``rope_parameters``).

`Qwen2VLConfig.to_hf_dict` writes the nested form, which `transformers` loads directly.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, ClassVar

# Qwen2-VL special tokens on the real tokenizer; tiny test vocabularies pass their own ids.
QWEN2VL_SPECIAL_IDS = dict(
    pad_token_id=151643,  # <|endoftext|>
    bos_token_id=151643,
    eos_token_id=151645,  # <|im_end|>
    image_token_id=151655,
    video_token_id=151656,
    vision_start_token_id=151652,
    vision_end_token_id=151653,
)


class ConfigError(ValueError):
    """A Qwen2-VL config field holds a value the model cannot use."""


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    """The ViT image encoder (675M parameters in the real 2B/7B models)."""

    depth: int = 32
    embed_dim: int = 1280
    num_heads: int = 16
    mlp_ratio: int = 4
    hidden_act: str = "quick_gelu"
    in_channels: int = 3
    patch_size: int = 14
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    out_hidden_size: int = 1536  # merger output; must equal the text hidden size
    rope_theta: float = 10000.0
    layer_norm_eps: float = 1e-6

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def patch_dim(self) -> int:
        """Flattened patch length: channels * temporal * patch * patch (1176 for Qwen2-VL)."""
        return self.in_channels * self.temporal_patch_size * self.patch_size**2

    @property
    def mlp_dim(self) -> int:
        return int(self.embed_dim * self.mlp_ratio)

    def check_activation(self) -> None:
        if self.hidden_act != "quick_gelu":
            raise ConfigError(f"vision.hidden_act must be 'quick_gelu', got {self.hidden_act!r}")


@dataclasses.dataclass(frozen=True)
class TextConfig:
    """The Qwen2 decoder."""

    vocab_size: int = 151936
    hidden_size: int = 1536
    intermediate_size: int = 8960
    num_layers: int = 28
    num_heads: int = 12
    num_kv_heads: int = 2
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    mrope_section: tuple[int, ...] = (16, 24, 24)
    max_position_embeddings: int = 32768
    hidden_act: str = "silu"

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


@dataclasses.dataclass(frozen=True)
class Qwen2VLConfig:
    """Full Qwen2-VL config: text decoder, vision tower, special token ids, head tying."""

    model_type: ClassVar[str] = "qwen2_vl"
    architecture: ClassVar[str] = "Qwen2VLForConditionalGeneration"

    text: TextConfig = dataclasses.field(default_factory=TextConfig)
    vision: VisionConfig = dataclasses.field(default_factory=VisionConfig)
    tie_word_embeddings: bool = True
    pad_token_id: int = QWEN2VL_SPECIAL_IDS["pad_token_id"]
    bos_token_id: int = QWEN2VL_SPECIAL_IDS["bos_token_id"]
    eos_token_ids: tuple[int, ...] = (QWEN2VL_SPECIAL_IDS["eos_token_id"], QWEN2VL_SPECIAL_IDS["pad_token_id"])
    image_token_id: int = QWEN2VL_SPECIAL_IDS["image_token_id"]
    video_token_id: int = QWEN2VL_SPECIAL_IDS["video_token_id"]
    vision_start_token_id: int = QWEN2VL_SPECIAL_IDS["vision_start_token_id"]
    vision_end_token_id: int = QWEN2VL_SPECIAL_IDS["vision_end_token_id"]

    def __post_init__(self):
        self.validate()

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        """Raise `ConfigError` naming the field and what it must be."""
        t, v = self.text, self.vision
        for name, value in [
            ("text.vocab_size", t.vocab_size), ("text.hidden_size", t.hidden_size),
            ("text.intermediate_size", t.intermediate_size), ("text.num_layers", t.num_layers),
            ("text.num_heads", t.num_heads), ("text.num_kv_heads", t.num_kv_heads),
            ("vision.depth", v.depth), ("vision.embed_dim", v.embed_dim), ("vision.num_heads", v.num_heads),
            ("vision.patch_size", v.patch_size), ("vision.temporal_patch_size", v.temporal_patch_size),
            ("vision.spatial_merge_size", v.spatial_merge_size),
        ]:
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if t.hidden_size % t.num_heads:
            raise ConfigError(
                f"text.hidden_size ({t.hidden_size}) must be divisible by text.num_heads ({t.num_heads})")
        if t.num_heads % t.num_kv_heads:
            raise ConfigError(
                f"text.num_heads ({t.num_heads}) must be a multiple of text.num_kv_heads ({t.num_kv_heads})")
        if t.head_dim % 2:
            raise ConfigError(f"text head_dim ({t.head_dim}) must be even for rotary embeddings")
        if len(t.mrope_section) != 3 or sum(t.mrope_section) != t.head_dim // 2:
            raise ConfigError(
                f"text.mrope_section {list(t.mrope_section)} must have 3 entries summing to head_dim/2 = "
                f"{t.head_dim // 2} (head_dim = hidden_size/num_heads = {t.hidden_size}/{t.num_heads})")
        if v.embed_dim % v.num_heads:
            raise ConfigError(
                f"vision.embed_dim ({v.embed_dim}) must be divisible by vision.num_heads ({v.num_heads})")
        if v.head_dim % 4:
            raise ConfigError(f"vision head_dim ({v.head_dim}) must be a multiple of 4 for 2-D rotary embeddings")
        if v.out_hidden_size != t.hidden_size:
            raise ConfigError(
                f"vision.out_hidden_size ({v.out_hidden_size}) must equal text.hidden_size ({t.hidden_size}): "
                "the patch merger writes image features into the text embedding stream")
        v.check_activation()
        if t.hidden_act != "silu":
            raise ConfigError(f"text.hidden_act must be 'silu', got {t.hidden_act!r}")
        ids = dict(pad_token_id=self.pad_token_id, bos_token_id=self.bos_token_id,
                   image_token_id=self.image_token_id, video_token_id=self.video_token_id,
                   vision_start_token_id=self.vision_start_token_id,
                   vision_end_token_id=self.vision_end_token_id)
        ids.update({f"eos_token_ids[{i}]": e for i, e in enumerate(self.eos_token_ids)})
        for name, value in ids.items():
            if not isinstance(value, int) or not 0 <= value < t.vocab_size:
                raise ConfigError(f"{name} = {value!r} is outside the vocabulary [0, {t.vocab_size})")
        if not self.eos_token_ids:
            raise ConfigError("eos_token_ids must name at least one stop token")

    # ------------------------------------------------------------------ HF import/export
    @classmethod
    def from_hf(cls, path_or_dict: str | os.PathLike | dict[str, Any]) -> "Qwen2VLConfig":
        """Build from a Hugging Face `config.json` (path to the file or its directory) or its dict.

        Accepts the flat hub form and the nested `save_pretrained` form.
        """
        d = read_hf_config(path_or_dict)
        model_type = d.get("model_type")
        if model_type not in (None, cls.model_type):
            raise ConfigError(f"config.json model_type is {model_type!r}; {cls.__name__} reads "
                              f"{cls.model_type!r} checkpoints (mr1jax.models.load_pretrained picks the family)")

        td = dict(d.get("text_config") or {})
        # Flat form: text fields live at the top level. Nested values win where both exist.
        for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                    "num_key_value_heads", "rms_norm_eps", "rope_theta", "rope_scaling", "rope_parameters",
                    "max_position_embeddings", "hidden_act", "bos_token_id", "eos_token_id", "pad_token_id",
                    "tie_word_embeddings"):
            if key in d and key not in td:
                td[key] = d[key]
        rope = dict(td.get("rope_parameters") or td.get("rope_scaling") or {})
        rope_theta = rope.get("rope_theta", td.get("rope_theta", TextConfig.rope_theta))
        mrope = rope.get("mrope_section")
        if mrope is None:
            raise ConfigError("config has no mrope_section (expected in rope_scaling or rope_parameters)")
        num_heads = _req(td, "num_attention_heads")
        text = TextConfig(
            vocab_size=_req(td, "vocab_size"),
            hidden_size=_req(td, "hidden_size"),
            intermediate_size=_req(td, "intermediate_size"),
            num_layers=_req(td, "num_hidden_layers"),
            num_heads=num_heads,
            num_kv_heads=td.get("num_key_value_heads") or num_heads,
            rms_norm_eps=float(td.get("rms_norm_eps", 1e-6)),
            rope_theta=float(rope_theta),
            mrope_section=tuple(int(x) for x in mrope),
            max_position_embeddings=int(td.get("max_position_embeddings", 32768)),
            hidden_act=td.get("hidden_act", "silu"),
        )
        vision = cls._vision_from_hf(dict(d.get("vision_config") or {}), text)
        eos = td.get("eos_token_id", QWEN2VL_SPECIAL_IDS["eos_token_id"])
        eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else (eos,)
        bos = td.get("bos_token_id", QWEN2VL_SPECIAL_IDS["bos_token_id"])
        pad = td.get("pad_token_id", d.get("pad_token_id"))
        if pad is None:
            pad = bos if bos is not None else QWEN2VL_SPECIAL_IDS["pad_token_id"]
        # Instruct generation stops on <|im_end|> and on <|endoftext|> (the pad / bos token).
        if pad not in eos_ids:
            eos_ids = eos_ids + (pad,)
        tie = d.get("tie_word_embeddings", td.get("tie_word_embeddings", False))
        return cls(
            text=text, vision=vision, tie_word_embeddings=bool(tie),
            pad_token_id=int(pad), bos_token_id=int(bos if bos is not None else pad),
            eos_token_ids=tuple(int(e) for e in eos_ids),
            image_token_id=int(d.get("image_token_id", QWEN2VL_SPECIAL_IDS["image_token_id"])),
            video_token_id=int(d.get("video_token_id", QWEN2VL_SPECIAL_IDS["video_token_id"])),
            vision_start_token_id=int(d.get("vision_start_token_id", QWEN2VL_SPECIAL_IDS["vision_start_token_id"])),
            vision_end_token_id=int(d.get("vision_end_token_id", QWEN2VL_SPECIAL_IDS["vision_end_token_id"])),
        )

    @classmethod
    def _vision_from_hf(cls, vd: dict[str, Any], text: TextConfig) -> VisionConfig:
        """The vision tower's config from the `vision_config` dict (missing fields take transformers' defaults)."""
        vrope = vd.get("rope_parameters") or {}
        return VisionConfig(
            depth=int(vd.get("depth", VisionConfig.depth)),
            embed_dim=int(vd.get("embed_dim", VisionConfig.embed_dim)),
            num_heads=int(vd.get("num_heads", VisionConfig.num_heads)),
            mlp_ratio=vd.get("mlp_ratio", VisionConfig.mlp_ratio),
            hidden_act=vd.get("hidden_act", "quick_gelu"),
            in_channels=int(vd.get("in_channels", vd.get("in_chans", 3))),
            patch_size=int(vd.get("patch_size", vd.get("spatial_patch_size", 14))),
            temporal_patch_size=int(vd.get("temporal_patch_size", 2)),
            spatial_merge_size=int(vd.get("spatial_merge_size", 2)),
            out_hidden_size=int(vd.get("hidden_size", text.hidden_size)),
            rope_theta=float(vrope.get("rope_theta", 10000.0)),
        )

    def _vision_to_hf(self) -> dict[str, Any]:
        v = self.vision
        return {
            "model_type": "qwen2_vl_vision",
            "depth": v.depth,
            "embed_dim": v.embed_dim,
            "hidden_size": v.out_hidden_size,
            "hidden_act": v.hidden_act,
            "mlp_ratio": v.mlp_ratio,
            "num_heads": v.num_heads,
            "in_channels": v.in_channels,
            "patch_size": v.patch_size,
            "spatial_merge_size": v.spatial_merge_size,
            "temporal_patch_size": v.temporal_patch_size,
            "rope_parameters": {"rope_type": "axial", "rope_theta": v.rope_theta},
        }

    def to_hf_dict(self) -> dict[str, Any]:
        """The nested config.json that `transformers.Qwen2VLForConditionalGeneration` loads."""
        t = self.text
        return {
            "architectures": [self.architecture],
            "model_type": self.model_type,
            "image_token_id": self.image_token_id,
            "video_token_id": self.video_token_id,
            "vision_start_token_id": self.vision_start_token_id,
            "vision_end_token_id": self.vision_end_token_id,
            "tie_word_embeddings": self.tie_word_embeddings,
            "text_config": {
                "model_type": f"{self.model_type}_text",
                "vocab_size": t.vocab_size,
                "hidden_size": t.hidden_size,
                "intermediate_size": t.intermediate_size,
                "num_hidden_layers": t.num_layers,
                "num_attention_heads": t.num_heads,
                "num_key_value_heads": t.num_kv_heads,
                "hidden_act": t.hidden_act,
                "rms_norm_eps": t.rms_norm_eps,
                "max_position_embeddings": t.max_position_embeddings,
                "rope_parameters": {"rope_type": "default", "rope_theta": t.rope_theta,
                                    "mrope_section": list(t.mrope_section)},
                "bos_token_id": self.bos_token_id,
                "eos_token_id": self.eos_token_ids[0],
                "pad_token_id": self.pad_token_id,
                "tie_word_embeddings": self.tie_word_embeddings,
                "use_sliding_window": False,
            },
            "vision_config": self._vision_to_hf(),
        }

    # ------------------------------------------------------------------ presets
    @classmethod
    def qwen2_vl_2b_instruct(cls) -> "Qwen2VLConfig":
        """Qwen2-VL-2B-Instruct (2,208,985,600 parameters, tied embeddings)."""
        return cls(text=TextConfig(), vision=VisionConfig(out_hidden_size=1536), tie_word_embeddings=True)

    @classmethod
    def qwen2_vl_7b_instruct(cls) -> "Qwen2VLConfig":
        """Qwen2-VL-7B-Instruct (8,291,375,616 parameters, untied head)."""
        text = TextConfig(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_layers=28,
                          num_heads=28, num_kv_heads=4)
        return cls(text=text, vision=VisionConfig(out_hidden_size=3584), tie_word_embeddings=False)

    @classmethod
    def tiny(cls, *, vocab_size: int = 512, hidden_size: int = 64, num_layers: int = 2,
             vision_depth: int = 2, tie_word_embeddings: bool = False, **special_ids: int) -> "Qwen2VLConfig":
        """A few-hundred-thousand-parameter model for tests and CPU demos.

        Special token ids default to the top of the vocabulary (pad = vocab-7 ... image pad = vocab-2).
        """
        ids = dict(pad_token_id=vocab_size - 7, bos_token_id=vocab_size - 7, image_token_id=vocab_size - 2,
                   video_token_id=vocab_size - 1, vision_start_token_id=vocab_size - 4,
                   vision_end_token_id=vocab_size - 3)
        ids.update(special_ids)
        eos = ids.pop("eos_token_ids", (vocab_size - 6, ids["pad_token_id"]))
        num_heads = max(1, hidden_size // 16)
        head_dim = hidden_size // num_heads
        half = head_dim // 2
        sec = (half - 2 * (3 * half // 8), 3 * half // 8, 3 * half // 8)
        text = TextConfig(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=hidden_size * 2,
                          num_layers=num_layers, num_heads=num_heads, num_kv_heads=max(1, num_heads // 2),
                          mrope_section=sec)
        vision = cls._tiny_vision(vision_depth, hidden_size)
        return cls(text=text, vision=vision, tie_word_embeddings=tie_word_embeddings,
                   eos_token_ids=tuple(eos), **ids)

    @classmethod
    def _tiny_vision(cls, depth: int, out_hidden_size: int) -> VisionConfig:
        return VisionConfig(depth=depth, embed_dim=32, num_heads=2, out_hidden_size=out_hidden_size)

    def replace(self, **changes: Any) -> "Qwen2VLConfig":
        return dataclasses.replace(self, **changes)


def read_hf_config(path_or_dict: str | os.PathLike | dict[str, Any]) -> dict[str, Any]:
    """The dict of a Hugging Face `config.json` (a path to the file or its directory, or the dict itself)."""
    if isinstance(path_or_dict, dict):
        return path_or_dict
    path = os.fspath(path_or_dict)
    if os.path.isdir(path):
        path = os.path.join(path, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no Hugging Face config.json at {path}")
    with open(path) as f:
        return json.load(f)


def _req(d: dict[str, Any], key: str) -> Any:
    if key not in d or d[key] is None:
        raise ConfigError(f"config.json is missing the text field {key!r}")
    return d[key]
