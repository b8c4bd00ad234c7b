"""KL penalties between the policy and the frozen reference, and step-scheduled KL coefficients.

**Estimators** (per token, from log-probabilities of the sampled tokens; ``d = ref_logps - logps``):

=========  ====================================  ==============================================
name       value                                 notes
=========  ====================================  ==============================================
``k1``     ``logps - ref_logps``  (= ``-d``)      unbiased for KL(pi || ref); can be negative
``k2``     ``0.5 * (logps - ref_logps) ** 2``     always >= 0, biased
``k3``     ``exp(d) - d - 1``                     OThink-MR1 / Vision-R1 / DeepSeekMath GRPO;
                                                  >= 0, unbiased, ``= pi_ref/pi - log(pi_ref/pi) - 1``
=========  ====================================  ==============================================

k3 is evaluated as ``expm1(d) - d``: the same value, but never negative in float32 (the literal
``exp(d) - d - 1`` rounds to about -6e-8 for many tiny ``d``) and exactly 0 when ``d == 0``.

Optional ``clamp=c`` clamps the **log-ratio** ``d = ref_logps - logps`` to ``[-c, c]`` *before* the
estimator is evaluated (so for k3, before the ``exp``); the gradient is zero for tokens whose log-ratio
lies outside the range. This is the guard verl/EasyR1 use against ``exp`` overflow (verl's
``low_var_kl`` clamps the log-ratio to +-20 and then also clamps the k3 value to +-10; here there is
a single clamp, on the log-ratio only). The clamp applies to whichever estimator is chosen.

**Coefficient schedules** are plain ``step -> beta`` callables, traceable by ``jax.jit`` exactly like
optax schedules (the step may be a traced int/float array of any shape; the result is float32 of
the same shape). Because beta is an ordinary traced scalar, changing it never recompiles the loss.
`make_schedule` builds one by name and passes any callable (e.g. an optax schedule) through unchanged.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, Literal, Union

import jax
import jax.numpy as jnp

KLEstimator = Literal["k1", "k2", "k3"]
KL_ESTIMATORS: tuple[str, ...] = ("k1", "k2", "k3")

Schedule = Callable[[Any], jax.Array]
"""A ``step -> beta`` callable (jnp-traceable)."""

SCHEDULE_NAMES: tuple[str, ...] = ("constant", "othink_dynamic", "linear", "cosine")


# ----------------------------------------------------------------------------------------------------------
# Estimators
# ----------------------------------------------------------------------------------------------------------


def check_kl_estimator(estimator: str) -> str:
    """Host-side check of an estimator name; returns it, or raises ValueError naming the allowed ones."""
    if not isinstance(estimator, str) or estimator not in KL_ESTIMATORS:
        raise ValueError(
            f"unknown KL estimator {estimator!r}; expected one of {', '.join(KL_ESTIMATORS)}"
        )
    return estimator


def kl_penalty(
    logps: jax.Array,
    ref_logps: jax.Array,
    estimator: KLEstimator = "k3",
    clamp: float | None = None,
) -> jax.Array:
    """Per-token KL estimate between the policy and the reference.

    Args:
      logps: ``[...]`` (typically ``[B, T]``) log pi(token) under the current policy.
      ref_logps: same shape, log pi_ref(token) under the frozen reference.
      estimator: ``"k1"``, ``"k2"`` or ``"k3"`` (see the module docstring).
      clamp: if not None, a positive float ``c``; the log-ratio ``ref_logps - logps`` is clamped to
        ``[-c, c]`` before the estimator is evaluated (zero gradient outside the range).

    Returns:
      ``[...]`` float32 per-token KL estimates (no masking is applied here).
    """
    check_kl_estimator(estimator)
    if clamp is not None and not clamp > 0:
        raise ValueError(f"KL clamp must be a positive float or None, got {clamp!r}")
    d = jnp.asarray(ref_logps, jnp.float32) - jnp.asarray(logps, jnp.float32)  # log(pi_ref / pi)
    if clamp is not None:
        d = jnp.clip(d, -clamp, clamp)
    if estimator == "k1":
        return -d
    if estimator == "k2":
        return 0.5 * jnp.square(d)
    # k3: exp(d) - d - 1. expm1 keeps precision for small d (and gives exactly 0 at d == 0).
    return jnp.expm1(d) - d


# ----------------------------------------------------------------------------------------------------------
# Schedules
# ----------------------------------------------------------------------------------------------------------


def _step(step: Any) -> jax.Array:
    """Step as float32, negative steps treated as 0."""
    return jnp.maximum(jnp.asarray(step, jnp.float32), 0.0)


def _lerp(a: float, b: float, f: jax.Array) -> jax.Array:
    """``(1 - f) * a + f * b``: equals ``a`` exactly at ``f == 0`` and ``b`` exactly at ``f == 1``."""
    a32, b32 = jnp.float32(a), jnp.float32(b)
    return (1.0 - f) * a32 + f * b32


def _check_total_steps(total_steps: Any) -> int:
    if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps <= 0:
        raise ValueError(f"total_steps must be a positive int, got {total_steps!r}")
    return total_steps


def constant(beta: float) -> Schedule:
    """``beta(s) = beta`` for every step. Output: float32 with the step's shape."""

    def schedule(step: Any) -> jax.Array:
        return jnp.broadcast_to(jnp.float32(beta), jnp.shape(step))

    return schedule


