"""Qwen2.5-VL against the real transformers implementation (fp32, offline): vision tower with window
attention, logits, M-RoPE positions, config import, round trip through transformers, greedy generation."""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from mr1jax.models import (Qwen25VL, Qwen25VLConfig, Qwen2VLConfig, config_from_hf, load_pretrained, prepare_inputs,
                           save_pretrained)
from mr1jax.models.qwen2_5_vl.config import Qwen25VisionConfig
from mr1jax.models.qwen2_vl import rope
from mr1jax.models.qwen2_vl.config import ConfigError
from mr1jax.generate.sampler import generate
from mr1jax.testing.hf_reference import (build_hf_model, hf_greedy, hf_logits, hf_rope_index, make_batch,
                                         valid_max_diff)

TOL = 1e-4

# Windows are 4 x 4 patches (56 px). (1, 12, 12) spans 9 windows, (1, 10, 6) has partial windows at the
# edges, (1, 2, 4) is smaller than one window, (2, 4, 4) has two temporal slices.
BATCHES = {
    "several_images_left_padded": [
        {"text": 20, "images": [(1, 10, 6)]},
        {"text": 6, "images": [(1, 2, 4), (1, 12, 12)]},  # two images of different sizes
        {"text": 9},                                       # text-only row
    ],
    "text_only_padded": [{"text": 15}, {"text": 4}],
}


def tiny_qwen25(tied: bool) -> Qwen25VLConfig:
    """Five vision blocks, full attention in blocks 1 and 3 (windowed 0, 2, 4)."""
    cfg = Qwen25VLConfig.tiny(vocab_size=512, hidden_size=64, num_layers=2, tie_word_embeddings=tied)
    return cfg.replace(vision=Qwen25VisionConfig(depth=5, embed_dim=32, num_heads=2, intermediate_size=48,
                                                 out_hidden_size=64, window_size=56, fullatt_block_indexes=(1, 3)))


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def ref(request, tmp_path_factory):
    cfg = tiny_qwen25(request.param)
    hf = build_hf_model(cfg, seed=11 + request.param)
    path = tmp_path_factory.mktemp("hf_qwen25")
    hf.save_pretrained(path)
    return cfg, hf, path, load_pretrained(path, dtype=jnp.float32)


def _hf_vision(hf, pv, grid):
    with torch.no_grad():
        return hf.model.visual(torch.as_tensor(pv), grid_thw=torch.as_tensor(grid)).pooler_output.numpy()


def test_loads_as_qwen25(ref):
    cfg, _, path, model = ref
    assert isinstance(model, Qwen25VL) and model.config == cfg
    assert config_from_hf(path) == cfg


def test_vision_tower_with_window_attention_matches(ref):
    cfg, hf, _, model = ref
    _, _, pv, grid = make_batch(cfg, [{"text": 3, "images": [(1, 10, 6), (1, 2, 4), (2, 4, 4), (1, 12, 12)]}],
                                seed=5)
    expected = _hf_vision(hf, pv, grid)
    pos = jnp.asarray(rope.vision_position_ids(grid, 2))
    ours = model.image_features(jnp.asarray(pv), pos, jnp.asarray(rope.vision_segment_ids(grid)))
    diff = float(np.abs(np.asarray(ours) - expected).max())
    print(f"vision tower max abs diff: {diff:.2e} (|ref| max {np.abs(expected).max():.2f})")
    assert ours.shape == expected.shape and diff <= TOL
    # The windows matter: the same weights with full attention everywhere give a different answer.
    model.visual.cfg = cfg.vision.__class__(**{**cfg.vision.__dict__, "fullatt_block_indexes": tuple(range(5))})
    try:
        full = model.image_features(jnp.asarray(pv), pos, jnp.asarray(rope.vision_segment_ids(grid)))
    finally:
        model.visual.cfg = cfg.vision
    assert float(np.abs(np.asarray(full) - expected).max()) > 100 * TOL


def test_uniform_images_take_the_batched_path(ref):
    """Equal-size images (the fixed-bucket training path: a static segment count) equal the masked path."""
    cfg, hf, _, model = ref
    _, _, pv, grid = make_batch(cfg, [{"text": 2, "images": [(1, 10, 6)] * 3}], seed=6)
    pos = jnp.asarray(rope.vision_position_ids(grid, 2))
    batched = np.asarray(model.image_features(jnp.asarray(pv), pos, 3))
    assert float(np.abs(batched - _hf_vision(hf, pv, grid)).max()) <= TOL


