"""Config import/export, presets and validation errors."""

from __future__ import annotations

import json

import jax
import pytest
from flax import nnx

from mr1jax.models.qwen2_vl import ConfigError, Qwen2VL, Qwen2VLConfig, TextConfig, VisionConfig


def _num_params(cfg: Qwen2VLConfig) -> int:
    model = nnx.eval_shape(lambda: Qwen2VL(cfg, rngs=nnx.Rngs(0)))
    return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def test_2b_preset_parameter_count():
    assert _num_params(Qwen2VLConfig.qwen2_vl_2b_instruct()) == 2_208_985_600


def test_7b_preset_parameter_count():
    assert _num_params(Qwen2VLConfig.qwen2_vl_7b_instruct()) == 8_291_375_616


def test_nested_config_round_trip():
    cfg = Qwen2VLConfig.qwen2_vl_7b_instruct()
    assert Qwen2VLConfig.from_hf(cfg.to_hf_dict()) == cfg


def test_transformers_reads_our_nested_config(tmp_path):
    import transformers

    cfg = Qwen2VLConfig.qwen2_vl_2b_instruct()
    (tmp_path / "config.json").write_text(json.dumps(cfg.to_hf_dict()))
    hf = transformers.Qwen2VLConfig.from_pretrained(tmp_path)
    assert hf.text_config.hidden_size == 1536 and hf.text_config.num_key_value_heads == 2
    assert hf.text_config.rope_parameters["mrope_section"] == [16, 24, 24]
    assert hf.vision_config.hidden_size == 1536 and hf.tie_word_embeddings is True
    assert hf.text_config.rms_norm_eps == 1e-6


def test_flat_hub_form_of_2b():
    flat = {
        "model_type": "qwen2_vl", "vocab_size": 151936, "hidden_size": 1536, "intermediate_size": 8960,
        "num_hidden_layers": 28, "num_attention_heads": 12, "num_key_value_heads": 2, "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0, "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
        "tie_word_embeddings": True, "bos_token_id": 151643, "eos_token_id": 151645,
        "vision_start_token_id": 151652, "vision_end_token_id": 151653, "vision_token_id": 151654,
        "image_token_id": 151655, "video_token_id": 151656, "hidden_act": "silu",
        "max_position_embeddings": 32768,
        "vision_config": {"depth": 32, "embed_dim": 1280, "mlp_ratio": 4, "num_heads": 16, "in_chans": 3,
                          "hidden_size": 1536, "patch_size": 14, "spatial_merge_size": 2,
                          "spatial_patch_size": 14, "temporal_patch_size": 2},
    }
    cfg = Qwen2VLConfig.from_hf(flat)
    assert cfg == Qwen2VLConfig.qwen2_vl_2b_instruct()
    assert cfg.eos_token_ids == (151645, 151643)


def test_reads_config_json_from_directory(tmp_path):
    cfg = Qwen2VLConfig.tiny()
    (tmp_path / "config.json").write_text(json.dumps(cfg.to_hf_dict()))
    assert Qwen2VLConfig.from_hf(tmp_path) == cfg
    with pytest.raises(FileNotFoundError, match="config.json"):
        Qwen2VLConfig.from_hf(tmp_path / "nope")


@pytest.mark.parametrize("change, match", [
    (dict(text=TextConfig(mrope_section=(16, 24, 20))), r"mrope_section \[16, 24, 20\].*summing to head_dim/2 = 64"),
    (dict(vision=VisionConfig(out_hidden_size=1024)), r"vision.out_hidden_size \(1024\) must equal text.hidden_size \(1536\)"),
    (dict(text=TextConfig(num_heads=12, num_kv_heads=5)), r"text.num_heads \(12\) must be a multiple of text.num_kv_heads \(5\)"),
    (dict(text=TextConfig(hidden_size=1000)), r"text.hidden_size \(1000\) must be divisible by text.num_heads \(12\)"),
    (dict(image_token_id=999_999), r"image_token_id = 999999 is outside the vocabulary \[0, 151936\)"),
    (dict(text=TextConfig(num_layers=0)), r"text.num_layers must be a positive integer, got 0"),
    (dict(vision=VisionConfig(hidden_act="gelu")), r"vision.hidden_act must be 'quick_gelu'"),
])
def test_validation_names_field(change, match):
    with pytest.raises(ConfigError, match=match):
        Qwen2VLConfig.qwen2_vl_2b_instruct().replace(**change)


def test_rejects_other_model_type():
    with pytest.raises(ConfigError, match="model_type is 'llama'"):
        Qwen2VLConfig.from_hf({"model_type": "llama"})


def test_missing_text_field_is_named():
    d = Qwen2VLConfig.tiny().to_hf_dict()
    del d["text_config"]["hidden_size"]
    with pytest.raises(ConfigError, match="'hidden_size'"):
        Qwen2VLConfig.from_hf(d)
