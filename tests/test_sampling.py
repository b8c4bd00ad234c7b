"""The grouped-rollout sampler: parity with transformers' generate, logprob convention, sampling filters,
rng behaviour, stop tokens, bucket errors and no recompilation."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mr1jax.models.qwen2_vl.hf import load_pretrained
from mr1jax.generate.sampler import compile_count, filter_logits, generate, kv_cache_bytes_per_token, sample_tokens
from mr1jax.testing.hf_reference import hf_greedy, make_batch

ROWS = [{"text": 10, "images": [(1, 4, 4)]}, {"text": 5, "images": [(1, 6, 4)]}, {"text": 7}]


@pytest.fixture(scope="module")
def setup(hf_tiny_untied):
    cfg, hf, path = hf_tiny_untied
    model = load_pretrained(path, dtype=jnp.float32)
    return cfg, hf, model, make_batch(cfg, ROWS, seed=2)


def test_greedy_equals_transformers_generate(setup):
    cfg, hf, model, (ids, mask, pv, grid) = setup
    eos = cfg.eos_token_ids[0]
    ours = generate(model, ids, mask, pv, grid, max_new_tokens=24, temperature=0.0, eos_token_ids=[eos])
    ref = hf_greedy(hf, cfg, ids, mask, pv, grid, 24, eos)
    tokens = np.asarray(ours.tokens)
    assert ref.shape[1] >= 1
    np.testing.assert_array_equal(tokens[:, :ref.shape[1]], ref)
    assert (tokens[:, ref.shape[1]:] == cfg.pad_token_id).all()


def _teacher_forced_logprobs(model, cfg, ids, mask, pv, grid, rollouts, g):
    """log p(token) from one full forward over prompt + completion (prompt repeated G times)."""
    n_patches = grid.prod(-1)
    per_row = [len(r.get("images", [])) for r in ROWS]
    starts = np.concatenate([[0], np.cumsum(per_row)])
    patch_starts = np.concatenate([[0], np.cumsum(n_patches)])
    pv_rows, grid_rows = [], []
    for r in range(len(ROWS)):
        for _ in range(g):
            for i in range(starts[r], starts[r + 1]):
                pv_rows.append(pv[patch_starts[i]:patch_starts[i + 1]])
                grid_rows.append(grid[i])
    full_ids = np.concatenate([np.repeat(ids, g, 0), np.asarray(rollouts.tokens)], 1)
    full_mask = np.concatenate([np.repeat(mask, g, 0), np.asarray(rollouts.mask)], 1)
    logits = np.asarray(model(full_ids, full_mask, np.concatenate(pv_rows), np.stack(grid_rows)))
    logp = jax.nn.log_softmax(jnp.asarray(logits[:, ids.shape[1] - 1:-1]), -1)
    return np.take_along_axis(np.asarray(logp), np.asarray(rollouts.tokens)[..., None], -1)[..., 0]


def test_logprobs_equal_teacher_forced_forward(setup):
    cfg, _, model, (ids, mask, pv, grid) = setup
    g = 3
    r = generate(model, ids, mask, pv, grid, num_samples=g, max_new_tokens=12, temperature=1.3, top_k=40,
                 top_p=0.9, rng=jax.random.key(7))
    ref = _teacher_forced_logprobs(model, cfg, ids, mask, pv, grid, r, g)
    m = np.asarray(r.mask).astype(bool)
    diff = np.abs(np.asarray(r.logprobs) - ref)[m].max()
    print(f"logprob max abs diff vs teacher forcing: {diff:.2e}")
    assert m.sum() > 20 and diff <= 1e-4
    assert (np.asarray(r.logprobs)[~m] == 0).all()


@pytest.mark.parametrize("top_k, top_p, temperature", [(3, 1.0, 1.0), (0, 0.7, 1.0), (4, 0.8, 0.5), (0, 1.0, 2.0)])
def test_filters_match_truncated_distribution(top_k, top_p, temperature):
    logits = jnp.log(jnp.array([0.05, 0.30, 0.10, 0.25, 0.02, 0.20, 0.08]))
    probs = np.asarray(jax.nn.softmax(logits / temperature))
    order = np.argsort(-probs)
    keep = np.zeros_like(probs, bool)
    k = top_k or len(probs)
    mass = 0.0
    for rank, tok in enumerate(order[:k]):
        if mass < top_p or rank == 0:
            keep[tok] = True
        mass += probs[tok]
    expected = np.where(keep, probs, 0) / probs[keep].sum()
    n = 40_000
    draws = np.asarray(sample_tokens(jnp.broadcast_to(logits, (n, len(probs))), jax.random.key(0),
                                     jnp.float32(temperature), jnp.int32(top_k), jnp.float32(top_p)))
    freq = np.bincount(draws, minlength=len(probs)) / n
    # 5 standard errors per token: a false alarm has probability < 1e-5 per check.
    tol = 5 * np.sqrt(expected * (1 - expected) / n) + 1e-9
    assert (freq[~keep] == 0).all(), "a token outside the kept set was drawn"
    assert (np.abs(freq - expected) <= tol).all(), (freq, expected)
    kept = np.isfinite(np.asarray(filter_logits(logits[None], jnp.float32(temperature), jnp.int32(top_k),
                                                jnp.float32(top_p)))[0])
    np.testing.assert_array_equal(kept, keep)


def test_rng_controls_samples(setup):
    cfg, _, model, (ids, mask, pv, grid) = setup
    kw = dict(num_samples=4, max_new_tokens=10, temperature=1.0, eos_token_ids=[cfg.eos_token_ids[0]])
    a = np.asarray(generate(model, ids, mask, pv, grid, rng=jax.random.key(1), **kw).tokens)
    b = np.asarray(generate(model, ids, mask, pv, grid, rng=jax.random.key(1), **kw).tokens)
    c = np.asarray(generate(model, ids, mask, pv, grid, rng=jax.random.key(2), **kw).tokens)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    for p in range(len(ROWS)):  # the G rows of one prompt differ
        group = a[4 * p:4 * p + 4]
        assert len({tuple(row) for row in group}) > 1


def test_stop_tokens_end_rows_and_mask_after(setup):
    cfg, _, model, (ids, mask, pv, grid) = setup
    free = np.asarray(generate(model, ids, mask, pv, grid, max_new_tokens=16, temperature=0.0,
                               eos_token_ids=[cfg.eos_token_ids[0]]).tokens)
    stop = int(free[0, 5])                     # make row 0's 6th greedy token a stop token
    first = int(np.argmax(free[0] == stop))
    r = generate(model, ids, mask, pv, grid, max_new_tokens=16, temperature=0.0, eos_token_ids=[stop])
    tokens, m = np.asarray(r.tokens), np.asarray(r.mask)
    assert m[0].sum() == first + 1 and tokens[0, first] == stop
    assert (tokens[0, first + 1:] == cfg.pad_token_id).all() and (m[0, first + 1:] == 0).all()
    assert not bool(r.truncated[0])
    for row in range(1, len(ROWS)):            # rows that never stop are marked truncated, fully masked in
        if stop not in tokens[row]:
            assert bool(r.truncated[row]) and m[row].sum() == 16
    np.testing.assert_array_equal(np.asarray(r.lengths), m.sum(-1))


def test_no_recompilation_when_sampling_params_or_prompts_change(setup):
    cfg, _, model, (ids, mask, pv, grid) = setup
    kw = dict(num_samples=2, max_new_tokens=8)
    generate(model, ids, mask, pv, grid, temperature=1.0, rng=jax.random.key(0), **kw)
    warm = compile_count()
    ids2 = ids.copy()
    ids2[mask.astype(bool) & (ids < 100)] += 1  # new prompt contents, same layout
    generate(model, ids2, mask, pv * 0.5, grid, temperature=0.3, top_p=0.5, top_k=7, rng=jax.random.key(9), **kw)
    generate(model, ids, mask, pv, grid, temperature=0.0, top_p=1.0, top_k=0, rng=jax.random.key(3), **kw)
    assert compile_count() == warm


def test_prompt_longer_than_bucket(setup):
    cfg, _, model, (ids, mask, pv, grid) = setup
    longest = int(mask.sum(-1).max())
    assert longest == 16
    with pytest.raises(ValueError, match="prompt 0 has 16 tokens, longer than the largest prompt bucket 12"):
        generate(model, ids, mask, pv, grid, prompt_buckets=(8, 12))
    with pytest.raises(ValueError, match=r"prompt 0 has 16 tokens.*would remove \d+ image token"):
        generate(model, ids, mask, pv, grid, prompt_buckets=(8,), truncate=True)
    text_ids, text_mask, _, _ = make_batch(cfg, [{"text": 30}, {"text": 8}], seed=4)
    r = generate(model, text_ids, text_mask, max_new_tokens=4, temperature=0.0, prompt_buckets=(16, 24),
                 truncate=True)
    assert r.tokens.shape == (2, 4)


def test_kv_cache_formula_for_2b():
    from mr1jax.models.qwen2_vl import Qwen2VLConfig

    per_token = kv_cache_bytes_per_token(Qwen2VLConfig.qwen2_vl_2b_instruct(), jnp.bfloat16)
    assert per_token == 28 * 1024                                  # 1 KiB per token per layer
    assert 8 * 2048 * per_token == 448 * 1024**2                   # G=8, 1024 prompt + 1024 new tokens


def test_sampler_reads_live_parameters(hf_tiny_untied):
    """Updating the model in place changes the next rollout (no stale copy of the weights)."""
    from flax import nnx

    cfg, _, path = hf_tiny_untied
    model = load_pretrained(path, dtype=jnp.float32)
    ids, mask, pv, grid = make_batch(cfg, ROWS, seed=2)
    kw = dict(max_new_tokens=6, temperature=0.0, eos_token_ids=[cfg.eos_token_ids[0]])
    before = np.asarray(generate(model, ids, mask, pv, grid, **kw).tokens)
    head = model.lm_head.kernel
    boosted = int(before[0, 0]) ^ 1  # a token the greedy policy did not pick
    nnx.update(model.lm_head, nnx.State({"kernel": head.replace(head[...].at[:, boosted].add(100.0))}))
    after = np.asarray(generate(model, ids, mask, pv, grid, **kw).tokens)
    assert (after == boosted).any() and not np.array_equal(before, after)


@pytest.mark.parametrize("top_k, top_p", [(0, 0.5), (1000, 1.0), (1000, 0.9), (5, 0.3), (0, 0.95), (300, 0.99)])
def test_filter_on_large_vocab_equals_sort_reference(top_k, top_p):
    """Both the top-candidate path and the exact bisection fallback keep the set a full sort keeps."""
    logits = np.asarray(3 * jax.random.normal(jax.random.key(0), (4, 151936)))
    want = []
    for row in logits:
        top = row[np.argsort(-row, kind="stable")[:top_k or len(row)]]
        p = np.exp(top - top.max())
        p /= p.sum()
        keep = (np.cumsum(p) - p) < top_p
        keep[0] = True
        want.append(row >= top[keep].min())
    got = np.isfinite(np.asarray(filter_logits(jnp.asarray(logits), jnp.float32(1), jnp.int32(top_k),
                                               jnp.float32(top_p))))
    # fp32 vs float64 cumulative mass may move the boundary by one token out of thousands
    assert (np.abs(got.sum(-1) - np.sum(want, -1)) <= 1).all()
    assert (got == np.array(want)).mean() > 1 - 1e-5


def test_image_pad_is_suppressed_by_default(hf_tiny_untied):
    """<|image_pad|> in a completion would break the training forward: it is never sampled by default."""
    from flax import nnx

    cfg, _, path = hf_tiny_untied
    model = load_pretrained(path, dtype=jnp.float32)
    ids, mask, pv, grid = make_batch(cfg, ROWS, seed=2)
    kw = dict(max_new_tokens=4, temperature=0.0, eos_token_ids=[cfg.eos_token_ids[0]])
    first = int(np.asarray(generate(model, ids, mask, pv, grid, **kw).tokens)[0, 0])
    head = model.lm_head.kernel
    # the image pad column becomes twice the greedy winner's: it now has the top logit at row 0, step 0
    nnx.update(model.lm_head, nnx.State({"kernel": head.replace(
        head[...].at[:, cfg.image_token_id].set(2.0 * head[...][:, first]))}))
    unsuppressed = np.asarray(generate(model, ids, mask, pv, grid, suppress_token_ids=[], **kw).tokens)
    assert unsuppressed[0, 0] == cfg.image_token_id
    default = np.asarray(generate(model, ids, mask, pv, grid, **kw).tokens)
    assert not (default == cfg.image_token_id).any() and default[0, 0] == first


def test_inverse_cdf_sample_matches_weights_across_blocks():
    """Blocked inversion: frequencies follow the weights across block boundaries; zero weights never drawn."""
    from mr1jax.generate.sampler import inverse_cdf_sample

    vocab = 1000  # not a multiple of the block size
    w = np.zeros(vocab, np.float32)
    hot = np.array([0, 255, 256, 511, 700, 999])
    w[hot] = [1.0, 2.0, 3.0, 1.0, 2.0, 1.0]
    n = 30_000
    u = 1.0 - jax.random.uniform(jax.random.key(0), (n, 1))
    draws = np.asarray(inverse_cdf_sample(jnp.broadcast_to(jnp.asarray(w), (n, vocab)), u, block=256))
    freq = np.bincount(draws, minlength=vocab) / n
    expected = w / w.sum()
    assert set(np.unique(draws)) <= set(hot.tolist())
    assert (np.abs(freq - expected) <= 5 * np.sqrt(expected * (1 - expected) / n) + 1e-9).all()
    # u = 1 (the top of the range) lands on the last non-zero weight, never on padding
    assert int(inverse_cdf_sample(jnp.asarray(w)[None], jnp.ones((1, 1)), block=256)[0]) == 999
