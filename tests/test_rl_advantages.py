"""Group-relative advantages: hand-computed z-scores, all-equal groups, batch / none scaling, errors."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mr1jax.rl.advantages import group_advantages, nonconstant_groups

REWARDS = [1.0, 0.0, 0.0, 1.0, 2.0, 0.0, 0.0, 0.0]  # two groups of 4


def test_group_zscore_by_hand_unbiased_default():
    # Group 1: mean 0.5, deviations +-0.5, unbiased var = 4 * 0.25 / 3 = 1/3.
    # Group 2: mean 0.5, deviations 1.5, -0.5 x3, unbiased var = (2.25 + 3 * 0.25) / 3 = 1.
    a = 0.5 / math.sqrt(1 / 3)
    want = [a, -a, -a, a, 1.5, -0.5, -0.5, -0.5]
    got = group_advantages(jnp.array(REWARDS), 4, eps=0.0)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-6)
    # eps enters the denominator as std + eps.
    got_eps = group_advantages(jnp.array(REWARDS), 4, eps=0.1)
    d = math.sqrt(1 / 3) + 0.1
    np.testing.assert_allclose(np.asarray(got_eps)[:2], [0.5 / d, -0.5 / d], rtol=1e-6)


def test_group_zscore_population_std():
    # Population var: group 1: 0.25 -> std 0.5; group 2: 3/4 -> std sqrt(0.75).
    s2 = math.sqrt(0.75)
    want = [1.0, -1.0, -1.0, 1.0, 1.5 / s2, -0.5 / s2, -0.5 / s2, -0.5 / s2]
    got = group_advantages(jnp.array(REWARDS), 4, eps=0.0, ddof=0)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-6)


def test_all_equal_group_is_exactly_zero():
    r = jnp.array([0.1, 0.1, 0.1, 1.0, 0.0, 1.0, 7.0, 7.0, 7.0], jnp.float32)  # 0.1 * 3 / 3 != 0.1 in float
    for scale, ddof in (("group", 1), ("group", 0), ("batch", 1), ("none", 1)):
            got = np.asarray(group_advantages(r, 3, scale=scale, ddof=ddof))
            assert np.all(np.isfinite(got))
            assert np.all(got[:3] == 0.0) and np.all(got[6:] == 0.0), (scale, ddof, got)
            assert np.all(got[3:6] != 0.0)
    # A whole batch of equal rewards, also with eps = 0 (would be 0/0 without the explicit zero).
    flat = jnp.full((9,), 0.3)
    for scale in ("group", "batch", "none"):
        got = np.asarray(group_advantages(flat, 3, scale=scale, eps=0.0))
        assert np.all(got == 0.0) and np.all(np.isfinite(got))
    np.testing.assert_array_equal(np.asarray(nonconstant_groups(r, 3)), [False, True, False])


def test_batch_and_none_scaling():
    r = np.array(REWARDS)
    centred = np.array([0.5, -0.5, -0.5, 0.5, 1.5, -0.5, -0.5, -0.5])
    # Batch std over all 8 rewards: mean 0.5, squares of deviations sum to 0.25*4 + 2.25 + 0.25*3 = 4.
    np.testing.assert_allclose(np.asarray(group_advantages(jnp.array(r), 4, scale="batch", eps=0.0)),
                               centred / math.sqrt(4 / 7), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(group_advantages(jnp.array(r), 4, scale="batch", eps=0.0, ddof=0)),
                               centred / math.sqrt(4 / 8), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(group_advantages(jnp.array(r), 4, scale="none")), centred, rtol=1e-6)


def test_random_against_numpy_and_jit():
    rng = np.random.default_rng(0)
    r = rng.integers(0, 3, size=48).astype(np.float32)
    g = r.reshape(6, 8).astype(np.float64)
    want = ((g - g.mean(1, keepdims=True)) / (g.std(1, ddof=1, keepdims=True) + 1e-6)).reshape(-1)
    fn = jax.jit(lambda x: group_advantages(x, 8))
    np.testing.assert_allclose(np.asarray(fn(jnp.asarray(r))), want, rtol=1e-5, atol=1e-6)
    # Group means of the advantages are zero.
    np.testing.assert_allclose(np.asarray(fn(jnp.asarray(r))).reshape(6, 8).sum(1), 0.0, atol=1e-5)


def test_group_size_one_is_zero():
    got = np.asarray(group_advantages(jnp.array([1.0, 0.0, 3.0]), 1))
    assert np.all(got == 0.0)


def test_errors():
    with pytest.raises(ValueError, match=r"N=7 is not a positive multiple of group_size=4"):
        group_advantages(jnp.zeros(7), 4)
    with pytest.raises(ValueError, match="multiple of group_size"):
        nonconstant_groups(jnp.zeros(6), 4)
    with pytest.raises(ValueError, match=r"'zscore'.*group, batch, none"):
        group_advantages(jnp.zeros(8), 4, scale="zscore")
    with pytest.raises(ValueError, match="1-D"):
        group_advantages(jnp.zeros((2, 4)), 4)
    with pytest.raises(ValueError, match="group_size"):
        group_advantages(jnp.zeros(8), 0)
    with pytest.raises(ValueError, match="ddof"):
        group_advantages(jnp.zeros(8), 4, ddof=2)
