"""The GRPO objective (clipped surrogate + in-loss KL penalty) in micro-batch friendly (sum, count) form.

Inputs are per-token log-probabilities of the sampled completion tokens, all ``[B, T]`` (B completions,
T completion positions, padding marked by ``mask == 0``), one advantage per completion ``[B]``, and
the KL coefficient ``beta`` as a *traced* scalar (so a scheduled beta never recompiles).

Per valid token (i, t)::

    r_it   = exp(logps_it - old_logps_it)
    pg_it  = -min(r_it * A_i, clip(r_it, 1 - eps_low, 1 + eps_high) * A_i)
    l_it   = pg_it + beta * KL_it          (KL_it from `mr1jax.rl.kl.kl_penalty`; omitted if no reference)

**Aggregation, as (loss_sum, count)** with ``m_it`` the 0/1 mask and ``|o_i| = sum_t m_it``:

===========================  ==========================================  ===================================
``agg``                      ``loss_sum``                                ``count``
===========================  ==========================================  ===================================
``"seq_mean_token_mean"``    ``sum_i [ sum_t l_it m_it / |o_i| ]``       ``#{i : |o_i| >= 1}``
                             (rows with no valid token contribute 0)
``"token_mean"``             ``sum_i sum_t l_it m_it``                   ``sum_i |o_i|``
``"dr_grpo"``                ``sum_i sum_t l_it m_it``                   ``B * max_length``
===========================  ==========================================  ===================================

The loss is ``loss_sum / count`` (0 when ``count == 0``). Every ``loss_sum`` and ``count`` is a sum of
per-sequence terms that do not depend on which other sequences share the micro-batch, so for any split
of a batch into micro-batches ``sum(loss_sum_k) / sum(count_k)`` is the full-batch loss (identical up to
float summation order; ``count`` for dr_grpo is the micro-batch's own ``B_k * max_length``).
For gradient accumulation, either compute the global count first (`aggregation_count` needs only the
masks) and differentiate ``loss_sum_k / global_count`` per micro-batch, or accumulate the gradients of
``loss_sum_k`` and divide once at the end.

``"seq_mean_token_mean"`` is the OThink-MR1 / DeepSeekMath objective (TRL ``"grpo"``; note TRL also
counts rows with no valid token in the denominator, here they are excluded). ``"token_mean"`` is TRL
``"bnpo"`` / verl ``token-mean`` / DAPO, the Vision-R1 framework's default. ``"dr_grpo"`` divides by the
constant generation budget (Dr. GRPO).

**Metrics.** `grpo_loss_terms` returns *accumulable statistics* (a flat dict of float32 scalars):
keys ending in ``_min`` / ``_max`` combine with min / max, every other key by addition
(`merge_loss_stats`). `finalize_loss_stats` turns them into means; `grpo_loss` returns those means.
Finalised metrics (0 when there is no valid token):

- ``loss``, ``policy_loss`` (the pg part, aggregated exactly like the loss), ``tokens`` (valid tokens);
- ``kl``: mean per-token KL estimate over valid tokens (only when ``ref_logps`` is given);
- ``clip_frac_low``: fraction of valid tokens with ``A < 0`` and ``r < 1 - eps_low``; ``clip_frac_high``:
  ``A > 0`` and ``r > 1 + eps_high`` (the tokens where the clipped branch is taken and the gradient
  is zero); ``clip_frac`` = their sum;
- ``ratio_mean``, ``ratio_min``, ``ratio_max`` over valid tokens;
- ``entropy``: mean over valid tokens, only when ``entropy`` is passed (reported, not in the loss).

Names, shapes and ``max_length`` are validated on the host; the arithmetic then runs in a jitted kernel
(``agg``, ``kl_estimator``, ``k3_clamp``, ``max_length`` static; ``beta``, ``eps_low``, ``eps_high`` traced),
which inlines into an enclosing ``jax.jit`` / ``jax.grad``.

Padding may hold any junk (-inf log-probs, NaN): the inputs are zeroed at invalid positions
(``jnp.where``) before any arithmetic, so the loss and its gradients stay finite and padding gets
exactly zero gradient.
"""

from __future__ import annotations

import functools
from typing import Literal, Mapping

import jax
import jax.numpy as jnp

from mr1jax.rl.kl import KLEstimator, check_kl_estimator, kl_penalty

LossAggregation = Literal["seq_mean_token_mean", "token_mean", "dr_grpo"]
LOSS_AGGREGATIONS: tuple[str, ...] = ("seq_mean_token_mean", "token_mean", "dr_grpo")

_F32 = jnp.float32


