"""GRPO building blocks: KL estimators and coefficient schedules, group advantages, the clipped loss.

All functions are pure and jittable (names and shapes are checked on the host at trace time):

- `kl_penalty` (k1 / k2 / k3 per token) and ``step -> beta`` schedules: `constant`, `othink_dynamic`
  (OThink-MR1 Eq. 3), `linear`, `cosine`, `make_schedule`;
- `group_advantages` (group / batch / no std scaling) and `nonconstant_groups`;
- `grpo_loss_terms` ((loss_sum, count, stats), exact under micro-batching), `grpo_loss`,
  `merge_loss_stats`, `finalize_loss_stats`, `aggregation_count`, `sequence_logprobs`.
"""

from mr1jax.rl.advantages import ADVANTAGE_SCALES, AdvantageScale, group_advantages, nonconstant_groups
from mr1jax.rl.kl import (
    KL_ESTIMATORS,
    SCHEDULE_NAMES,
    KLEstimator,
    Schedule,
    check_kl_estimator,
    constant,
    cosine,
    kl_penalty,
    linear,
    make_schedule,
    othink_dynamic,
)
from mr1jax.rl.losses import (
    LOSS_AGGREGATIONS,
    LossAggregation,
    aggregation_count,
    check_aggregation,
    finalize_loss_stats,
    grpo_loss,
    grpo_loss_terms,
    masked_aggregate,
    merge_loss_stats,
    sequence_logprobs,
)

__all__ = [
    "ADVANTAGE_SCALES",
    "AdvantageScale",
    "KLEstimator",
    "KL_ESTIMATORS",
    "LOSS_AGGREGATIONS",
    "LossAggregation",
    "SCHEDULE_NAMES",
    "Schedule",
    "aggregation_count",
    "check_aggregation",
    "check_kl_estimator",
    "constant",
    "cosine",
    "finalize_loss_stats",
    "group_advantages",
    "grpo_loss",
    "grpo_loss_terms",
    "kl_penalty",
    "linear",
    "make_schedule",
    "masked_aggregate",
    "merge_loss_stats",
    "nonconstant_groups",
    "othink_dynamic",
    "sequence_logprobs",
]
