"""KL estimators (k1/k2/k3, clamp) and step -> beta schedules (OThink-MR1 Eq. 3 V shape, linear, cosine,
make_schedule), checked against values written out by hand or in float64 numpy."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mr1jax.rl import kl as klmod
from mr1jax.rl.kl import constant, cosine, kl_penalty, linear, make_schedule, othink_dynamic

f32 = np.float32


# ------------------------------------------------------------------------------------------------ estimators


def _np_kl(logp, ref, est, clamp=None):
    d = ref.astype(np.float64) - logp.astype(np.float64)
    if clamp is not None:
        d = np.clip(d, -clamp, clamp)
    return {"k1": -d, "k2": 0.5 * d * d, "k3": np.exp(d) - d - 1.0}[est]


@pytest.mark.parametrize("est", ["k1", "k2", "k3"])
def test_estimators_match_numpy(est):
    rng = np.random.default_rng(0)
    logp = -np.abs(rng.normal(size=(4, 9))).astype(f32) - 0.1
    ref = (logp + 0.7 * rng.normal(size=logp.shape)).astype(f32)
    got = np.asarray(kl_penalty(jnp.asarray(logp), jnp.asarray(ref), est))
    np.testing.assert_allclose(got, _np_kl(logp, ref, est), rtol=1e-5, atol=1e-6)
    assert got.dtype == np.float32


def test_k3_nonnegative_and_zero_when_equal():
    rng = np.random.default_rng(1)
    d = np.concatenate([rng.normal(size=20000) * s for s in (1e-7, 1e-4, 1e-2, 1.0, 4.0)]).astype(f32)
    logp = jnp.asarray(-np.abs(rng.normal(size=d.shape)).astype(f32))
    k3 = kl_penalty(logp, logp + d, "k3")
    assert float(jnp.min(k3)) >= 0.0
    assert np.all(np.asarray(kl_penalty(logp, logp, "k3")) == 0.0)
    for est in ("k1", "k2"):
        assert np.all(np.asarray(kl_penalty(logp, logp, est)) == 0.0)


def test_k3_clamp_clamps_log_ratio_before_exp():
    logp = jnp.array([[-40.0, -1.0, -0.5]])
    ref = jnp.array([[-1.0, -40.0, -0.7]])  # log-ratios ref - logp: +39, -39, -0.2
    got = np.asarray(kl_penalty(logp, ref, "k3", clamp=10.0))[0]
    want = [math.exp(10) - 10 - 1, math.exp(-10) + 10 - 1, math.exp(-0.2) + 0.2 - 1]
    np.testing.assert_allclose(got, want, rtol=1e-5)
    # Zero gradient where the clamp is active, the usual gradient inside the range.
    g = jax.grad(lambda lp: jnp.sum(kl_penalty(lp, ref, "k3", clamp=10.0)))(logp)
    assert g[0, 0] == 0 and g[0, 1] == 0
    np.testing.assert_allclose(g[0, 2], 1 - math.exp(-0.2), rtol=1e-5)  # d/dlogp [e^d - d - 1], d = ref - logp
    # Unclamped k3 overflows to inf for such a gap; the clamp keeps it finite.
    far = jnp.array([[-200.0, -1.0, -1.0]])
    assert np.isinf(np.asarray(kl_penalty(far, ref, "k3"))[0, 0])
    assert np.isfinite(np.asarray(kl_penalty(far, ref, "k3", clamp=20.0))).all()


def test_bad_estimator_and_clamp():
    x = jnp.zeros((1, 2))
    with pytest.raises(ValueError, match=r"'k4'.*k1, k2, k3"):
        kl_penalty(x, x, "k4")
    with pytest.raises(ValueError, match="clamp"):
        kl_penalty(x, x, "k3", clamp=0.0)


# ------------------------------------------------------------------------------------------------ schedules


def _othink_np(s, bmin, bmax, t, w):
    """Eq. 3 of OThink-MR1 in float64, written from the paper."""
    bmid = (bmin + bmax) / 2
    if s <= w:
        return bmid - (bmid - bmin) * s / w
    if s <= t:
        return bmin + (bmax - bmin) * (s - w) / (t - w)
    return bmax


@pytest.mark.parametrize("bmin,bmax", [(0.04, 0.1), (0.0, 0.02)], ids=["counting", "geometry"])
def test_othink_dynamic_exact_anchor_values(bmin, bmax):
    t, w = 100, 30
    sched = othink_dynamic(bmin, bmax, total_steps=t, warmup_fraction=0.3)
    bmid = (bmin + bmax) / 2
    # Anchors are exact float32 copies.
    assert sched(0) == f32(bmid)
    assert sched(w) == f32(bmin)  # the boundary step belongs to the descending segment and equals beta_min
    assert sched(t) == f32(bmax)
    assert sched(t + 1) == f32(bmax) and sched(10 * t) == f32(bmax)
    # Midpoints of both segments.
    np.testing.assert_allclose(float(sched(15)), (bmid + bmin) / 2, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(float(sched(65)), (bmin + bmax) / 2, rtol=1e-6, atol=1e-9)
    # Just after the boundary the ramp has started going up.
    np.testing.assert_allclose(float(sched(31)), bmin + (bmax - bmin) / 70, rtol=1e-6, atol=1e-9)
    # Every step against the float64 equation, eagerly and under jit with a traced (vector) step.
    steps = np.arange(0, 131)
    want = np.array([_othink_np(s, bmin, bmax, t, w) for s in steps])
    np.testing.assert_allclose(np.asarray(sched(jnp.asarray(steps))), want, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(np.asarray(jax.jit(sched)(jnp.asarray(steps, jnp.int32))), want, rtol=1e-6, atol=1e-9)
    assert jax.jit(sched)(jnp.int32(w)) == f32(bmin)


def test_othink_agrees_with_optax_join_for_integer_w():
    for bmin, bmax in ((0.04, 0.1), (0.0, 0.02)):
        bmid = (bmin + bmax) / 2
        joined = optax.join_schedules([optax.linear_schedule(bmid, bmin, 30), optax.linear_schedule(bmin, bmax, 70)],
                                      [30])
        steps = jnp.arange(0, 131)
        np.testing.assert_allclose(np.asarray(othink_dynamic(bmin, bmax, 100)(steps)), np.asarray(joined(steps)),
                                   rtol=0, atol=1e-8)


def test_othink_paper_numbers_counting():
    sched = othink_dynamic(0.04, 0.1, 100)  # default warmup_fraction 0.3 -> w = 30
    np.testing.assert_allclose([float(sched(s)) for s in (0, 15, 30, 65, 100, 200)],
                               [0.07, 0.055, 0.04, 0.07, 0.1, 0.1], rtol=1e-6)


def test_othink_degenerate_and_fractional_warmup():
    s0 = othink_dynamic(0.0, 0.02, 10, warmup_fraction=0.0)  # w = 0: plain ramp from beta_min
    np.testing.assert_allclose([float(s0(i)) for i in (0, 5, 10)], [0.0, 0.01, 0.02], atol=1e-9)
    s1 = othink_dynamic(0.0, 0.02, 10, warmup_fraction=1.0)  # w = t: descending half, beta_max after t
    np.testing.assert_allclose([float(s1(i)) for i in (0, 5, 10, 11)], [0.01, 0.005, 0.0, 0.02], atol=1e-9)
    s2 = othink_dynamic(0.04, 0.1, 15)  # w = 4.5, not rounded
    for s in range(20):
        np.testing.assert_allclose(float(s2(s)), _othink_np(s, 0.04, 0.1, 15, 4.5), rtol=1e-6)
    s3 = othink_dynamic(0.04, 0.1, 100, warmup_steps=20)
    assert s3(20) == f32(0.04)
    with pytest.raises(ValueError):
        othink_dynamic(0.04, 0.1, 100, warmup_fraction=1.5)
    with pytest.raises(ValueError):
        othink_dynamic(0.04, 0.1, 0)


def test_linear_cosine_constant():
    lin = linear(0.04, 0.1, 100)
    assert lin(0) == f32(0.04) and lin(100) == f32(0.1) and lin(500) == f32(0.1)
    np.testing.assert_allclose(float(lin(50)), 0.07, rtol=1e-6)
    cos = cosine(0.1, 0.01, 100)
    assert cos(0) == f32(0.1) and cos(100) == f32(0.01) and cos(150) == f32(0.01)
    np.testing.assert_allclose(float(cos(50)), 0.055, rtol=1e-6)
    np.testing.assert_allclose(float(cos(25)), 0.01 + 0.09 * (1 + math.cos(math.pi / 4)) / 2, rtol=1e-6)
    c = constant(0.04)
    assert c(0) == f32(0.04) and c(12345) == f32(0.04)
    assert c(jnp.arange(3)).shape == (3,)
    assert jax.jit(lin)(jnp.int32(50)).dtype == jnp.float32


def test_make_schedule():
    s = make_schedule("othink_dynamic", beta_min=0.04, beta_max=0.1, total_steps=100)
    assert s(30) == f32(0.04)
    assert make_schedule("constant", beta=0.01)(7) == f32(0.01)
    assert make_schedule("linear", beta_min=0.0, beta_max=1.0, total_steps=4)(1) == f32(0.25)
    assert make_schedule("cosine", beta_start=1.0, beta_end=0.0, total_steps=4)(4) == f32(0.0)
    assert make_schedule(0.04)(3) == f32(0.04)
    opt = optax.linear_schedule(0.0, 1.0, 10)
    assert make_schedule(opt) is opt  # any callable passes through unchanged
    fn = lambda step: 0.5 * step  # noqa: E731
    assert make_schedule(fn) is fn
    with pytest.raises(ValueError) as e:
        make_schedule("othink", beta_min=0.0)
    msg = str(e.value)
    assert "'othink'" in msg and all(n in msg for n in klmod.SCHEDULE_NAMES)
    with pytest.raises(ValueError, match="bad arguments for KL schedule 'linear'"):
        make_schedule("linear", beta_min=0.0, beta_mx=1.0, total_steps=4)
    with pytest.raises(ValueError, match="unexpected arguments"):
        make_schedule(opt, beta=1.0)