def check_aggregation(agg: str, max_length: int | None = None) -> str:
    """Host-side check of an aggregation name (and ``max_length`` for ``dr_grpo``); returns ``agg``."""
    if not isinstance(agg, str) or agg not in LOSS_AGGREGATIONS:
        raise ValueError(f"unknown loss aggregation {agg!r}; expected one of {', '.join(LOSS_AGGREGATIONS)}")
    if agg == "dr_grpo":
        if max_length is None:
            raise ValueError("agg='dr_grpo' requires max_length (the completion-length budget)")
        if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length <= 0:
            raise ValueError(f"max_length must be a positive int, got {max_length!r}")
    return agg


def aggregation_count(mask: jax.Array, agg: LossAggregation, max_length: int | None = None) -> jax.Array:
    """The ``count`` of the (sum, count) form for ``mask [B, T]`` (see the module docstring); float32 scalar.

    Summing it over micro-batches gives the global denominator, computable before any forward pass.
    """
    check_aggregation(agg, max_length)
    m = jnp.asarray(mask).astype(_F32)
    if agg == "seq_mean_token_mean":
        return jnp.sum((jnp.sum(m, axis=-1) > 0).astype(_F32))
    if agg == "token_mean":
        return jnp.sum(m)
    return jnp.asarray(m.shape[0] * max_length, _F32)


def masked_aggregate(
    values: jax.Array, mask: jax.Array, agg: LossAggregation, max_length: int | None = None
) -> tuple[jax.Array, jax.Array]:
    """(sum, count) of per-token ``values [B, T]`` under ``mask [B, T]`` for aggregation ``agg``.

    Returns two float32 scalars; ``sum / count`` is the aggregated value. Masked positions must
    already hold finite values (they are multiplied by 0).
    """
    check_aggregation(agg, max_length)
    m = jnp.asarray(mask).astype(_F32)
    v = jnp.asarray(values).astype(_F32) * m
    if agg == "seq_mean_token_mean":
        lengths = jnp.sum(m, axis=-1)  # [B]
        per_seq = jnp.sum(v, axis=-1) / jnp.maximum(lengths, 1.0)
        return jnp.sum(per_seq), jnp.sum((lengths > 0).astype(_F32))
    return jnp.sum(v), aggregation_count(m, agg, max_length)


def _safe_div(num: jax.Array, den: jax.Array) -> jax.Array:
    """num / den, 0 where den == 0 (no NaN in values or gradients)."""
    return jnp.where(den > 0, num / jnp.where(den > 0, den, 1.0), 0.0)


def _check_shapes(logps, old_logps, ref_logps, advantages, mask, entropy) -> None:
    if logps.ndim != 2:
        raise ValueError(f"logps must be [B, T], got shape {tuple(logps.shape)}")
    bt = tuple(logps.shape)
    for name, x in (("old_logps", old_logps), ("ref_logps", ref_logps), ("mask", mask), ("entropy", entropy)):
        if x is not None and tuple(x.shape) != bt:
            raise ValueError(f"{name} must have the shape of logps {bt}, got {tuple(x.shape)}")
    if tuple(advantages.shape) != bt[:1]:
        raise ValueError(f"advantages must be [B] = {bt[:1]}, got {tuple(advantages.shape)}")


def grpo_loss_terms(
    logps: jax.Array,
    old_logps: jax.Array | None,
    ref_logps: jax.Array | None,
    advantages: jax.Array,
    mask: jax.Array,
    *,
    beta: jax.Array | float,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    agg: LossAggregation = "seq_mean_token_mean",
    kl_estimator: KLEstimator = "k3",
    k3_clamp: float | None = None,
    max_length: int | None = None,
    entropy: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array, dict[str, jax.Array]]:
    """GRPO loss of one (micro-)batch in (loss_sum, count) form.

    Args:
      logps: ``[B, T]`` log pi_theta of the sampled tokens (differentiable).
      old_logps: ``[B, T]`` log pi_old (behaviour policy at sampling time), or None for
        ``stop_gradient(logps)`` (one update per rollout batch: ratio == 1, clipping inactive).
      ref_logps: ``[B, T]`` log pi_ref of the frozen reference, or None (no KL term; ``beta`` ignored).
      advantages: ``[B]`` one advantage per completion (e.g. `mr1jax.rl.group_advantages`).
      mask: ``[B, T]`` 1 for completion tokens that count, 0 for padding (bool or numeric 0/1).
      beta: KL coefficient, a traced scalar (e.g. ``schedule(step)``) or Python float.
      eps_low, eps_high: ratio clip range ``[1 - eps_low, 1 + eps_high]`` (clip-higher when unequal).
      agg: ``"seq_mean_token_mean"``, ``"token_mean"`` or ``"dr_grpo"`` (module docstring).
      kl_estimator: ``"k1"``, ``"k2"`` or ``"k3"``; ``k3_clamp``: clamp on the log-ratio
        ``ref_logps - logps`` before the estimator (see `mr1jax.rl.kl`), None for none.
      max_length: completion-length budget, required by ``"dr_grpo"`` (count = B * max_length).
      entropy: optional ``[B, T]`` per-token policy entropy, only reported (``entropy_sum``).

    Returns:
      ``(loss_sum, count, stats)``: float32 scalars with ``loss = loss_sum / count``, and the
      accumulable statistics dict (``loss_sum``, ``count``, ``pg_loss_sum``, ``tokens``, ``kl_sum``,
      ``clip_low_sum``, ``clip_high_sum``, ``ratio_sum``, ``ratio_min``, ``ratio_max``,
      ``entropy_sum``; ``kl_sum`` / ``entropy_sum`` only when available).

    Raises:
      ValueError (host side, at trace time): unknown ``agg`` / ``kl_estimator``, ``dr_grpo`` without
      ``max_length``, mismatched shapes.
    """
    check_aggregation(agg, max_length)
    check_kl_estimator(kl_estimator)
    if k3_clamp is not None and not k3_clamp > 0:
        raise ValueError(f"k3_clamp must be a positive float or None, got {k3_clamp!r}")
    logps, advantages, mask = jnp.asarray(logps), jnp.asarray(advantages), jnp.asarray(mask)
    _check_shapes(logps, old_logps, ref_logps, advantages, mask, entropy)
    return _grpo_loss_terms(
        logps, old_logps, ref_logps, advantages, mask, entropy, beta, eps_low, eps_high,
        agg=agg, kl_estimator=kl_estimator, k3_clamp=None if k3_clamp is None else float(k3_clamp),
        max_length=max_length,
    )


