"""Progressive Thinking Suppression Training (Vision-R1): RL in stages of (max completion length, G, steps).

Stage k caps completions at L_k tokens and samples G_k per prompt; Vision-R1 keeps L_k * G_k constant
(4K x 16, 8K x 8, 16K x 4). The number of prompts per step stays the same, so a stage change changes two
static shapes: at most one new compilation of the sampler and of the update.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Stage:
    max_new_tokens: int
    num_samples: int
    steps: int


def parse_stages(spec: str) -> list[Stage]:
    """'4096x16:100,8192x8:100' -> stages. Raises ValueError naming the malformed part."""
    stages = []
    for part in (p.strip() for p in spec.split(",") if p.strip()):
        try:
            shape, steps = part.split(":")
            tokens, g = shape.lower().split("x")
            stage = Stage(int(tokens), int(g), int(steps))
        except ValueError:
            raise ValueError(f"rl.ptst_stages: cannot parse {part!r}; expected MAX_NEW_TOKENSxG:STEPS, "
                             "e.g. '4096x16:100,8192x8:100'") from None
        if min(stage.max_new_tokens, stage.num_samples, stage.steps) < 1:
            raise ValueError(f"rl.ptst_stages: {part!r} must have positive length, G and steps")
        stages.append(stage)
    return stages


def stage_at(stages: list[Stage], step: int) -> tuple[int, Stage]:
    """(index, stage) in force at 0-based `step`; the last stage continues past the schedule."""
    end = 0
    for i, stage in enumerate(stages):
        end += stage.steps
        if step < end:
            return i, stage
    return len(stages) - 1, stages[-1]


def is_stage_boundary(stages: list[Stage], step: int) -> bool:
    """True when `step` (0-based, just completed steps = step) starts a new stage."""
    end = 0
    for stage in stages[:-1]:
        end += stage.steps
        if step == end:
            return True
    return False