@pytest.mark.parametrize("batch", list(BATCHES))
def test_logits_match_transformers(ref, batch):
    cfg, hf, _, model = ref
    ids, mask, pv, grid = make_batch(cfg, BATCHES[batch], seed=3)
    expected = hf_logits(hf, ids, mask, pv, grid, cfg.image_token_id)
    diff = valid_max_diff(model(ids, mask, pv, grid), expected, mask)
    print(f"logits max abs diff [{batch}]: {diff:.2e} (|ref| max {np.abs(expected).max():.2f})")
    assert np.abs(expected).max() > 1.0 and diff <= TOL


def test_position_ids_and_rope_deltas_exact(ref):
    cfg, hf, _, _ = ref
    ids, mask, _, grid = make_batch(cfg, BATCHES["several_images_left_padded"], seed=3)
    ours = prepare_inputs(cfg, ids, mask, grid)
    ref_pos, ref_delta = hf_rope_index(hf, cfg, ids, mask, grid)
    np.testing.assert_array_equal(ours.position_ids, ref_pos)
    np.testing.assert_array_equal(ours.rope_deltas, ref_delta)


def test_round_trip_through_transformers(ref, tmp_path):
    """transformers -> mr1jax -> save_pretrained -> transformers: no missing/unexpected keys, same logits."""
    cfg, hf, _, model = ref
    save_pretrained(model, tmp_path)
    back, info = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(
        tmp_path, output_loading_info=True, dtype=torch.float32)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    back.eval()
    ids, mask, pv, grid = make_batch(cfg, BATCHES["several_images_left_padded"], seed=9)
    assert np.array_equal(hf_logits(hf, ids, mask, pv, grid, cfg.image_token_id),
                          hf_logits(back, ids, mask, pv, grid, cfg.image_token_id))
    assert bool(back.config.tie_word_embeddings) == cfg.tie_word_embeddings
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "qwen2_5_vl"


def test_greedy_generation_equals_transformers(ref):
    cfg, hf, _, model = ref
    if cfg.tie_word_embeddings:
        pytest.skip("the untied model covers the sampler; the head only changes the logits (tested above)")
    ids, mask, pv, grid = make_batch(cfg, [{"text": 10, "images": [(1, 10, 6)]}, {"text": 5, "images": [(1, 2, 4)]},
                                           {"text": 7}], seed=2)
    eos = cfg.eos_token_ids[0]
    ours = np.asarray(generate(model, ids, mask, pv, grid, max_new_tokens=16, temperature=0.0,
                               eos_token_ids=[eos]).tokens)
    expected = hf_greedy(hf, cfg, ids, mask, pv, grid, 16, eos)
    np.testing.assert_array_equal(ours[:, :expected.shape[1]], expected)
    assert (ours[:, expected.shape[1]:] == cfg.pad_token_id).all()


# ------------------------------------------------------------------------------------------ config
def _hub_config_7b() -> dict:
    """Qwen/Qwen2.5-VL-7B-Instruct's config.json (flat form; its vision_config omits fields)."""
    return {
        "architectures": ["Qwen2_5_VLForConditionalGeneration"], "model_type": "qwen2_5_vl",
        "attention_dropout": 0.0, "bos_token_id": 151643, "eos_token_id": 151645, "vision_start_token_id": 151652,
        "vision_end_token_id": 151653, "vision_token_id": 151654, "image_token_id": 151655,
        "video_token_id": 151656, "hidden_act": "silu", "hidden_size": 3584, "initializer_range": 0.02,
        "intermediate_size": 18944, "max_position_embeddings": 128000, "max_window_layers": 28,
        "num_attention_heads": 28, "num_hidden_layers": 28, "num_key_value_heads": 4, "rms_norm_eps": 1e-06,
        "rope_theta": 1000000.0, "sliding_window": 32768, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
        "use_cache": True, "use_sliding_window": False, "vocab_size": 152064,
        "vision_config": {"depth": 32, "hidden_act": "silu", "hidden_size": 1280, "intermediate_size": 3420,
                          "num_heads": 16, "in_chans": 3, "out_hidden_size": 3584, "patch_size": 14,
                          "spatial_merge_size": 2, "spatial_patch_size": 14, "window_size": 112,
                          "fullatt_block_indexes": [7, 15, 23, 31], "tokens_per_second": 2,
                          "temporal_patch_size": 2},
        "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
    }


