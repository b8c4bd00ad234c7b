"""Native resolution: images keep their aspect ratio and get their own patch grids (Qwen's min / max pixels),
batches pad each prompt's patches to a patch bucket, and every path (data, model, sampler, update, training
loop) takes these batches."""

from __future__ import annotations

import io
import json

import jax
import jax.numpy as jnp
import numpy as np
import PIL.Image
import pytest
from flax import nnx
from transformers import Qwen2VLImageProcessorPil

from configs import grpo as grpo_config
from mr1jax.data.pipeline import make_rl_dataset
from mr1jax.data.rows import DataError
from mr1jax.data.tasks import TASKS
from mr1jax.data.tasks.sizes import mixed_sizes
from mr1jax.data.tokenizer import load_tokenizer, model_token_ids
from mr1jax.data.sizing import ImageSizing, PatchBuckets, image_hw, pad_pixel_values
from mr1jax.models import Qwen25VL, Qwen25VLConfig, Qwen2VL, Qwen2VLConfig, prepare_inputs
from mr1jax.models.qwen2_vl.model import ImageTokenMismatchError, images_per_row
from mr1jax.rl.ptst import Stage
from mr1jax.rl.update import GRPOConfig, token_logprobs
from mr1jax.testing.hf_reference import make_batch
from mr1jax.trainer.rollout import rollout_batch

MIN_PX, MAX_PX = 28 * 28 * 2, 28 * 28 * 24          # small limits: tiny grids, a fast processor reference
# (height, width): wide, tall, tiny (scaled up to min_pixels), large (scaled down to max_pixels), odd sizes
SIZES = [(90, 300), (400, 120), (20, 33), (700, 650), (151, 149), (333, 77)]


def _image(h: int, w: int, seed: int) -> PIL.Image.Image:
    return PIL.Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer()