def othink_dynamic(
    beta_min: float,
    beta_max: float,
    total_steps: int,
    warmup_fraction: float = 0.3,
    *,
    warmup_steps: float | None = None,
) -> Schedule:
    """OThink-MR1's dynamic KL coefficient (arXiv 2503.16081, Eq. 3): a V shape.

    With ``beta_mid = (beta_min + beta_max) / 2``, ``t = total_steps`` and ``w`` exploration steps::

        beta(s) = beta_mid - (beta_mid - beta_min) * s / w             for 0 <= s <= w
        beta(s) = beta_min + (beta_max - beta_min) * (s - w) / (t - w)  for w < s <= t
        beta(s) = beta_max                                              for s > t

    so ``beta(0) = beta_mid``, ``beta(w) = beta_min`` (the boundary step belongs to the first
    segment; both segments give beta_min there) and ``beta(t) = beta_max``. Negative steps are
    treated as 0. Each segment is evaluated as ``(1 - f) * start + f * end`` so the three anchor
    values are exact float32 copies of ``beta_mid``, ``beta_min``, ``beta_max``.

    (Written directly rather than as ``optax.join_schedules`` of two ``optax.linear_schedule``. The
    join switches to the second schedule *at* ``s == w`` and evaluates it there as
    ``(beta_min - beta_max) * 1 + beta_max``: beta_min mathematically (so the boundary convention does
    not change the value) and, in float32, for the paper's settings, but not exact by construction.
    More importantly, ``join_schedules`` boundaries and ``linear_schedule`` lengths are integers, while
    ``w = 0.3 * t`` is fractional for many ``t``. For integer ``w`` the two agree to 1 float32 ulp;
    the tests check this.)

    Args:
      beta_min, beta_max: the paper's settings are 0.04 / 0.1 (visual counting) and 0.0 / 0.02
        (geometry).
      total_steps: ``t``, a positive int.
      warmup_fraction: ``w / t`` (paper: 0.3). ``w = warmup_fraction * total_steps`` is *not* rounded
        to an integer (fractional ``w`` is fine: steps are compared as floats), except that float
        noise is snapped (``0.3 * 100 = 30.000000000000004`` becomes 30).
      warmup_steps: if given, ``w`` directly (overrides ``warmup_fraction``); ``0 <= w <= t``.

    Returns:
      ``step -> beta`` (float32, the step's shape). ``w == 0`` degenerates to the linear ramp
      beta_min -> beta_max; ``w == t`` is the descending half only, then beta_max after ``t``.
    """
    t = float(_check_total_steps(total_steps))
    if warmup_steps is None:
        if not 0.0 <= warmup_fraction <= 1.0:
            raise ValueError(f"warmup_fraction must be in [0, 1], got {warmup_fraction!r}")
        w = warmup_fraction * t
        if abs(w - round(w)) < 1e-9 * max(1.0, t):
            w = float(round(w))
    else:
        w = float(warmup_steps)
        if not 0.0 <= w <= t:
            raise ValueError(f"warmup_steps must be in [0, total_steps={total_steps}], got {warmup_steps!r}")
    beta_mid = (float(beta_min) + float(beta_max)) / 2.0
    w32 = jnp.float32(w)

    def schedule(step: Any) -> jax.Array:
        s = _step(step)
        f1 = jnp.clip(s / w32, 0.0, 1.0) if w > 0 else jnp.ones_like(s)
        down = _lerp(beta_mid, beta_min, f1)
        f2 = jnp.clip((s - w32) / jnp.float32(t - w), 0.0, 1.0) if t > w else jnp.ones_like(s)
        up = _lerp(beta_min, beta_max, f2)
        if w <= 0:
            return up
        return jnp.where(s <= w32, down, up)

    return schedule


