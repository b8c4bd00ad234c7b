"""Rewards for tests on random tiny models, which never earn the real accuracy reward (every advantage would be 0,
so a GRPO step would not move the parameters and an exact-resume check would hold trivially)."""

from __future__ import annotations

import numpy as np

from mr1jax.trainer import rollout

REAL_REWARD_PARTS = rollout.reward_parts


def text_reward(kind: str):
    """The trainer's scoring with accuracy replaced by a function of the completion text.
    'graded': (sum of code points mod 7) / 6, which differs between a prompt's samples (non-zero advantages);
    'parity': sum of code points mod 2, a mix of right and wrong for pass@k."""
    def reward_parts(texts, answers, timeout_s):
        _, fmt, stats = REAL_REWARD_PARTS(texts, answers, timeout_s)
        codes = [sum(map(ord, t)) for t in texts]
        acc = [c % 7 / 6 for c in codes] if kind == "graded" else [c % 2 for c in codes]
        return np.array(acc, np.float32), fmt, stats
    return reward_parts
