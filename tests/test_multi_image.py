"""Several images per prompt (EasyR1's `images` list) through the data path, the sampler and the GRPO / SFT
steps, on the tiny Qwen2.5-VL (112 px images = 8 x 8 patches: four 4 x 4-patch windows each); prompts too
long for their bucket give a DataError naming the row, its token count and the bucket."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from configs import grpo as grpo_config
from mr1jax.data.pipeline import make_rl_dataset
from mr1jax.data.rows import DataError
from mr1jax.data.sft import sft_batch, sft_update_batch
from mr1jax.data.tasks import TASKS
from mr1jax.data.tokenizer import load_tokenizer, model_token_ids
from mr1jax.models import Qwen25VL, Qwen25VLConfig, prepare_inputs
from mr1jax.rl.ptst import Stage
from mr1jax.rl.update import GRPOConfig, SFTConfig, grpo_update, sft_update, token_logprobs
from mr1jax.trainer.rollout import rollout_batch

PROMPTS, K, G, T, BUCKET, IMAGE = 2, 2, 2, 6, 96, 112


def two_image_rows(n: int) -> list[dict]:
    """Pairs of counting scenes: "how many objects in the two images together?"."""
    scenes = TASKS["counting"](2 * n, seed=0, split="train", image_size=IMAGE)
    return [{"images": [scenes[2 * i]["image"], scenes[2 * i + 1]["image"]], "question": "Count all objects.",
             "answer": str(int(scenes[2 * i]["answer"]) + int(scenes[2 * i + 1]["answer"])), "id": str(i)}
            for i in range(n)]


@pytest.fixture(scope="module")
def setup():
    tok = load_tokenizer()
    cfg = Qwen25VLConfig.tiny(vocab_size=len(tok), hidden_size=64, num_layers=1, vision_depth=2,
                              **model_token_ids(tok))
    model = Qwen25VL(cfg, rngs=nnx.Rngs(0))
    ds = make_rl_dataset(two_image_rows(4), tokenizer=tok, batch_size=PROMPTS, image_size=IMAGE,
                         prompt_buckets=(BUCKET,), seed=0, pad_to_max_bucket=True, images_per_prompt=K)
    return tok, model, next(iter(ds))


def test_batch_holds_every_image_in_order(setup):
    tok, model, prompts = setup
    cfg = model.config
    per_image = (IMAGE // 14) ** 2
    assert prompts.pixel_values.shape == (PROMPTS * K * per_image, 1176)
    assert prompts.image_grid_thw.tolist() == [[1, 8, 8]] * (PROMPTS * K)
    ids = prompts.input_ids
    assert ((ids == cfg.image_token_id).sum(1) == K * per_image // 4).all()
    assert ((ids == cfg.vision_start_token_id).sum(1) == K).all()
    prepare_inputs(cfg, ids, prompts.attention_mask, prompts.image_grid_thw)   # features match tokens


@pytest.fixture(scope="module")
def scored(setup):
    """A sampled two-image batch and the trainer's teacher-forced log-probs of its completions."""
    tok, model, prompts = setup
    c = grpo_config.get_config()
    batch, _ = rollout_batch(model, tok, prompts, Stage(T, G, 1), c, jax.random.key(1))
    batch = {k: jnp.asarray(v) for k, v in batch.items()}
    gcfg = GRPOConfig(num_samples=G, prompt_len=BUCKET, patch_segments=PROMPTS * K)
    graphdef, params = nnx.split(model)
    lp = jax.jit(token_logprobs, static_argnames=("graphdef", "cfg"))(graphdef, params, batch, cfg=gcfg)
    return batch, gcfg, lp


def test_two_image_sampler_logprobs_equal_the_trainers(scored):
    """Sampler log-probs (vision tower once per prompt, cached decode) equal the trainer's teacher-forced ones
    on prompts with two images each: the images, their tokens and the completions line up in both paths."""
    batch, _, lp = scored
    assert batch["pixel_values"].shape[0] == PROMPTS * K * (IMAGE // 14) ** 2        # not repeated per sample
    mask = np.asarray(batch["completion_mask"]).astype(bool)
    assert mask.sum() >= PROMPTS * G                                                  # something was sampled
    assert np.abs(np.asarray(lp) - np.asarray(batch["sampler_logps"]))[mask].max() < 1e-4


@pytest.mark.slow
def test_two_image_grpo_step(setup, scored):
    """One GRPO update on the two-image batch reaches the windowed vision tower."""
    _, model, _ = setup
    batch, gcfg, lp = scored
    batch = dict(batch)
    graphdef, params = nnx.split(model)
    batch["ref_logps"] = lp
    batch["advantages"] = jnp.asarray([1.0, -1.0] * PROMPTS, jnp.float32)
    tx = optax.sgd(1e-2)
    new, _, m = jax.jit(grpo_update, static_argnames=("graphdef", "tx", "cfg"))(
        graphdef, params, tx.init(params), batch, jnp.float32(0.04), tx=tx, cfg=gcfg)
    assert np.isfinite(float(m["loss"])) and float(m["grad_norm"]) > 0
    moved = jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), new, params)
    assert max(jax.tree.leaves(moved["visual"])) > 0          # the gradient reaches the windowed vision tower