def linear(beta_min: float, beta_max: float, total_steps: int) -> Schedule:
    """Linear ramp ``beta(s) = beta_min + (beta_max - beta_min) * s / t`` for ``0 <= s <= t``, then beta_max.

    (The "starts small and increases" reading of OThink-MR1's prose.) Exact endpoints; float32 output.
    """
    t = jnp.float32(_check_total_steps(total_steps))

    def schedule(step: Any) -> jax.Array:
        return _lerp(beta_min, beta_max, jnp.clip(_step(step) / t, 0.0, 1.0))

    return schedule


def cosine(beta_start: float, beta_end: float, total_steps: int) -> Schedule:
    """Half-cosine from ``beta_start`` (s = 0) to ``beta_end`` (s >= t)::

        beta(s) = beta_start + (beta_end - beta_start) * (1 - cos(pi * min(s, t) / t)) / 2

    Exact endpoints; float32 output.
    """
    t = jnp.float32(_check_total_steps(total_steps))

    def schedule(step: Any) -> jax.Array:
        p = jnp.clip(_step(step) / t, 0.0, 1.0)
        f = jnp.where(p >= 1.0, 1.0, 0.5 * (1.0 - jnp.cos(jnp.pi * p)))
        return _lerp(beta_start, beta_end, f)

    return schedule


_SCHEDULES: dict[str, Callable[..., Schedule]] = {
    "constant": constant,
    "othink_dynamic": othink_dynamic,
    "linear": linear,
    "cosine": cosine,
}


def make_schedule(name: Union[str, float, int, Callable[..., Any]], **kwargs: Any) -> Callable[..., Any]:
    """Build a KL-coefficient schedule.

    Args:
      name: one of ``SCHEDULE_NAMES`` (``constant``, ``othink_dynamic``, ``linear``, ``cosine``); a
        number (shorthand for ``constant(name)``); or any callable ``step -> beta`` (an optax schedule,
        a lambda), returned as-is.
      **kwargs: the named schedule's arguments, e.g.
        ``make_schedule("othink_dynamic", beta_min=0.04, beta_max=0.1, total_steps=100)``.

    Raises:
      ValueError: unknown name (the message lists the allowed names), or arguments that do not fit
        the named schedule, or kwargs given with a number / callable.
    """
    if callable(name):
        if kwargs:
            raise ValueError(f"make_schedule got a callable schedule and unexpected arguments {sorted(kwargs)}")
        return name
    if isinstance(name, (int, float)) and not isinstance(name, bool):
        if kwargs:
            raise ValueError(f"make_schedule got a number ({name}) and unexpected arguments {sorted(kwargs)}")
        return constant(float(name))
    if not isinstance(name, str) or name not in _SCHEDULES:
        raise ValueError(
            f"unknown KL schedule {name!r}; expected one of {', '.join(SCHEDULE_NAMES)}, "
            "a number (constant beta) or a callable step -> beta"
        )
    factory = _SCHEDULES[name]
    sig = inspect.signature(factory)
    try:
        sig.bind(**kwargs)
    except TypeError as e:
        raise ValueError(f"bad arguments for KL schedule {name!r}{sig}: {e}") from None
    return factory(**kwargs)


__all__ = [
    "KLEstimator",
    "KL_ESTIMATORS",
    "SCHEDULE_NAMES",
    "Schedule",
    "check_kl_estimator",
    "constant",
    "cosine",
    "kl_penalty",
    "linear",
    "make_schedule",
    "othink_dynamic",
]
