"""The tiny Qwen2.5-VL variant (`--config.model.family=qwen2_5_vl`) through the training command: cold-start
SFT then GRPO, checkpoints, export to a directory transformers' Qwen2.5-VL class loads, and the plan's model
choice. Images of 112 px (8 x 8 patches) span four of the tiny model's 4 x 4-patch windows."""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest
import transformers
from test_train import tiny_config

from mr1jax.planning import cost, programs
from mr1jax.export import export_checkpoint
from mr1jax.models import Qwen25VL, Qwen25VLConfig, load_pretrained
from mr1jax.testing.hf_reference import hf_logits, make_batch, valid_max_diff
from mr1jax.trainer.loop import train_and_evaluate


def qwen25_config(**overrides):
    c = tiny_config(**{"model.family": "qwen2_5_vl", "data.image_size": 112, "data.prompt_bucket": 96, **overrides})
    c.model.tiny.vision_depth = 2           # block 0 windowed, block 1 full attention
    return c


@pytest.mark.slow  # ~65 s of CPU (compiles the SFT, rollout and GRPO steps)
def test_tiny_qwen25_trains_sft_then_grpo_and_exports(tmp_path, graded_reward):
    """SFT then GRPO with a reward that differs between samples: the reference is the SFT model (KL 0 at the first
    RL step), the first update moves the policy away from it (KL > 0 at the second), and the export gives
    transformers' Qwen2.5-VL the trained model's logits."""
    c = qwen25_config(mode="sft_then_grpo", total_steps=2, **{"sft.steps": 1, "checkpoint.every_steps": 100,
                                                              "rl.beta_schedule": "constant", "rl.beta": 0.1})
    train_and_evaluate(c, str(tmp_path))
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    sft = [r for r in rows if "sft_loss" in r]
    rl = [r for r in rows if "loss" in r]
    assert len(sft) == 1 and len(rl) == 2
    assert all(np.isfinite(r["sft_loss"]) for r in sft)
    assert all(np.isfinite(r[k]) for r in rl for k in ("loss", "reward", "kl", "completion_len"))
    assert sft[0]["sft_loss"] > 0 and rl[0]["grad_norm"] > 0
    assert abs(rl[0]["kl"]) < 1e-6 < rl[1]["kl"]
    out = export_checkpoint(str(tmp_path))
    ours = load_pretrained(out, dtype=jnp.float32)                     # the exported weights, fp32 compute
    assert isinstance(ours, Qwen25VL)
    hf, info = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(out, output_loading_info=True)
    assert not any(info.values()), info
    ids, mask, pv, grid = make_batch(ours.config, [{"text": 5, "images": [(1, 8, 8)]}] * 2, seed=1)
    expected = hf_logits(hf.float().eval(), ids, mask, pv, grid, ours.config.image_token_id)
    assert valid_max_diff(ours(ids, mask, pv, grid), expected, mask) < 1e-4


def test_plan_builds_the_tiny_qwen25():
    cfg, name, _ = programs.resolve_model_config(qwen25_config(), None)
    assert name == "tiny" and isinstance(cfg, Qwen25VLConfig)


def test_plan_counts_windowed_vision_attention():
    """4 full-attention blocks over all 1024 patches of a 448 px image, 28 windowed blocks over 3 x 64 keys."""
    cfg = Qwen25VLConfig.qwen2_5_vl_7b_instruct()
    none = programs.ParamCounts(total=0, vision=0, embedding=0, lm_head=0, decoder=0)
    v = cfg.vision
    flops = cost._forward_flops(cfg, none, rows=0, seq=0, logit_positions=0, images=2, patches=1024)
    assert flops == 4 * v.num_heads * v.head_dim * 2 * 1024 * (4 * 1024 + 28 * 3 * 64)
