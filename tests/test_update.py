"""The GRPO / SFT updates and the log-prob pass: micro-batching, LM-head chunking, the sign of the update,
mixed precision (fp32 master weights, bf16 compute) and the memory bound of chunking.

The rollout batch is built exactly as the training loop builds it (`mr1jax.trainer.rollout.rollout_batch` on a tiny
model and the counting task), so the alignment of prompt, completion and log-probs is the loop's own.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from configs import grpo as grpo_config
from mr1jax.data.pipeline import make_rl_dataset
from mr1jax.data.sft import sft_batch, sft_update_batch
from mr1jax.data.tasks import TASKS
from mr1jax.data.tokenizer import load_tokenizer, model_token_ids
from mr1jax.models.qwen2_vl import Qwen2VL, Qwen2VLConfig
from mr1jax.rl.ptst import Stage
from mr1jax.rl.update import GRPOConfig, SFTConfig, grpo_update, sft_update, token_logprobs
from mr1jax.trainer.rollout import rollout_batch

PROMPTS, G, T, BUCKET, IMAGE = 4, 2, 8, 64, 56

_update = jax.jit(grpo_update, static_argnames=("graphdef", "tx", "cfg"))
_sft = jax.jit(sft_update, static_argnames=("graphdef", "tx", "cfg"))
_logps = jax.jit(token_logprobs, static_argnames=("graphdef", "cfg"))


def _model(tok, *, seed=0, dtype=jnp.float32, param_dtype=jnp.float32):
    cfg = Qwen2VLConfig.tiny(vocab_size=len(tok), hidden_size=64, num_layers=2, vision_depth=1,
                             **model_token_ids(tok))
    return Qwen2VL(cfg, rngs=nnx.Rngs(seed), dtype=dtype, param_dtype=param_dtype)


@pytest.fixture(scope="module")
def setup():
    c = grpo_config.get_config()
    tok = load_tokenizer()
    model = _model(tok)
    rows = TASKS["counting"](16, seed=0, split="train", image_size=IMAGE)
    ds = make_rl_dataset(rows, tokenizer=tok, batch_size=PROMPTS, image_size=IMAGE, prompt_buckets=(BUCKET,),
                         seed=0, question_template=c.data.question_template, pad_to_max_bucket=True)
    prompts = next(iter(ds))
    batch, _ = rollout_batch(model, tok, prompts, Stage(T, G, 1), c, jax.random.key(1))
    batch = {k: np.asarray(v) for k, v in batch.items() if k != "rewards"}
    ref = _model(tok, seed=7)
    batch["ref_logps"] = np.asarray(_logps(*nnx.split(ref), batch, cfg=gcfg()))
    batch["advantages"] = np.random.default_rng(0).normal(size=PROMPTS * G).astype(np.float32)
    return dict(c=c, tok=tok, model=model, rows=rows, batch=batch)


def gcfg(**kw) -> GRPOConfig:
    kw.setdefault("micro_batches", 1)
    return GRPOConfig(**{"num_samples": G, "prompt_len": BUCKET, "patch_segments": PROMPTS // kw["micro_batches"],
                         **kw})


def _step(model, batch, cfg, tx=None, beta=0.04):
    """(metrics, parameter change) of one update; with SGD(1) the change is minus the gradient."""
    tx = tx or optax.sgd(1.0)
    graphdef, params = nnx.split(model)
    new, _, m = _update(graphdef, params, tx.init(params), batch, jnp.float32(beta), tx=tx, cfg=cfg)
    return m, jax.tree.map(jnp.subtract, new, params)


def _assert_trees_close(a, b, rtol=1e-4, atol=1e-7):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)


def test_rollout_logprobs_match_training_forward(setup):
    """The sampler's log-probs equal the training forward's on the loop's batch (alignment of prompt, tokens
    and positions); the one-update-per-batch ratio is exactly 1, so nothing is clipped."""
    b = setup["batch"]
    graphdef, params = nnx.split(setup["model"])
    train = np.asarray(_logps(graphdef, params, b, cfg=gcfg()))
    valid = b["completion_mask"] > 0
    assert valid.sum() > PROMPTS * G                          # real completions, more than one token each
    gap = np.abs(train - b["sampler_logps"])[valid]
    assert gap.max() < 1e-4, gap.max()
    m, _ = _step(setup["model"], b, gcfg())
    assert float(m["clip_frac"]) == 0.0 and float(m["ratio_min"]) == 1.0 == float(m["ratio_max"])
    assert float(m["sampler_gap_max"]) < 1e-4
    # pi_old = the sampler's log-probs (what mu > 1 passes would recompute): still no clipping
    m, _ = _step(setup["model"], dict(b, old_logps=b["sampler_logps"]), gcfg())
    assert float(m["clip_frac"]) == 0.0 and abs(float(m["ratio_mean"]) - 1) < 1e-4


def test_positive_advantage_raises_that_completions_logprob(setup):
    b = dict(setup["batch"])
    b.pop("ref_logps")
    adv = np.zeros(PROMPTS * G, np.float32)
    adv[0], adv[1] = 1.0, -1.0                                # prompt 0: sample 0 good, sample 1 bad
    b["advantages"] = adv
    model = setup["model"]
    graphdef, params = nnx.split(model)
    before = np.asarray(_logps(graphdef, params, b, cfg=gcfg()))
    tx = optax.sgd(0.5)
    new, _, _ = _update(graphdef, params, tx.init(params), b, jnp.float32(0.0), tx=tx, cfg=gcfg())
    after = np.asarray(_logps(graphdef, new, b, cfg=gcfg()))
    mask = b["completion_mask"] > 0
    row = lambda x, r: x[r][mask[r]].sum()  # noqa: E731
    assert row(after, 0) > row(before, 0) + 1e-4
    assert row(after, 1) < row(before, 1) - 1e-4


@pytest.fixture(scope="module")
def baseline(setup):
    return _step(setup["model"], setup["batch"], gcfg())


@pytest.mark.parametrize("kw", [dict(micro_batches=2), dict(logit_chunk=3)])
def test_micro_batches_and_chunks_give_the_same_update(setup, baseline, kw):
    ref_m, ref_delta = baseline
    m, delta = _step(setup["model"], setup["batch"], gcfg(**kw))
    for k in ("loss", "policy_loss", "kl", "grad_norm"):
        np.testing.assert_allclose(float(m[k]), float(ref_m[k]), rtol=1e-5, atol=1e-7, err_msg=k)
    assert float(ref_m["grad_norm"]) > 0
    _assert_trees_close(delta, ref_delta)
    graphdef, params = nnx.split(setup["model"])
    np.testing.assert_allclose(np.asarray(_logps(graphdef, params, setup["batch"], cfg=gcfg(**kw))),
                               np.asarray(_logps(graphdef, params, setup["batch"], cfg=gcfg())), atol=1e-5)


def test_chunked_attention_gives_the_same_logprobs_and_update(setup):
    from mr1jax.models.qwen2_vl.model import set_attention_chunk

    chunked = set_attention_chunk(_model(setup["tok"]), 24)     # 72-token sequences: 3 blocks
    ref_m, ref_delta = _step(setup["model"], setup["batch"], gcfg())
    m, delta = _step(chunked, setup["batch"], gcfg())
    np.testing.assert_allclose(float(m["loss"]), float(ref_m["loss"]), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(float(m["grad_norm"]), float(ref_m["grad_norm"]), rtol=1e-5)
    _assert_trees_close(delta, ref_delta)


def _sft_inputs(setup):
    c = setup["c"]
    b = sft_batch(setup["tok"], [setup["rows"][i] for i in range(PROMPTS)], image_size=IMAGE, seq_len=BUCKET + 24,
                  question_template=c.data.question_template)
    return sft_update_batch(setup["model"].config, b)


@pytest.mark.parametrize("cfg", [SFTConfig(micro_batches=2, patch_segments=PROMPTS // 2),
                                 SFTConfig(patch_segments=PROMPTS, logit_chunk=5)])
def test_sft_micro_batches_and_chunks_give_the_same_update(setup, cfg):
    b = _sft_inputs(setup)
    graphdef, params = nnx.split(setup["model"])
    tx = optax.sgd(1.0)
    base, _, m0 = _sft(graphdef, params, tx.init(params), b, tx=tx, cfg=SFTConfig(patch_segments=PROMPTS))
    new, _, m = _sft(graphdef, params, tx.init(params), b, tx=tx, cfg=cfg)
    np.testing.assert_allclose(float(m["loss"]), float(m0["loss"]), rtol=1e-5)
    assert float(m0["loss"]) > 1.0 and float(m0["tokens"]) == b["loss_mask"][:, 1:].sum()
    _assert_trees_close(new, base, rtol=1e-4, atol=1e-6)

@pytest.mark.slow  # 40-50 s on 2 cores: the default set stays under CI's 15 minutes
def test_bf16_compute_with_fp32_master_weights_trains_at_lr_1e6(setup):
    """lr 1e-6 AdamW for 10 steps: with fp32 master weights every element with a non-negligible gradient
    moves (bf16 storage would freeze almost all of them); the bf16 loss tracks the fp32 loss."""
    tok, b = setup["tok"], setup["batch"]
    model = _model(tok, dtype=jnp.bfloat16, param_dtype=jnp.float32)
    graphdef, params = nnx.split(model)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))
    _, grad = _step(model, b, gcfg())                                         # SGD(1): -gradient
    tx = optax.adamw(1e-6, weight_decay=0.0)
    p, opt = params, tx.init(params)
    for _ in range(10):
        p, opt, m = _update(graphdef, p, opt, b, jnp.float32(0.04), tx=tx, cfg=gcfg())
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(p))
    stuck = total = 0
    for g, old, new in zip(jax.tree.leaves(grad), jax.tree.leaves(params), jax.tree.leaves(p)):
        g, old, new = np.asarray(g), np.asarray(old), np.asarray(new)
        live = np.abs(g) > 1e-7
        total += live.sum()
        stuck += (live & (new == old)).sum()
    assert total > 1000 and stuck == 0, (stuck, total)
    # the same update in bf16 storage moves (almost) nothing: the test above would catch bf16 masters
    p16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
    opt16 = tx.init(p16)
    q16, _, _ = _update(graphdef, p16, opt16, b, jnp.float32(0.04), tx=tx, cfg=gcfg())
    moved = sum(int((np.asarray(a) != np.asarray(c)).sum()) for a, c in zip(jax.tree.leaves(p16), jax.tree.leaves(q16)))
    assert moved < 0.2 * total
    # bf16 compute vs fp32 compute on the same fp32 weights
    m32, _ = _step(_model(tok), b, gcfg())
    m16, _ = _step(model, b, gcfg())
    assert abs(float(m16["loss"]) - float(m32["loss"])) < 0.02 * max(1.0, abs(float(m32["loss"])))
    assert abs(float(m16["kl"]) - float(m32["kl"])) < 0.05 * float(m32["kl"]) + 1e-3


def _temp_bytes(t: int, chunk: int, vocab: int = 151_936, attention_chunk: int = 512) -> tuple[int, int]:
    """Peak temp memory of the compiled GRPO update (1 prompt x G=2, prompt 16 + t tokens, no image)."""
    from mr1jax.models.qwen2_vl.model import set_attention_chunk

    cfg = Qwen2VLConfig.tiny(vocab_size=vocab, hidden_size=16, num_layers=1, vision_depth=1)
    model = set_attention_chunk(nnx.eval_shape(lambda: Qwen2VL(cfg, rngs=nnx.Rngs(0))), attention_chunk)
    graphdef, params = nnx.split(model)
    tx = optax.sgd(1.0)
    rows, seq, s = 2, 16 + t, jax.ShapeDtypeStruct
    batch = dict(input_ids=s((rows, seq), jnp.int32), attention_mask=s((rows, seq), jnp.int32),
                 position_ids=s((3, rows, seq), jnp.int32), completion_mask=s((rows, t), jnp.int32),
                 advantages=s((rows,), jnp.float32), ref_logps=s((rows, t), jnp.float32))
    lowered = _update.lower(graphdef, params, jax.eval_shape(tx.init, params), batch, s((), jnp.float32), tx=tx,
                            cfg=GRPOConfig(num_samples=2, prompt_len=16, logit_chunk=chunk))
    return lowered.compile().memory_analysis().temp_size_in_bytes, rows * t * vocab * 4


def test_chunked_logprobs_and_attention_memory_grow_with_t_not_t_times_vocab_or_t_squared():
    t2k, logits2k = _temp_bytes(2048, 256)
    t4k, logits4k = _temp_bytes(4096, 256)
    assert t4k > t2k                                                  # grows with T ...
    assert t4k - t2k < 0.25 * (logits4k - logits2k), (t2k, t4k)        # ... but not by T x vocab
    assert t4k < 0.5 * logits4k
    unchunked, _ = _temp_bytes(2048, 0)
    assert unchunked > logits2k                                       # what chunking avoids
    full_attention, _ = _temp_bytes(4096, 256, vocab=512, attention_chunk=0)
    chunked_attention, _ = _temp_bytes(4096, 256, vocab=512)
    scores = 2 * 1 * (4096 + 16) ** 2 * 4                             # [rows, heads, S, S] fp32
    # unchunked: scores, probabilities and their gradients; chunked: one 512-query block of them (what is left
    # is the [rows, 1, S, S] boolean mask)
    assert full_attention > 3 * scores and chunked_attention < 0.35 * full_attention, (full_attention,
                                                                                         chunked_attention)
