"""Shared fixtures: tiny randomised transformers Qwen2-VL references saved as HF directories."""

from __future__ import annotations

import pytest

from mr1jax.trainer import rollout

from mr1jax.models.qwen2_vl import Qwen2VLConfig
from tests.text_rewards import text_reward


def tiny_config(tied: bool = False) -> Qwen2VLConfig:
    return Qwen2VLConfig.tiny(vocab_size=512, hidden_size=64, num_layers=2, vision_depth=2,
                              tie_word_embeddings=tied)


def _saved_reference(tied: bool, tmp_path_factory):
    from mr1jax.testing.hf_reference import build_hf_model

    cfg = tiny_config(tied=tied)
    model = build_hf_model(cfg, seed=1 + tied)
    path = tmp_path_factory.mktemp(f"hf_tiny_{'tied' if tied else 'untied'}")
    model.save_pretrained(path)
    return cfg, model, path


@pytest.fixture(scope="session", params=[False, True], ids=["untied", "tied"])
def hf_tiny(request, tmp_path_factory):
    """(config, torch reference model, HF directory written by transformers' save_pretrained)."""
    return _saved_reference(request.param, tmp_path_factory)


@pytest.fixture(scope="session")
def hf_tiny_untied(tmp_path_factory):
    """The untied reference only (for the slower sampler tests)."""
    return _saved_reference(False, tmp_path_factory)


@pytest.fixture
def graded_reward(monkeypatch):
    """Training runs in this test score accuracy by `text_reward("graded")`: non-zero advantages on a random model,
    so RL steps move the parameters."""
    monkeypatch.setattr(rollout, "reward_parts", text_reward("graded"))