def test_two_image_sft_step(setup):
    tok, model, _ = setup
    rows = two_image_rows(PROMPTS)
    b = sft_batch(tok, rows, image_size=IMAGE, seq_len=BUCKET + 24, images_per_prompt=K)
    assert b["image_grid_thw"].shape == (PROMPTS * K, 3)
    batch = sft_update_batch(model.config, b)
    graphdef, params = nnx.split(model)
    tx = optax.sgd(1e-2)
    _, _, m = jax.jit(sft_update, static_argnames=("graphdef", "tx", "cfg"))(
        graphdef, params, tx.init(params), batch, tx=tx, cfg=SFTConfig(patch_segments=PROMPTS * K))
    # reference: the model's full logits (its own host-side inputs from the grids), next-token NLL on the
    # response tokens only, mean over them; equal only if the loss mask, the shift and both images line up
    logits = np.asarray(model(jnp.asarray(b["input_ids"]), jnp.asarray(b["attention_mask"]),
                              jnp.asarray(b["pixel_values"]), b["image_grid_thw"]), np.float64)
    logp = logits[:, :-1] - np.log(np.exp(logits[:, :-1] - logits[:, :-1].max(-1, keepdims=True)).sum(
        -1, keepdims=True)) - logits[:, :-1].max(-1, keepdims=True)
    target = np.take_along_axis(logp, b["input_ids"][:, 1:, None], -1)[..., 0]
    resp = b["loss_mask"][:, 1:].astype(bool)
    assert 0 < resp.sum() < b["attention_mask"].sum()                 # the response, not the whole sequence
    np.testing.assert_allclose(float(m["loss"]), -target[resp].mean(), rtol=1e-4)
    assert np.isfinite(float(m["grad_norm"])) and float(m["grad_norm"]) > 0
    with pytest.raises(DataError, match=r"row has 2 image\(s\); every SFT example must carry images_per_prompt = 1"):
        sft_batch(tok, rows, image_size=IMAGE, seq_len=BUCKET + 24)


def test_wrong_image_count_and_too_long_prompts_are_named(setup):
    tok = setup[0]
    rows = two_image_rows(3)
    rows[1] = {**rows[1], "images": rows[1]["images"][:1], "row": 2, "file": "pairs.jsonl"}
    kw = dict(tokenizer=tok, batch_size=1, image_size=IMAGE, seed=0, images_per_prompt=K)
    with pytest.raises(DataError, match=r"pairs.jsonl line 2: field 'image': row has 1 image\(s\); every prompt "
                                        r"of a batch must carry images_per_prompt = 2"):
        make_rl_dataset(rows, prompt_buckets=(BUCKET,), **kw)
    # 2 x 16 image tokens + the template: longer than a 48-token bucket. Never cut, never a model-side mismatch.
    with pytest.raises(DataError, match=r"row 1: field 'question': prompt has \d+ tokens \(with its image tokens\), "
                                        r"more than the largest prompt bucket 48"):
        make_rl_dataset(two_image_rows(2), prompt_buckets=(48,), **kw)
    # A larger bucket takes the long row; skip_bad_rows drops (and counts) what fits nowhere.
    ds = make_rl_dataset(two_image_rows(2), prompt_buckets=(48, BUCKET), **kw)
    assert next(iter(ds)).input_ids.shape == (1, BUCKET)
    from mr1jax.data.pipeline import prepare_source

    kept, _, skipped = prepare_source(rows, tokenizer=tok, image_size=IMAGE, prompt_buckets=(BUCKET,),
                                      skip_bad_rows=True, images_per_prompt=K)
    assert len(kept) == 2 and len(skipped) == 1 and "1 image(s)" in str(skipped[0])
