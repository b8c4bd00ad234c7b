"""Watching a run's steps: skipped (non-finite) updates, loss / gradient-norm spikes, the time left."""

from __future__ import annotations

import collections
from typing import Any

import numpy as np

from mr1jax.trainer.metrics import recent_step_time


class TrainingDivergedError(RuntimeError):
    """`optim.max_consecutive_skips` steps in a row had a non-finite loss or gradient norm."""


class StepWatch:
    """Counts consecutive skipped (non-finite) steps and reports spikes: a value above `factor` x the running
    median of its last 50 finite values (and above its floor). Watched: the SFT loss and, in both phases, the
    gradient norm (GRPO's loss is centred on 0, so its spikes show in the gradient norm), with the clipping
    threshold as floor (smaller norms are noise around a tiny median, larger ones are clipped)."""

    def __init__(self, max_skips: int, factor: float, grad_clip: float = 0.0):
        self.max_skips, self.factor, self.skips = max_skips, factor, 0
        self.floor = {"sft_loss": 0.0, "grad_norm": grad_clip}
        self.history: dict[str, collections.deque] = {}

    def reset(self) -> None:                                 # a new phase: other scales
        self.history.clear()

    def __call__(self, step: int, metrics: dict[str, Any], say) -> None:
        if metrics.get("skipped"):
            self.skips += 1
            say(f"warning: step {step}: non-finite loss or gradient norm ({_fmt(metrics)}); update skipped, "
                f"{self.skips} step(s) in a row")
            if self.skips >= self.max_skips:
                raise TrainingDivergedError(
                    f"training diverged: {self.skips} steps in a row (up to step {step}) had a non-finite loss or "
                    f"gradient norm (config.optim.max_consecutive_skips = {self.max_skips}); their updates were "
                    "skipped and every saved checkpoint is finite. Lower the learning rate (config.optim."
                    "learning_rate / config.sft.learning_rate) or config.optim.grad_clip and rerun: it resumes from "
                    "the newest checkpoint")
            return
        self.skips = 0
        for key in ("sft_loss", "grad_norm"):
            v = metrics.get(key)
            if v is None or not np.isfinite(v):
                continue
            hist = self.history.setdefault(key, collections.deque(maxlen=50))
            med = float(np.median(hist)) if len(hist) >= 10 else None
            if self.factor and med and abs(v) > max(self.factor * med, self.floor[key]):
                say(f"warning: step {step}: {key} spike {v:.4g} (> {self.factor:g} x running median {med:.4g})")
            hist.append(abs(v))


def rl_step_cost_ratio(prompts: int, num_samples: int, prompt_len: int, max_new_tokens: int, *, kl: bool,
                       old_pass: bool) -> float:
    """How many SFT steps one RL step costs, counted in token passes (an estimate until RL steps are timed).

    An SFT step runs forward + backward (3 passes) over `prompts` rows of S = prompt_len + max_new_tokens tokens.
    An RL step over R = prompts x num_samples rows: the decode (R x max_new_tokens tokens, one pass), the
    reference pass when the KL term is on, the pi_old pass with several updates per batch, and the update
    (3 passes): R (T + S kl + S old + 3 S) / (3 prompts S). Decode runs at lower efficiency than a full pass,
    so this tends to price RL low."""
    seq = prompt_len + max_new_tokens
    rows = prompts * num_samples
    rl = rows * (max_new_tokens + seq * (int(kl) + int(old_pass) + 3))
    return rl / (3 * prompts * seq)


def eta_text(step: int, end: int, sft_steps: int, step_times: list[float], rl_ratio: float = 0.0) -> str:
    """The remaining time of the whole run at the current phase's recent step time. During SFT with RL to follow,
    the RL steps are priced at `rl_ratio` SFT steps each (`rl_step_cost_ratio`) until RL steps are timed."""
    per = recent_step_time(step_times)
    if step < sft_steps < end:
        sft_left = (sft_steps - step) * per
        rl_left = (end - sft_steps) * per * rl_ratio
        return (f"eta ~{sft_left + rl_left:.0f}s (SFT {sft_left:.0f}s + {end - sft_steps} RL steps ~{rl_left:.0f}s, "
                "estimated)")
    return f"eta {(end - step) * per:.0f}s"


def _fmt(metrics: dict[str, Any]) -> str:
    return ", ".join(f"{k} {metrics[k]:.4g}" for k in ("sft_loss", "loss", "grad_norm") if k in metrics)
