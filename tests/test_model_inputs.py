"""Clear errors for inputs the model cannot use, checked before anything compiles."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mr1jax.models.qwen2_vl import ImageTokenMismatchError, Qwen2VL, prepare_inputs
from mr1jax.testing.hf_reference import make_batch
from tests.conftest import tiny_config


@pytest.fixture(scope="module")
def tiny():
    cfg = tiny_config()
    return cfg, Qwen2VL(cfg, rngs=nnx.Rngs(0))


def test_image_token_count_mismatch_names_both_numbers(tiny):
    cfg, model = tiny
    ids, mask, pv, grid = make_batch(cfg, [{"text": 5, "images": [(1, 4, 4)]}])
    bigger = np.array([[1, 4, 8]])  # 8 features for 4 pad tokens
    with pytest.raises(ImageTokenMismatchError, match=r"hold 4 <\|image_pad\|> tokens .* give 8 features"):
        model(ids, mask, np.zeros((32, cfg.vision.patch_dim), np.float32), bigger)
    with pytest.raises(ImageTokenMismatchError, match="hold 4 .* 0 image"):
        prepare_inputs(cfg, ids, mask, None)


def test_pixel_values_shape_must_match_grid(tiny):
    cfg, model = tiny
    ids, mask, pv, grid = make_batch(cfg, [{"text": 5, "images": [(1, 4, 4)]}])
    with pytest.raises(ValueError, match=r"pixel_values has shape \(15, 1176\); image_grid_thw needs \(16, 1176\)"):
        model(ids, mask, pv[:15], grid)
    with pytest.raises(ValueError, match="must be given together"):
        model(ids, mask, pv, None)


def test_host_call_under_jit_points_to_forward(tiny):
    cfg, model = tiny
    ids, mask, _, _ = make_batch(cfg, [{"text": 5}])
    with pytest.raises(TypeError, match="model.forward"):
        jax.jit(lambda i: model(i, mask))(jnp.asarray(ids))


def test_batch_must_be_2d(tiny):
    cfg, _ = tiny
    with pytest.raises(ValueError, match=r"input_ids must be \[batch, length\], got shape \(5,\)"):
        prepare_inputs(cfg, np.arange(5), None, None)


def test_padded_rows_give_finite_logits(tiny):
    cfg, model = tiny
    ids, mask, pv, grid = make_batch(cfg, [{"text": 12, "images": [(1, 4, 4)]}, {"text": 2}])
    assert np.isfinite(np.asarray(model(ids, mask, pv, grid))).all()
