"""Checkpoint import/export: sharded files, dtypes, and the errors for checkpoints that do not fit."""

from __future__ import annotations

import json
import os

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx

from mr1jax.models.qwen2_vl import Qwen2VL
from mr1jax.models.qwen2_vl.hf import (CheckpointMismatchError, SafetensorsFile, load_pretrained, save_pretrained,
                                       write_safetensors)
from mr1jax.testing.hf_reference import make_batch
from tests.conftest import tiny_config


def _params(model):
    return {p: np.asarray(v[...]) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


@pytest.fixture(scope="module")
def saved_tiny(tmp_path_factory):
    cfg = tiny_config()
    model = Qwen2VL(cfg, rngs=nnx.Rngs(3))
    path = tmp_path_factory.mktemp("saved")
    save_pretrained(model, path)
    return model, path


def test_sharded_save_writes_index_and_reloads_exactly(saved_tiny, tmp_path):
    model, _ = saved_tiny
    save_pretrained(model, tmp_path, max_shard_bytes=200_000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 1 and all((tmp_path / f).exists() for f in files)
    assert not (tmp_path / "model.safetensors").exists()
    reloaded = load_pretrained(tmp_path, dtype=jnp.float32)
    a, b = _params(model), _params(reloaded)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_bf16_save_and_load(saved_tiny, tmp_path):
    model, _ = saved_tiny
    save_pretrained(model, tmp_path, save_dtype=ml_dtypes.bfloat16)
    f = SafetensorsFile(str(tmp_path / "model.safetensors"))
    assert {v["dtype"] for v in f.header.values()} == {"BF16"}
    assert json.loads((tmp_path / "config.json").read_text())["dtype"] == "bfloat16"
    reloaded = load_pretrained(tmp_path, dtype=jnp.bfloat16)
    for k, v in _params(reloaded).items():
        assert v.dtype == jnp.bfloat16
        np.testing.assert_array_equal(v, _params(model)[k].astype(ml_dtypes.bfloat16))


def test_transformers_loads_bf16_export(saved_tiny, tmp_path):
    import torch
    import transformers

    model, _ = saved_tiny
    save_pretrained(model, tmp_path, save_dtype=ml_dtypes.bfloat16)
    hf, info = transformers.Qwen2VLForConditionalGeneration.from_pretrained(tmp_path, output_loading_info=True)
    assert not any(info.values()), info
    assert hf.model.language_model.embed_tokens.weight.dtype == torch.bfloat16


def test_logits_unchanged_by_save_load(saved_tiny):
    model, path = saved_tiny
    cfg = model.config
    ids, mask, pv, grid = make_batch(cfg, [{"text": 6, "images": [(1, 4, 4)]}, {"text": 3}], seed=0)
    np.testing.assert_array_equal(np.asarray(model(ids, mask, pv, grid)),
                                  np.asarray(load_pretrained(path, dtype=jnp.float32)(ids, mask, pv, grid)))


def test_checkpoint_from_other_model_names_every_mismatch(saved_tiny, tmp_path):
    _, path = saved_tiny
    f = SafetensorsFile(str(path / "model.safetensors"))
    tensors = {k: np.array(f[k]) for k in f.keys()}
    tensors["model.layers.0.mlp.up_proj.weight"] = np.zeros((7, 64), np.float32)     # misshaped
    del tensors["model.norm.weight"]                                                 # missing
    tensors["model.layers.9.self_attn.q_proj.weight"] = np.zeros((2, 2), np.float32)  # unexpected
    write_safetensors(str(tmp_path / "model.safetensors"), tensors)
    (tmp_path / "config.json").write_text((path / "config.json").read_text())
    with pytest.raises(CheckpointMismatchError) as err:
        load_pretrained(tmp_path)
    msg = str(err.value)
    assert "1 missing: model.norm.weight [64]" in msg
    assert "model.layers.0.mlp.up_proj.weight: checkpoint [7, 64] vs model [128, 64]" in msg
    assert "1 unexpected: model.layers.9.self_attn.q_proj.weight" in msg


def test_untied_config_without_lm_head_is_an_error(saved_tiny, tmp_path):
    _, path = saved_tiny
    f = SafetensorsFile(str(path / "model.safetensors"))
    write_safetensors(str(tmp_path / "model.safetensors"), {k: np.array(f[k]) for k in f.keys() if k != "lm_head.weight"})
    (tmp_path / "config.json").write_text((path / "config.json").read_text())
    with pytest.raises(CheckpointMismatchError, match="missing: lm_head.weight"):
        load_pretrained(tmp_path)


def test_missing_weights_file_and_corrupt_header(tmp_path, saved_tiny):
    _, path = saved_tiny
    (tmp_path / "config.json").write_text((path / "config.json").read_text())
    with pytest.raises(FileNotFoundError, match="neither model.safetensors nor"):
        load_pretrained(tmp_path)
    (tmp_path / "model.safetensors").write_bytes((16).to_bytes(8, "little") + b"{not json at all")
    with pytest.raises(ValueError, match="not a valid safetensors file"):
        load_pretrained(tmp_path)


def test_runtime_key_layout_is_accepted(saved_tiny, tmp_path):
    """transformers>=5 in-memory names (model.language_model.*, model.visual.*) load too."""
    model, path = saved_tiny
    f = SafetensorsFile(str(path / "model.safetensors"))
    renamed = {}
    for k in f.keys():
        new = ("model.language_model." + k[6:]) if k.startswith("model.") else (
            "model." + k if k.startswith("visual.") else k)
        renamed[new] = np.array(f[k])
    write_safetensors(str(tmp_path / "model.safetensors"), renamed)
    (tmp_path / "config.json").write_text((path / "config.json").read_text())
    a, b = _params(model), _params(load_pretrained(tmp_path, dtype=jnp.float32))
    assert all(np.array_equal(a[k], b[k]) for k in a)


def test_atomic_write_leaves_no_partial_file(tmp_path):
    good = {"a": np.ones((2,), np.float32)}
    write_safetensors(str(tmp_path / "x.safetensors"), good)
    bad = {"a": np.ones((2,), np.float32), "b": np.ones((2,), np.complex64)}
    with pytest.raises(KeyError):
        write_safetensors(str(tmp_path / "x.safetensors"), bad)
    assert sorted(os.listdir(tmp_path)) == ["x.safetensors"]
    np.testing.assert_array_equal(SafetensorsFile(str(tmp_path / "x.safetensors"))["a"], good["a"])
