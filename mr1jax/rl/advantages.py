"""Group-relative advantages for GRPO.

Rewards arrive as one flat vector ``[N]`` whose rows are grouped contiguously: rows
``[g * G, (g + 1) * G)`` are the G completions of prompt ``g`` (the layout the grouped-rollout sampler
produces). Everything here is jittable; shape checks run on the host (shapes are static under jit).

**Which standard deviation.** The default is the *unbiased* sample std (``ddof=1``, divide by G - 1).
OThink-MR1 builds on R1-V, which uses TRL's GRPOTrainer, and TRL (like verl and EasyR1) computes the
group std with ``torch.Tensor.std()``, which is unbiased. Using the same estimator keeps advantage
magnitudes, and therefore effective step sizes at a given learning rate and the relative weight of the
KL term, identical to the runs the papers report. For G = 8 the two differ by sqrt(8/7) ~ 1.069.
Pass ``ddof=0`` for the population std. (With G = 1 and ``ddof=1`` the std is defined as 0, giving a
zero advantage, rather than NaN.)
"""

from __future__ import annotations

import functools
from typing import Literal

import jax
import jax.numpy as jnp

AdvantageScale = Literal["group", "batch", "none"]
ADVANTAGE_SCALES: tuple[str, ...] = ("group", "batch", "none")


def _check_rewards(rewards: jax.Array, group_size: int) -> int:
    """Host-side checks; returns the number of groups."""
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size must be a positive int, got {group_size!r}")
    if rewards.ndim != 1:
        raise ValueError(f"rewards must be a 1-D array [N], got shape {tuple(rewards.shape)}")
    n = rewards.shape[0]
    if n == 0 or n % group_size != 0:
        raise ValueError(
            f"number of rewards N={n} is not a positive multiple of group_size={group_size} "
            "(rows of one group must be contiguous: N = num_prompts * group_size)"
        )
    return n // group_size


def _float(rewards: jax.Array) -> jax.Array:
    return rewards.astype(jnp.promote_types(rewards.dtype, jnp.float32))


def nonconstant_groups(rewards: jax.Array, group_size: int) -> jax.Array:
    """Which groups have at least two different rewards.

    Args:
      rewards: ``[N]``, groups contiguous.
      group_size: G; N must be a multiple of G.

    Returns:
      ``[N // G]`` bool, False for groups whose rewards are all equal (their advantages are all 0 and
      they carry no policy-gradient signal; DAPO-style dynamic sampling drops them). Use
      ``jnp.repeat(keep, G)`` for a per-row mask.
    """
    rewards = jnp.asarray(rewards)
    num_groups = _check_rewards(rewards, group_size)
    r = rewards.reshape(num_groups, group_size)
    return jnp.max(r, axis=1) != jnp.min(r, axis=1)


def group_advantages(
    rewards: jax.Array,
    group_size: int,
    *,
    scale: AdvantageScale = "group",
    eps: float = 1e-6,
    ddof: int = 1,
) -> jax.Array:
    """GRPO advantages ``A_i`` from per-completion rewards.

    With ``mean_g`` the mean of row i's group:

    - ``scale="group"``: ``(r_i - mean_g) / (std_g + eps)``  (group z-score; OThink-MR1, Vision-R1);
    - ``scale="batch"``: ``(r_i - mean_g) / (std(all N rewards) + eps)``  (TRL ``scale_rewards="batch"``);
    - ``scale="none"``:  ``r_i - mean_g``  (Dr. GRPO).

    The std uses ``ddof`` (default 1, unbiased, matching TRL/verl: see the module docstring). A group
    whose rewards are all equal gets exactly 0 (its centred values are set to 0 explicitly, since
    ``r - mean(r)`` need not round to 0, e.g. three rewards of 0.1), never NaN; likewise a batch whose
    rewards are all equal has batch std exactly 0.

    Args:
      rewards: ``[N]`` rewards, groups of ``group_size`` contiguous rows.
      group_size: G (static Python int).
      scale: ``"group"``, ``"batch"`` or ``"none"``.
      eps: added to the std in the denominator (may be traced).
      ddof: 1 (unbiased, default) or 0 (population).

    Returns:
      ``[N]`` advantages, float32 (or float64 when given float64 with x64 enabled).

    Raises:
      ValueError (host side): N not a positive multiple of G, rewards not 1-D, unknown ``scale``, bad
      ``ddof``.
    """
    if scale not in ADVANTAGE_SCALES:
        raise ValueError(f"unknown advantage scale {scale!r}; expected one of {', '.join(ADVANTAGE_SCALES)}")
    if ddof not in (0, 1):
        raise ValueError(f"ddof must be 0 or 1, got {ddof!r}")
    rewards = _float(jnp.asarray(rewards))
    _check_rewards(rewards, group_size)
    return _group_advantages(rewards, eps, group_size, scale, int(ddof))


@functools.partial(jax.jit, static_argnums=(2, 3, 4))
def _group_advantages(rewards: jax.Array, eps: jax.Array | float, group_size: int, scale: str, ddof: int) -> jax.Array:
    """The kernel of `group_advantages` (arguments already validated); ``[N] -> [N]``."""
    r = rewards.reshape(-1, group_size)
    constant_group = jnp.max(r, axis=1, keepdims=True) == jnp.min(r, axis=1, keepdims=True)
    centred = jnp.where(constant_group, 0.0, r - jnp.mean(r, axis=1, keepdims=True))
    if scale == "none":
        return centred.reshape(-1)
    if scale == "group":
        var = jnp.sum(jnp.square(centred), axis=1, keepdims=True) / max(group_size - ddof, 1)
    else:  # batch
        n = rewards.shape[0]
        batch_centred = jnp.where(jnp.max(rewards) == jnp.min(rewards), 0.0, rewards - jnp.mean(rewards))
        var = jnp.sum(jnp.square(batch_centred)) / max(n - ddof, 1)
    denom = jnp.sqrt(var) + eps
    # Exact 0 (not 0/0 = NaN when eps == 0) wherever the centred reward is 0.
    return jnp.where(centred == 0, 0.0, centred / jnp.where(denom > 0, denom, 1.0)).reshape(-1)


__all__ = [
    "ADVANTAGE_SCALES",
    "AdvantageScale",
    "group_advantages",
    "nonconstant_groups",
]
