"""Synthetic visual tasks generated in-process from a seed (no downloads).

Every task is ``fn(num, *, seed, split="train"|"test", image_size=56) -> list[dict]`` with keys ``image``
(RGB PIL image, ``image_size`` square), ``question``, ``answer`` (a short string; both tasks answer a small
integer), ``id`` and ``scene`` (the description that drew the image; the answer is computed from it).
Deterministic per ``(seed, split)``; train and test scenes are disjoint by construction
(`counting.scene_split`).
"""

from mr1jax.data.tasks.counting import counting_examples
from mr1jax.data.tasks.geometry import geometry_examples

TASKS = {"counting": counting_examples, "geometry": geometry_examples}

__all__ = ["TASKS", "counting_examples", "geometry_examples"]