def _param_count(cfg) -> int:
    import jax
    from flax import nnx

    model = nnx.eval_shape(lambda: Qwen25VL(cfg, rngs=nnx.Rngs(0)))
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def test_preset_parameter_counts():
    assert _param_count(Qwen25VLConfig.qwen2_5_vl_3b_instruct()) == 3_754_622_976
    assert _param_count(Qwen25VLConfig.qwen2_5_vl_7b_instruct()) == 8_292_166_656


def test_hub_config_equals_7b_preset():
    cfg = config_from_hf(_hub_config_7b())
    preset = Qwen25VLConfig.qwen2_5_vl_7b_instruct()
    assert cfg == preset.replace(text=cfg.text) and cfg.text.num_layers == 28
    assert cfg.vision.tokens_per_second == 2 and cfg.vision.window_patches == 8


def test_missing_vision_fields_take_transformers_defaults():
    d = _hub_config_7b()
    d["vision_config"] = {"out_hidden_size": 3584, "hidden_size": 1280}
    v = config_from_hf(d).vision
    hf_v = transformers.Qwen2_5_VLVisionConfig()
    assert (v.depth, v.intermediate_size, v.num_heads, v.window_size, list(v.fullatt_block_indexes)) == (
        hf_v.depth, hf_v.intermediate_size, hf_v.num_heads, hf_v.window_size, list(hf_v.fullatt_block_indexes))


def test_nested_config_round_trip_and_transformers_reads_it(tmp_path):
    cfg = Qwen25VLConfig.qwen2_5_vl_3b_instruct()
    assert Qwen25VLConfig.from_hf(cfg.to_hf_dict()) == cfg
    (tmp_path / "config.json").write_text(json.dumps(cfg.to_hf_dict()))
    hf = transformers.AutoConfig.from_pretrained(tmp_path)
    assert isinstance(hf, transformers.Qwen2_5_VLConfig)
    assert (hf.vision_config.hidden_size, hf.vision_config.out_hidden_size, hf.text_config.num_hidden_layers) == (
        1280, 2048, 36)
    assert config_from_hf(json.loads(hf.to_json_string())) == cfg


def test_family_mismatch_and_bad_fields_are_named():
    with pytest.raises(ConfigError, match="model_type is 'qwen2_5_vl'"):
        Qwen2VLConfig.from_hf(_hub_config_7b())
    with pytest.raises(ConfigError, match=r"fullatt_block_indexes \[40\]"):
        Qwen25VLConfig.tiny().replace(vision=Qwen25VisionConfig(depth=2, out_hidden_size=64, fullatt_block_indexes=(40,)))


def test_remat_gives_the_same_vision_gradients(ref):
    """The windowed blocks run under lax.cond inside the layer scan; rematerialising them changes nothing."""
    import jax
    from flax import nnx

    cfg, _, _, model = ref
    if cfg.tie_word_embeddings:
        pytest.skip("the vision tower does not depend on the head")
    _, _, pv, grid = make_batch(cfg, [{"text": 2, "images": [(1, 8, 8)] * 2}], seed=4)
    pos = jnp.asarray(rope.vision_position_ids(grid, 2))
    graphdef, state = nnx.split(model)

    def loss(state, policy):
        m = nnx.merge(graphdef, state)
        m.set_remat(policy)
        return jnp.sum(m.image_features(jnp.asarray(pv), pos, 2) ** 2)

    grad = jax.jit(jax.grad(loss), static_argnums=1)
    plain, remat = grad(state, "none"), grad(state, "full")
    for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(remat)):
        scale = max(1.0, float(jnp.abs(a).max()))                   # gradients reach ~20: rounding scales
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5 * scale)
    assert max(float(jnp.abs(g).max()) for g in jax.tree.leaves(plain["visual"])) > 0
