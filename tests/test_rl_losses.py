"""GRPO loss: every aggregation x KL estimator against a loop-based float64 numpy reference (clipping inactive
and active), exact (sum, count) micro-batching, metrics, gradients, traced beta, errors, sequence_logprobs."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mr1jax.rl.kl import othink_dynamic
from mr1jax.rl.losses import (
    aggregation_count,
    finalize_loss_stats,
    grpo_loss,
    grpo_loss_terms,
    merge_loss_stats,
    sequence_logprobs,
)

AGGS = ["seq_mean_token_mean", "token_mean", "dr_grpo"]
ESTS = ["k1", "k2", "k3"]
B, T, MAX_LEN = 6, 7, 8
EPS_LOW, EPS_HIGH = 0.2, 0.28


# ------------------------------------------------------------------------------------------------ reference


def ref_token_terms(logps, old, ref, adv, mask, beta, est, clamp):
    """Per-token (pg, kl, ratio) from the formulas, one token at a time, float64; None off the mask."""
    out = {}
    for i in range(logps.shape[0]):
        for t in range(logps.shape[1]):
            if not mask[i, t]:
                continue
            r = math.exp(float(logps[i, t]) - float(old[i, t]))
            a = float(adv[i])
            clipped_r = min(max(r, 1 - EPS_LOW), 1 + EPS_HIGH)
            pg = -min(r * a, clipped_r * a)
            kl = None
            if ref is not None:
                d = float(ref[i, t]) - float(logps[i, t])
                if clamp is not None:
                    d = min(max(d, -clamp), clamp)
                kl = {"k1": -d, "k2": 0.5 * d * d, "k3": math.exp(d) - d - 1}[est]
            out[i, t] = (pg, kl, r)
    return out


def ref_aggregate(per_tok, mask, agg):
    """Aggregate a dict {(i, t): value} with the definitions of the three modes."""
    b = mask.shape[0]
    if agg == "seq_mean_token_mean":
        seq_means = []
        for i in range(b):
            vals = [v for (ii, _), v in per_tok.items() if ii == i]
            if vals:
                seq_means.append(sum(vals) / len(vals))
        return sum(seq_means) / len(seq_means)
    total = sum(per_tok.values())
    if agg == "token_mean":
        return total / len(per_tok)
    return total / (b * MAX_LEN)


def ref_loss(logps, old, ref, adv, mask, beta, agg, est, clamp=None):
    terms = ref_token_terms(logps, old, ref, adv, mask, beta, est, clamp)
    per_tok = {k: pg + (beta * kl if kl is not None else 0.0) for k, (pg, kl, _) in terms.items()}
    return ref_aggregate(per_tok, mask, agg), terms


# ------------------------------------------------------------------------------------------------ data


def make_batch(seed=0, clipping=False, junk=True):
    rng = np.random.default_rng(seed)
    lengths = np.array([7, 3, 0, 5, 1, 6])  # one row without any valid token
    mask = (np.arange(T)[None, :] < lengths[:, None]).astype(np.float32)
    logps = (-np.abs(rng.normal(size=(B, T))) - 0.05).astype(np.float32)
    ref = (logps + 0.5 * rng.normal(size=(B, T))).astype(np.float32)
    if clipping:
        old = (logps + 0.6 * rng.normal(size=(B, T))).astype(np.float32)
    else:
        old = logps.copy()  # mu = 1: pi_old == pi_theta, ratio exactly 1
    adv = np.array([1.3, -0.7, 0.4, -1.1, 0.9, -0.2], np.float32)
    if junk:  # padding holds garbage that must not leak
        logps = np.where(mask > 0, logps, -np.inf).astype(np.float32)
        old = np.where(mask > 0, old, np.nan).astype(np.float32)
        ref = np.where(mask > 0, ref, np.nan).astype(np.float32)
    return logps, old, ref, adv, mask


def _kw(agg, est, beta=0.04, clamp=None):
    return dict(beta=beta, eps_low=EPS_LOW, eps_high=EPS_HIGH, agg=agg, kl_estimator=est, k3_clamp=clamp,
                max_length=MAX_LEN if agg == "dr_grpo" else None)


# ------------------------------------------------------------------------------------------------ values


@jax.jit
def _all_configs(logps, old, ref, adv, mask, beta):
    """Loss and metrics for every (agg, estimator) pair in one compile (tests stay fast on 2 cores)."""
    return {(agg, est): grpo_loss(logps, old, ref, adv, mask, **_kw(agg, est, beta=beta))
            for agg in AGGS for est in ESTS}


@functools.lru_cache(maxsize=None)
def _all_configs_for(clipping):
    return _all_configs(*(jnp.asarray(x) for x in make_batch(seed=1, clipping=clipping)), 0.3)


@pytest.mark.parametrize("clipping", [False, True], ids=["unclipped", "clipped"])
@pytest.mark.parametrize("est", ESTS)
@pytest.mark.parametrize("agg", AGGS)
def test_loss_matches_reference(agg, est, clipping):
    logps, old, ref, adv, mask = make_batch(seed=1, clipping=clipping)
    beta = 0.3
    want, terms = ref_loss(logps, old, ref, adv, mask, beta, agg, est)
    ratios = np.array([r for (_, _, r) in terms.values()])
    if clipping:
        assert (ratios < 1 - EPS_LOW).any() and (ratios > 1 + EPS_HIGH).any()
    else:
        assert np.all(ratios == 1.0)
    loss, metrics = _all_configs_for(clipping)[agg, est]
    np.testing.assert_allclose(float(loss), want, rtol=2e-5, atol=1e-6)
    assert loss.dtype == jnp.float32 and np.isfinite(float(loss))
    # The policy part alone, and the KL mean over valid tokens.
    want_pg = ref_aggregate({k: pg for k, (pg, _, _) in terms.items()}, mask, agg)
    np.testing.assert_allclose(float(metrics["policy_loss"]), want_pg, rtol=2e-5, atol=1e-6)
    want_kl = np.mean([kl for (_, kl, _) in terms.values()])
    np.testing.assert_allclose(float(metrics["kl"]), want_kl, rtol=2e-5, atol=1e-6)


def test_eager_equals_jit():
    batch = [jnp.asarray(x) for x in make_batch(seed=1, clipping=True)]
    loss, _ = grpo_loss(*batch, **_kw("token_mean", "k3", beta=0.3))
    np.testing.assert_allclose(float(loss), float(_all_configs_for(True)["token_mean", "k3"][0]), rtol=1e-6)


def test_k3_clamp_in_loss():
    agg = "seq_mean_token_mean"
    logps, old, ref, adv, mask = make_batch(seed=2)
    ref = np.where(mask > 0, ref + 3.0 * (np.arange(T) % 2), ref).astype(np.float32)  # some log-ratios > 1
    want, _ = ref_loss(logps, old, ref, adv, mask, 0.5, agg, "k3", clamp=1.0)
    loss, _ = grpo_loss(*(jnp.asarray(x) for x in (logps, old, ref, adv, mask)), **_kw(agg, "k3", 0.5, clamp=1.0))
    np.testing.assert_allclose(float(loss), want, rtol=2e-5, atol=1e-6)


def test_metrics_against_reference():
    logps, old, ref, adv, mask = make_batch(seed=3, clipping=True)
    entropy = np.random.default_rng(3).uniform(0, 2, size=(B, T)).astype(np.float32)
    _, terms = ref_loss(logps, old, ref, adv, mask, 0.1, "token_mean", "k3")
    _, metrics = grpo_loss(*(jnp.asarray(x) for x in (logps, old, ref, adv, mask)), **_kw("token_mean", "k3", 0.1),
                           entropy=jnp.asarray(np.where(mask > 0, entropy, np.nan)))
    n = len(terms)
    low = sum(1 for (i, t), (_, _, r) in terms.items() if adv[i] < 0 and r < 1 - EPS_LOW)
    high = sum(1 for (i, t), (_, _, r) in terms.items() if adv[i] > 0 and r > 1 + EPS_HIGH)
    assert low > 0 and high > 0
    ratios = [r for (_, _, r) in terms.values()]
    np.testing.assert_allclose(float(metrics["clip_frac_low"]), low / n, rtol=1e-6)
    np.testing.assert_allclose(float(metrics["clip_frac_high"]), high / n, rtol=1e-6)
    np.testing.assert_allclose(float(metrics["clip_frac"]), (low + high) / n, rtol=1e-6)
    np.testing.assert_allclose(float(metrics["ratio_mean"]), np.mean(ratios), rtol=1e-5)
    np.testing.assert_allclose(float(metrics["ratio_min"]), min(ratios), rtol=1e-5)
    np.testing.assert_allclose(float(metrics["ratio_max"]), max(ratios), rtol=1e-5)
    np.testing.assert_allclose(float(metrics["entropy"]), entropy[mask > 0].mean(), rtol=1e-5)
    assert float(metrics["tokens"]) == mask.sum()


def test_no_reference_ignores_beta():
    logps, old, ref, adv, mask = make_batch(seed=4, clipping=True)
    want, _ = ref_loss(logps, old, None, adv, mask, 0.0, "seq_mean_token_mean", "k3")
    loss, metrics = grpo_loss(jnp.asarray(logps), jnp.asarray(old), None, jnp.asarray(adv), jnp.asarray(mask),
                              beta=100.0, eps_low=EPS_LOW, eps_high=EPS_HIGH)
    np.testing.assert_allclose(float(loss), want, rtol=2e-5, atol=1e-6)
    assert "kl" not in metrics


def test_old_logps_none_is_detached_current_policy():
    logps, old, ref, adv, mask = make_batch(seed=5, clipping=False)
    args = (jnp.asarray(ref), jnp.asarray(adv), jnp.asarray(mask))
    l_none = grpo_loss(jnp.asarray(logps), None, *args, beta=0.04)[0]
    l_old = grpo_loss(jnp.asarray(logps), jnp.asarray(old), *args, beta=0.04)[0]
    np.testing.assert_allclose(float(l_none), float(l_old), rtol=1e-6)


# ------------------------------------------------------------------------------------------------ micro-batching


@jax.jit
def _terms_all_aggs(logps, old, ref, adv, mask):
    return {agg: grpo_loss_terms(logps, old, ref, adv, mask, **_kw(agg, "k3", beta=0.2)) for agg in AGGS}


@functools.lru_cache(maxsize=None)
def _micro_case():
    batch = make_batch(seed=6, clipping=True)
    full = _terms_all_aggs(*(jnp.asarray(x) for x in batch))
    # Three micro-batches; the middle one holds the row without valid tokens (counts differ).
    micro = [_terms_all_aggs(*(jnp.asarray(x[sl]) for x in batch)) for sl in (slice(0, 2), slice(2, 4), slice(4, 6))]
    return batch, full, micro


@pytest.mark.parametrize("agg", AGGS)
def test_micro_batches_sum_to_full_batch(agg):
    (logps, old, ref, adv, mask), full, micro = _micro_case()
    full_loss, full_metrics = grpo_loss(*(jnp.asarray(x) for x in (logps, old, ref, adv, mask)),
                                        **_kw(agg, "k3", beta=0.2))
    np.testing.assert_allclose(float(full[agg][0] / full[agg][1]), float(full_loss), rtol=1e-6)
    sums = [m[agg][0] for m in micro]
    counts = [m[agg][1] for m in micro]
    for k, c in enumerate(counts):
        want_c = aggregation_count(jnp.asarray(mask[2 * k:2 * k + 2]), agg, _kw(agg, "k3")["max_length"])
        assert float(c) == float(want_c)
    np.testing.assert_allclose(float(sum(sums) / sum(counts)), float(full_loss), rtol=1e-6, atol=1e-7)
    merged = finalize_loss_stats(merge_loss_stats(*(m[agg][2] for m in micro)))
    assert set(merged) == set(full_metrics)
    for k in full_metrics:
        np.testing.assert_allclose(float(merged[k]), float(full_metrics[k]), rtol=1e-6, atol=1e-7, err_msg=k)
    want_count = {"seq_mean_token_mean": 5, "token_mean": mask.sum(), "dr_grpo": B * MAX_LEN}[agg]
    assert float(sum(counts)) == want_count


def test_empty_batch_gives_zero_not_nan():
    z = jnp.zeros((2, T))

    @jax.jit
    def run(lp):
        return grpo_loss(lp, lp, z, jnp.ones(2), z, beta=0.1), jax.grad(
            lambda x: grpo_loss(x, None, z, jnp.ones(2), z, beta=0.1)[0])(lp)

    (loss, metrics), g = run(z)
    assert float(loss) == 0.0 and all(np.isfinite(float(v)) for v in metrics.values())
    assert np.all(np.asarray(g) == 0.0)


# ------------------------------------------------------------------------------------------------ gradients


@functools.lru_cache(maxsize=None)
def _sign_case():
    logps, _, _, _, mask = make_batch(seed=7, junk=True)
    adv = np.array([1.3, -0.7, 0.4, -1.1, 0.0, -0.2], np.float32)
    ref = jnp.asarray(np.where(mask > 0, logps, 0.0))  # ref == policy: the k3 KL gradient vanishes

    @jax.jit
    def grads(lp):
        return {agg: jax.grad(lambda x: grpo_loss(x, None, ref, jnp.asarray(adv), jnp.asarray(mask),  # noqa: B023
                                                  **_kw(agg, "k3", 0.5))[0])(lp) for agg in AGGS}

    return logps, adv, mask, grads(jnp.asarray(logps))


@pytest.mark.parametrize("agg", AGGS)
def test_gradient_sign_and_value(agg):
    logps, adv, mask, all_grads = _sign_case()
    g = np.asarray(all_grads[agg])
    assert np.all(np.isfinite(g))
    assert np.all(g[mask == 0] == 0.0)  # padding (holding -inf) gets exactly zero gradient
    valid = mask > 0
    pos, neg = (adv > 0)[:, None] & valid, (adv < 0)[:, None] & valid
    assert np.all(g[pos] < 0)  # positive advantage: raising logp lowers the loss
    assert np.all(g[neg] > 0)
    assert np.all(g[(adv == 0)[:, None] & valid] == 0)
    # Exact value with ratio == 1: d loss / d logp_it = -A_i * w_i.
    lengths = mask.sum(1)
    if agg == "seq_mean_token_mean":
        w = 1.0 / np.maximum(lengths, 1) / (lengths > 0).sum()
    elif agg == "token_mean":
        w = np.full(B, 1.0 / mask.sum())
    else:
        w = np.full(B, 1.0 / (B * MAX_LEN))
    np.testing.assert_allclose(g, -(adv * w)[:, None] * mask, rtol=1e-5, atol=1e-8)


def test_gradients_finite_with_clipping_and_kl():
    logps, old, ref, adv, mask = make_batch(seed=8, clipping=True)

    def grads(lp):  # one compile for the three estimators
        return [jax.grad(lambda x: grpo_loss(x, jnp.asarray(old), jnp.asarray(ref), jnp.asarray(adv),
                                             jnp.asarray(mask), **_kw("token_mean", est, 0.3, clamp=10.0))[0])(lp)
                for est in ESTS]

    for g in jax.jit(grads)(jnp.asarray(logps)):
        g = np.asarray(g)
        assert np.all(np.isfinite(g)) and np.all(g[mask == 0] == 0.0) and np.any(g != 0)


# ------------------------------------------------------------------------------------------------ tracing


def test_traced_beta_compiles_once():
    logps, old, ref, adv, mask = (jnp.asarray(x) for x in make_batch(seed=9))
    traces = 0

    def loss_fn(lp, beta):
        nonlocal traces
        traces += 1
        return grpo_loss(lp, old, ref, adv, mask, beta=beta)[0]

    jf = jax.jit(loss_fn)
    l1 = jf(logps, jnp.float32(0.01))
    l2 = jf(logps, jnp.float32(0.02))
    assert traces == 1 and float(l1) != float(l2)
    # Python floats are traced too (as weak-typed float32: one more trace, then none for new values).
    l3, l4 = jf(logps, 0.03), jf(logps, 0.05)
    assert traces == 2 and float(l3) != float(l4)

    sched = othink_dynamic(0.04, 0.1, 100)
    traces_s = 0

    def step_fn(lp, step):
        nonlocal traces_s
        traces_s += 1
        return grpo_loss(lp, old, ref, adv, mask, beta=sched(step))[0]

    js = jax.jit(step_fn)
    vals = [float(js(logps, jnp.int32(s))) for s in (0, 30, 100)]
    assert traces_s == 1 and vals[0] != vals[1] != vals[2]


# ------------------------------------------------------------------------------------------------ errors


def test_errors_name_allowed_values():
    x = jnp.zeros((2, 3))
    a = jnp.zeros(2)
    with pytest.raises(ValueError, match=r"'sum'.*seq_mean_token_mean, token_mean, dr_grpo"):
        grpo_loss(x, x, x, a, x, beta=0.1, agg="sum")
    with pytest.raises(ValueError, match=r"'kl'.*k1, k2, k3"):
        grpo_loss_terms(x, x, x, a, x, beta=0.1, kl_estimator="kl")
    with pytest.raises(ValueError, match="max_length"):
        grpo_loss(x, x, x, a, x, beta=0.1, agg="dr_grpo")
    with pytest.raises(ValueError, match="advantages"):
        grpo_loss(x, x, x, jnp.zeros(3), x, beta=0.1)
    with pytest.raises(ValueError, match="mask"):
        grpo_loss(x, x, x, a, jnp.zeros((2, 4)), beta=0.1)
    with pytest.raises(ValueError, match="seq_mean_token_mean"):  # also under jit, before any compile
        jax.jit(lambda lp: grpo_loss(lp, None, None, a, x, beta=0.0, agg="mean")[0])(x)


# ------------------------------------------------------------------------------------------------ logprobs


def test_sequence_logprobs():
    rng = np.random.default_rng(10)
    logits = rng.normal(size=(2, 5, 11)).astype(np.float32) * 3
    tokens = rng.integers(0, 11, size=(2, 5))
    x = logits.astype(np.float64)
    lsm = x - np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1, keepdims=True)) - x.max(-1, keepdims=True)
    want = np.take_along_axis(lsm, tokens[..., None], -1)[..., 0]
    slp = jax.jit(sequence_logprobs)
    got = slp(jnp.asarray(logits), jnp.asarray(tokens))
    assert got.shape == (2, 5) and got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)
    bf = jnp.asarray(logits, jnp.bfloat16)
    got_bf = slp(bf, jnp.asarray(tokens))
    assert got_bf.dtype == jnp.float32
    x_bf = np.asarray(bf.astype(jnp.float32), np.float64)
    want_bf = np.take_along_axis(x_bf - np.log(np.exp(x_bf).sum(-1, keepdims=True)), tokens[..., None], -1)[..., 0]
    np.testing.assert_allclose(np.asarray(got_bf), want_bf, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError):
        sequence_logprobs(jnp.asarray(logits), jnp.asarray(tokens[:, :3]))
