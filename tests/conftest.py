"""Shared fixtures: tiny randomised transformers Qwen2-VL references saved as HF directories."""

from __future__ import annotations

import pytest

from mr1jax.models.qwen2_vl import Qwen2VLConfig


def tiny_config(tied: bool = False) -> Qwen2VLConfig:
    return Qwen2VLConfig.tiny(vocab_size=512, hidden_size=64, num_layers=2, vision_depth=2,
                              tie_word_embeddings=tied)


@pytest.fixture(scope="session", params=[False, True], ids=["untied", "tied"])
def hf_tiny(request, tmp_path_factory):
    """(config, torch reference model, HF directory written by transformers' save_pretrained)."""
    from mr1jax.testing.hf_reference import build_hf_model

    cfg = tiny_config(tied=request.param)
    model = build_hf_model(cfg, seed=1 + request.param)
    path = tmp_path_factory.mktemp(f"hf_tiny_{'tied' if request.param else 'untied'}")
    model.save_pretrained(path)
    return cfg, model, path