@functools.partial(jax.jit, static_argnames=("agg", "kl_estimator", "k3_clamp", "max_length"))
def _grpo_loss_terms(
    logps: jax.Array,
    old_logps: jax.Array | None,
    ref_logps: jax.Array | None,
    advantages: jax.Array,
    mask: jax.Array,
    entropy: jax.Array | None,
    beta: jax.Array | float,
    eps_low: jax.Array | float,
    eps_high: jax.Array | float,
    *,
    agg: str,
    kl_estimator: str,
    k3_clamp: float | None,
    max_length: int | None,
) -> tuple[jax.Array, jax.Array, dict[str, jax.Array]]:
    """The kernel of `grpo_loss_terms` (arguments already validated; beta and the clip range traced)."""
    m = mask.astype(_F32)
    valid = m > 0
    logps = logps.astype(_F32)
    # Zero the policy log-probs at padding so junk there (-inf, NaN) never reaches exp or the gradients.
    logps = jnp.where(valid, logps, 0.0)
    old = jax.lax.stop_gradient(logps) if old_logps is None else jnp.where(valid, old_logps.astype(_F32), 0.0)

    ratio = jnp.exp(logps - old)  # == 1 at padding
    adv = advantages.astype(_F32)[:, None]
    lo, hi = 1.0 - eps_low, 1.0 + eps_high
    pg = -jnp.minimum(ratio * adv, jnp.clip(ratio, lo, hi) * adv)

    if ref_logps is not None:
        ref = jnp.where(valid, ref_logps.astype(_F32), 0.0)
        kl = kl_penalty(logps, ref, kl_estimator, clamp=k3_clamp)  # == 0 at padding
        per_token = pg + jnp.asarray(beta, _F32) * kl
    else:
        kl = None
        per_token = pg

    loss_sum, count = masked_aggregate(per_token, m, agg, max_length)
    pg_sum, _ = masked_aggregate(pg, m, agg, max_length)

    clip_low = (ratio < lo) & (adv < 0) & valid
    clip_high = (ratio > hi) & (adv > 0) & valid
    stats: dict[str, jax.Array] = {
        "loss_sum": loss_sum,
        "count": count,
        "pg_loss_sum": pg_sum,
        "tokens": jnp.sum(m),
        "clip_low_sum": jnp.sum(clip_low.astype(_F32)),
        "clip_high_sum": jnp.sum(clip_high.astype(_F32)),
        "ratio_sum": jnp.sum(ratio * m),
        "ratio_min": jnp.min(jnp.where(valid, ratio, jnp.inf)),
        "ratio_max": jnp.max(jnp.where(valid, ratio, -jnp.inf)),
    }
    if kl is not None:
        stats["kl_sum"] = jnp.sum(kl * m)
    if entropy is not None:
        stats["entropy_sum"] = jnp.sum(jnp.where(valid, jnp.asarray(entropy).astype(_F32), 0.0))
    # Only loss_sum carries gradients; the statistics are for logging.
    stats = {k: v if k == "loss_sum" else jax.lax.stop_gradient(v) for k, v in stats.items()}
    return loss_sum, count, stats


