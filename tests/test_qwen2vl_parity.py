"""Parity of the Flax Qwen2-VL port with the real transformers implementation (fp32, offline)."""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from mr1jax.models.qwen2_vl import prepare_inputs
from mr1jax.models.qwen2_vl.hf import load_pretrained, save_pretrained
from mr1jax.testing.hf_reference import hf_logits, hf_rope_index, make_batch, valid_max_diff

TOL = 1e-4

BATCHES = {
    "one_image": [{"text": 12, "images": [(1, 4, 4)]}],
    "left_padded_mixed": [
        {"text": 20, "images": [(1, 4, 6)]},
        {"text": 6, "images": [(1, 4, 4), (1, 8, 4)]},   # two images of different sizes
        {"text": 9},                                      # text-only row
    ],
    "text_only_padded": [{"text": 15}, {"text": 4}],
}


_valid_max_diff = valid_max_diff


@pytest.mark.parametrize("batch", list(BATCHES))
def test_logits_match_transformers(hf_tiny, batch):
    cfg, hf, path = hf_tiny
    model = load_pretrained(path, dtype=jnp.float32)
    ids, mask, pv, grid = make_batch(cfg, BATCHES[batch], seed=3)
    ref = hf_logits(hf, ids, mask, pv, grid, cfg.image_token_id)
    diff = _valid_max_diff(model(ids, mask, pv, grid), ref, mask)
    print(f"logits max abs diff [{batch}]: {diff:.2e} (|ref| max {np.abs(ref).max():.2f})")
    assert np.abs(ref).max() > 1.0, "reference logits too small for a meaningful comparison"
    assert diff <= TOL


def test_vision_tower_matches_transformers(hf_tiny):
    cfg, hf, path = hf_tiny
    model = load_pretrained(path, dtype=jnp.float32)
    _, _, pv, grid = make_batch(cfg, [{"text": 3, "images": [(1, 4, 6), (1, 8, 4), (2, 4, 4)]}], seed=5)
    extra = prepare_inputs(cfg, np.zeros((1, 1), np.int32), None, None)
    del extra
    from mr1jax.models.qwen2_vl import rope
    ours = model.image_features(jnp.asarray(pv), jnp.asarray(rope.vision_position_ids(grid, 2)),
                                jnp.asarray(rope.vision_segment_ids(grid)))
    with torch.no_grad():
        ref = hf.model.visual(torch.as_tensor(pv), grid_thw=torch.as_tensor(grid)).pooler_output.numpy()
    diff = float(np.abs(np.asarray(ours) - ref).max())
    print(f"vision tower max abs diff: {diff:.2e}")
    assert ours.shape == ref.shape
    assert diff <= TOL


def test_uniform_and_masked_vision_paths_agree(hf_tiny):
    """Equal-size images take the batched (mask-free) path; it must equal the segment-mask path."""
    cfg, _, path = hf_tiny
    model = load_pretrained(path, dtype=jnp.float32)
    _, _, pv, grid = make_batch(cfg, [{"text": 2, "images": [(1, 4, 4)] * 3}], seed=6)
    from mr1jax.models.qwen2_vl import rope
    pos = jnp.asarray(rope.vision_position_ids(grid, 2))
    batched = model.image_features(jnp.asarray(pv), pos, 3)
    masked = model.image_features(jnp.asarray(pv), pos, jnp.asarray(rope.vision_segment_ids(grid)))
    np.testing.assert_allclose(np.asarray(batched), np.asarray(masked), atol=1e-5)


@pytest.mark.parametrize("batch", ["left_padded_mixed", "one_image"])
def test_position_ids_exact(hf_tiny, batch):
    cfg, hf, _ = hf_tiny
    ids, mask, _, grid = make_batch(cfg, BATCHES[batch], seed=3)
    ours = prepare_inputs(cfg, ids, mask, grid)
    ref_pos, ref_delta = hf_rope_index(hf, cfg, ids, mask, grid)
    np.testing.assert_array_equal(ours.position_ids, ref_pos)
    np.testing.assert_array_equal(ours.rope_deltas, ref_delta)


def _flat_hub_config(cfg) -> dict:
    """The flat config.json layout of hub checkpoints (Qwen/Qwen2-VL-2B-Instruct style)."""
    t, v = cfg.text, cfg.vision
    return {
        "architectures": ["Qwen2VLForConditionalGeneration"], "model_type": "qwen2_vl",
        "vocab_size": t.vocab_size, "hidden_size": t.hidden_size, "intermediate_size": t.intermediate_size,
        "num_hidden_layers": t.num_layers, "num_attention_heads": t.num_heads,
        "num_key_value_heads": t.num_kv_heads, "hidden_act": "silu", "rms_norm_eps": t.rms_norm_eps,
        "rope_theta": t.rope_theta, "rope_scaling": {"type": "mrope", "mrope_section": list(t.mrope_section)},
        "max_position_embeddings": 32768, "tie_word_embeddings": cfg.tie_word_embeddings,
        "bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_ids[0],
        "image_token_id": cfg.image_token_id, "video_token_id": cfg.video_token_id,
        "vision_start_token_id": cfg.vision_start_token_id, "vision_end_token_id": cfg.vision_end_token_id,
        "vision_config": {"depth": v.depth, "embed_dim": v.embed_dim, "mlp_ratio": v.mlp_ratio,
                          "num_heads": v.num_heads, "in_chans": 3, "hidden_size": v.out_hidden_size,
                          "patch_size": v.patch_size, "spatial_merge_size": 2, "spatial_patch_size": 14,
                          "temporal_patch_size": 2},
    }


def test_flat_hub_config_loads_with_same_logits(hf_tiny, tmp_path):
    cfg, hf, path = hf_tiny
    (tmp_path / "config.json").write_text(json.dumps(_flat_hub_config(cfg)))
    (tmp_path / "model.safetensors").symlink_to(path / "model.safetensors")
    model = load_pretrained(tmp_path, dtype=jnp.float32)
    assert model.config == cfg.replace(eos_token_ids=model.config.eos_token_ids)
    ids, mask, pv, grid = make_batch(cfg, BATCHES["left_padded_mixed"], seed=8)
    ref = hf_logits(hf, ids, mask, pv, grid, cfg.image_token_id)
    assert _valid_max_diff(model(ids, mask, pv, grid), ref, mask) <= TOL


def test_round_trip_through_transformers(hf_tiny, tmp_path):
    """transformers -> mr1jax -> save_pretrained -> transformers: no missing/unexpected keys, same logits."""
    import transformers

    cfg, hf, path = hf_tiny
    model = load_pretrained(path, dtype=jnp.float32)
    save_pretrained(model, tmp_path)
    back, info = transformers.Qwen2VLForConditionalGeneration.from_pretrained(
        tmp_path, output_loading_info=True, dtype=torch.float32)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    back.eval()
    ids, mask, pv, grid = make_batch(cfg, BATCHES["left_padded_mixed"], seed=9)
    ref = hf_logits(hf, ids, mask, pv, grid, cfg.image_token_id)
    again = hf_logits(back, ids, mask, pv, grid, cfg.image_token_id)
    assert np.array_equal(ref, again)
    assert bool(back.config.tie_word_embeddings) == cfg.tie_word_embeddings