def test_batches_equal_the_transformers_processor_image_by_image(tokenizer):
    """A native-resolution batch of six sizes / aspect ratios: every image's pixel values and grid equal
    Qwen2VLImageProcessorPil's for the same min / max pixels, each prompt holds exactly the processor's token
    count per image, and the padding after each prompt's patches is zeros."""
    images = [_image(h, w, i) for i, (h, w) in enumerate(SIZES)]
    rows = [{"image": im, "question": "How many?", "answer": "1"} for im in images]
    ds = make_rl_dataset(rows, tokenizer=tokenizer, batch_size=len(rows), image_size=0, prompt_buckets=(256,),
                         seed=0, shuffle=False, num_epochs=1, min_pixels=MIN_PX, max_pixels=MAX_PX)
    batch = next(iter(ds))
    ref = Qwen2VLImageProcessorPil(min_pixels=MIN_PX, max_pixels=MAX_PX)(images)
    ref_pv, ref_grid = np.asarray(ref["pixel_values"]), np.asarray(ref["image_grid_thw"])
    np.testing.assert_array_equal(batch.image_grid_thw, ref_grid)
    assert len({tuple(g) for g in ref_grid.tolist()}) == len(SIZES)           # six different grids
    p = batch.patches_per_prompt
    assert p == PatchBuckets.for_limits(MAX_PX, 1)(int(ref_grid.prod(-1).max()))
    np.testing.assert_array_equal(batch.pixel_values, pad_pixel_values(ref_pv, ref_grid, [1] * len(SIZES), p))
    starts = np.cumsum([0, *ref_grid.prod(-1)])
    for b, n in enumerate(ref_grid.prod(-1)):
        np.testing.assert_array_equal(batch.pixel_values[b * p:b * p + n], ref_pv[starts[b]:starts[b + 1]])
        assert not batch.pixel_values[b * p + n:(b + 1) * p].any()
    image_pad = tokenizer.convert_tokens_to_ids("<|image_pad|>")
    np.testing.assert_array_equal((batch.input_ids == image_pad).sum(1), ref_grid.prod(-1) // 4)


def test_header_sizes_match_decoded_sizes(tmp_path):
    """Token counts are planned from image headers; EXIF rotations that swap the sides count as the loader sees
    them."""
    img = _image(40, 100, 0)
    exif = img.getexif()
    exif[0x0112] = 6                                          # rotate 90: the loaded image is 100 x 40
    buf = io.BytesIO()
    img.save(buf, format="JPEG", exif=exif)
    assert image_hw(buf.getvalue()) == (100, 40)
    path = tmp_path / "a.png"
    _image(33, 71, 1).save(path)
    assert image_hw(str(path)) == (33, 71)


def test_bad_inputs_are_named(tokenizer, tmp_path):
    rows = [{"image": _image(60, 60, 0), "question": "q", "answer": "1", "file": "rows.jsonl", "row": 1},
            {"image": b"not an image", "question": "q", "answer": "1", "file": "rows.jsonl", "row": 2}]
    kw = dict(tokenizer=tokenizer, batch_size=1, image_size=0, seed=0, min_pixels=MIN_PX, max_pixels=MAX_PX)
    with pytest.raises(DataError, match=r"rows.jsonl line 2: field 'image': cannot read the image size"):
        make_rl_dataset(rows, prompt_buckets=(256,), **kw)
    big = [{"image": _image(700, 700, 0), "question": "q", "answer": "1", "file": "rows.jsonl", "row": 5}]
    with pytest.raises(DataError, match=r"rows.jsonl line 5: field 'question': prompt has \d+ tokens \(with its "
                                        r"image tokens\), more than the largest prompt bucket 30"):
        make_rl_dataset(big, prompt_buckets=(30,), **kw)
    with pytest.raises(ValueError, match="largest patch bucket 16 is smaller than"):
        ImageSizing(0, MIN_PX, MAX_PX, buckets=(16,))
    # a custom caller's mismatch names the row and both counts
    cfg = Qwen2VLConfig.tiny(vocab_size=512, hidden_size=32, num_layers=1, vision_depth=1)
    ids, mask, _, grid = make_batch(cfg, [{"text": 4, "images": [(1, 4, 4)]}, {"text": 4, "images": [(1, 8, 4)]}])
    swapped = grid[::-1]                                       # the right total, in the wrong rows
    with pytest.raises(ImageTokenMismatchError, match=r"in row 0: it holds 4 <\|image_pad\|> tokens but its "
                                                      r"image\(s\) give 8 features"):
        prepare_inputs(cfg, ids, mask, swapped, patches_per_row=32)


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
def test_padded_mixed_size_batch_gives_each_row_its_own_logits(family):
    """Rows with images of different sizes (and a row without one), padded per prompt: each row's logits equal
    that row run alone, for both families (no attention across images, rows or into padding patches)."""
    cls, cfg_cls = (Qwen2VL, Qwen2VLConfig) if family == "qwen2_vl" else (Qwen25VL, Qwen25VLConfig)
    cfg = cfg_cls.tiny(vocab_size=512, hidden_size=64, num_layers=2, vision_depth=2)
    model = cls(cfg, rngs=nnx.Rngs(0))
    spec = [{"text": 5, "images": [(1, 10, 6)]}, {"text": 7, "images": [(1, 4, 4), (1, 12, 8)]},
            {"text": 9, "images": []}]
    ids, mask, pv, grid = make_batch(cfg, spec, seed=1)
    p = 128
    counts = images_per_row(cfg, ids, grid)
    extra = prepare_inputs(cfg, ids, mask, grid, patches_per_row=p)
    padded = pad_pixel_values(np.asarray(pv), grid, counts, p)
    out = np.asarray(jax.jit(lambda *a: model.forward(*a, patch_block=p))(
        ids, mask, extra.position_ids, padded, extra.patch_pos, jnp.asarray(extra.patch_segments)))
    starts = np.cumsum([0, *counts])
    patch_starts = np.cumsum([0, *grid.prod(-1)])
    for b in range(len(spec)):
        g = grid[starts[b]:starts[b + 1]]
        alone = model(ids[b:b + 1], mask[b:b + 1], pv[patch_starts[starts[b]]:patch_starts[starts[b + 1]]]
                      if len(g) else None, g if len(g) else None)
        valid = mask[b].astype(bool)
        np.testing.assert_allclose(out[b][valid], np.asarray(alone)[0][valid], atol=2e-5, rtol=1e-5)
    # control: the padding's segment matters (with one segment for the whole block the rows change)
    wrong = np.asarray(jax.jit(lambda *a: model.forward(*a, patch_block=p))(
        ids, mask, extra.position_ids, padded, extra.patch_pos, jnp.zeros_like(jnp.asarray(extra.patch_segments))))
    assert np.abs(wrong - out)[mask.astype(bool)].max() > 1e-3


@pytest.fixture(scope="module")
def mixed_batch(tokenizer):
    """A native-resolution prompt batch of the tiny Qwen2.5-VL on counting scenes of varied sizes."""
    cfg = Qwen25VLConfig.tiny(vocab_size=len(tokenizer), hidden_size=64, num_layers=1, vision_depth=2,
                              **model_token_ids(tokenizer))
    model = Qwen25VL(cfg, rngs=nnx.Rngs(0))
    rows = mixed_sizes(TASKS["counting"](8, seed=0, split="train", image_size=56), seed=0)
    ds = make_rl_dataset(rows, tokenizer=tokenizer, batch_size=4, image_size=0, prompt_buckets=(128,), seed=0,
                         pad_to_max_bucket=True, min_pixels=28 * 28, max_pixels=112 * 112)
    return model, next(iter(ds))


def test_sampler_logprobs_equal_the_trainers_on_mixed_sizes(tokenizer, mixed_batch):
    model, prompts = mixed_batch
    assert len({tuple(g) for g in prompts.image_grid_thw.tolist()}) > 1          # really mixed
    c = grpo_config.get_config()
    batch, _ = rollout_batch(model, tokenizer, prompts, Stage(6, 2, 1), c, jax.random.key(1))
    assert batch["pixel_values"].shape[0] == 4 * prompts.patches_per_prompt and "patch_segments" in batch
    batch = {k: jnp.asarray(v) for k, v in batch.items()}
    gcfg = GRPOConfig(num_samples=2, prompt_len=128, patch_segments=None, micro_batches=2)
    graphdef, params = nnx.split(model)
    lp = jax.jit(token_logprobs, static_argnames=("graphdef", "cfg"))(graphdef, params, batch, cfg=gcfg)
    mask = np.asarray(batch["completion_mask"]).astype(bool)
    assert mask.sum() >= 8
    assert np.abs(np.asarray(lp) - np.asarray(batch["sampler_logps"]))[mask].max() < 1e-4


@pytest.mark.slow  # ~40 s
def test_grpo_and_sft_run_compiles_once_per_bucket(tmp_path, graded_reward):
    """A short SFT + GRPO run on varied image sizes: every step function compiles exactly once per patch bucket
    its batches used (the buckets are logged per step), and the RL steps move the policy."""
    from mr1jax.trainer.loop import train_and_evaluate
    from tests.test_train import tiny_config

    c = tiny_config(**{"mode": "sft_then_grpo", "sft.steps": 3, "total_steps": 3, "data.image_size": 0,
                       "data.mixed_sizes": True, "data.scene_size": 56, "data.min_pixels": 28 * 28,
                       "data.max_pixels": 112 * 112, "data.prompt_bucket": 96, "data.batch_size": 4,
                       "rollout.num_samples": 2, "checkpoint.every_steps": 100})
    out = train_and_evaluate(c, str(tmp_path))
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    sft = {r["patch_bucket"] for r in rows if "sft_loss" in r}
    rl = {r["patch_bucket"] for r in rows if "loss" in r}
    assert all(0 <= r["patch_padding"] < 1 for r in rows if "patch_bucket" in r)
    counts = out["compile_counts"]
    assert counts["sft"] == len(sft) and counts["grpo"] == len(rl) and counts["ref"] == len(rl), (counts, sft, rl)
    assert len(sft | rl) > 1                                   # the run really used several buckets
    assert any(abs(r["kl"]) > 0 for r in rows if "kl" in r)


def test_plan_sizes_native_resolution_for_the_largest_bucket():
    """The plan's shapes under native resolution: one block of the largest patch bucket per prompt."""
    from configs import othink_counting
    from mr1jax.planning.programs import resolve_model_config, stage_shapes
    from mr1jax.trainer.config import image_sizing, validate_config

    c = othink_counting.get_config()
    stages = validate_config(c)
    cfg, _, _ = resolve_model_config(c, "qwen2_vl_2b_instruct")
    s = stage_shapes(c, cfg, stages[0])
    top = image_sizing(c).patch_buckets().sizes[-1]
    assert s.native and s.patches == top == 401408 // 28**2 * 4 and s.image_tokens == top // 4 == 512
    assert c.data.prompt_bucket >= s.image_tokens                 # a full-size image fits the prompt bucket
