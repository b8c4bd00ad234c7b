"""The model families mr1jax implements, keyed by the Hugging Face ``model_type`` of their config.json."""

from __future__ import annotations

import os
from typing import Any

from mr1jax.models.qwen2_5_vl.config import Qwen25VLConfig
from mr1jax.models.qwen2_5_vl.model import Qwen25VL
from mr1jax.models.qwen2_vl.config import ConfigError, Qwen2VLConfig, read_hf_config
from mr1jax.models.qwen2_vl.model import Qwen2VL

#: model_type -> (config class, model class)
FAMILIES: dict[str, tuple[type[Qwen2VLConfig], type[Qwen2VL]]] = {
    "qwen2_vl": (Qwen2VLConfig, Qwen2VL),
    "qwen2_5_vl": (Qwen25VLConfig, Qwen25VL),
}


def config_class(family: str) -> type[Qwen2VLConfig]:
    """The config class of a family name (a `FAMILIES` key); ValueError naming the allowed ones otherwise."""
    if family not in FAMILIES:
        raise ValueError(f"unknown model family {family!r}; allowed: {', '.join(map(repr, FAMILIES))}")
    return FAMILIES[family][0]


def model_class(config: Qwen2VLConfig) -> type[Qwen2VL]:
    """The model class for a config object (by its class's model_type)."""
    return FAMILIES[type(config).model_type][1]


def config_from_hf(path_or_dict: str | os.PathLike | dict[str, Any]) -> Qwen2VLConfig:
    """Read a Hugging Face config.json (flat hub or nested form) of any supported family."""
    d = read_hf_config(path_or_dict)
    model_type = d.get("model_type", "qwen2_vl")
    if model_type not in FAMILIES:
        raise ConfigError(f"config.json model_type is {model_type!r}; mr1jax reads "
                          f"{', '.join(map(repr, FAMILIES))} checkpoints")
    return FAMILIES[model_type][0].from_hf(d)