def merge_loss_stats(*stats: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
    """Combine the statistics of several micro-batches (same keys): ``*_min`` by min, ``*_max`` by max,
    the rest by addition. Jittable."""
    if not stats:
        raise ValueError("merge_loss_stats needs at least one stats dict")
    keys = set(stats[0])
    for s in stats[1:]:
        if set(s) != keys:
            raise ValueError(f"stats dicts have different keys: {sorted(keys)} vs {sorted(s)}")
    out: dict[str, jax.Array] = {}
    for k in stats[0]:
        vals = [jnp.asarray(s[k]) for s in stats]
        acc = vals[0]
        for v in vals[1:]:
            if k.endswith("_min"):
                acc = jnp.minimum(acc, v)
            elif k.endswith("_max"):
                acc = jnp.maximum(acc, v)
            else:
                acc = acc + v
        out[k] = acc
    return out


def finalize_loss_stats(stats: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
    """Means from (merged) statistics: ``loss``, ``policy_loss``, ``tokens``, ``clip_frac_low``,
    ``clip_frac_high``, ``clip_frac``, ``ratio_mean``, ``ratio_min``, ``ratio_max`` and, when present,
    ``kl`` and ``entropy`` (float32 scalars; 0 when there is no valid token)."""
    count, tokens = stats["count"], stats["tokens"]
    has = tokens > 0
    out = {
        "loss": _safe_div(stats["loss_sum"], count),
        "policy_loss": _safe_div(stats["pg_loss_sum"], count),
        "tokens": tokens,
        "clip_frac_low": _safe_div(stats["clip_low_sum"], tokens),
        "clip_frac_high": _safe_div(stats["clip_high_sum"], tokens),
        "clip_frac": _safe_div(stats["clip_low_sum"] + stats["clip_high_sum"], tokens),
        "ratio_mean": _safe_div(stats["ratio_sum"], tokens),
        "ratio_min": jnp.where(has, stats["ratio_min"], 0.0),
        "ratio_max": jnp.where(has, stats["ratio_max"], 0.0),
    }
    if "kl_sum" in stats:
        out["kl"] = _safe_div(stats["kl_sum"], tokens)
    if "entropy_sum" in stats:
        out["entropy"] = _safe_div(stats["entropy_sum"], tokens)
    return out


def grpo_loss(
    logps: jax.Array,
    old_logps: jax.Array | None,
    ref_logps: jax.Array | None,
    advantages: jax.Array,
    mask: jax.Array,
    *,
    beta: jax.Array | float,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    agg: LossAggregation = "seq_mean_token_mean",
    kl_estimator: KLEstimator = "k3",
    k3_clamp: float | None = None,
    max_length: int | None = None,
    entropy: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """``(loss, metrics)`` for one batch: ``loss = loss_sum / count`` of `grpo_loss_terms` (0 if count
    is 0) and ``metrics = finalize_loss_stats(stats)``. Same arguments and shapes as `grpo_loss_terms`."""
    _, _, stats = grpo_loss_terms(
        logps, old_logps, ref_logps, advantages, mask, beta=beta, eps_low=eps_low, eps_high=eps_high,
        agg=agg, kl_estimator=kl_estimator, k3_clamp=k3_clamp, max_length=max_length, entropy=entropy,
    )
    metrics = finalize_loss_stats(stats)
    return metrics["loss"], metrics


def sequence_logprobs(logits: jax.Array, tokens: jax.Array) -> jax.Array:
    """Per-token log-probabilities ``log_softmax(logits)[b, t, tokens[b, t]]`` in float32.

    Args:
      logits: ``[B, T, V]`` (any float dtype; upcast to float32). ``logits[:, t]`` must be the
        distribution that scored ``tokens[:, t]``: for a causal LM pass ``logits[:, :-1]`` with
        ``input_ids[:, 1:]``.
      tokens: ``[B, T]`` integer ids in ``[0, V)``.

    Returns:
      ``[B, T]`` float32 (gather minus logsumexp; the full log-softmax is never materialised).
    """
    if logits.ndim != 3 or tuple(tokens.shape) != tuple(logits.shape[:2]):
        raise ValueError(
            f"expected logits [B, T, V] and tokens [B, T], got {tuple(logits.shape)} and {tuple(tokens.shape)}"
        )
    logits = logits.astype(_F32)
    picked = jnp.take_along_axis(logits, tokens.astype(jnp.int32)[..., None], axis=-1)[..., 0]
    return picked - jax.nn.logsumexp(logits, axis=-1)


__all__ = [
    "LOSS_AGGREGATIONS",
    "LossAggregation",
    "aggregation_count",
    "check_aggregation",
    "finalize_loss_stats",
    "grpo_loss",
    "grpo_loss_terms",
    "masked_aggregate",
    "merge_loss_stats",
    "sequence_logprobs",
]
