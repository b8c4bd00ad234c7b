"""CLEVR-like counting: coloured shapes drawn with PIL, "How many <colour> objects are there?".

Answers are correct by construction (counted from the scene description that drew the picture). The
train and held-out splits use disjoint seed streams.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

COLOURS = {"red": (220, 40, 40), "blue": (40, 80, 220), "green": (40, 170, 60), "yellow": (230, 200, 40)}
SHAPES = ("circle", "square")


def draw_scene(objects: list[tuple[str, str, int, int, int]], size: int) -> Image.Image:
    """objects: (colour, shape, x, y, radius) on a grey background."""
    img = Image.new("RGB", (size, size), (140, 140, 140))
    draw = ImageDraw.Draw(img)
    for colour, shape, x, y, r in objects:
        box = [x - r, y - r, x + r, y + r]
        (draw.ellipse if shape == "circle" else draw.rectangle)(box, fill=COLOURS[colour])
    return img


def counting_examples(num: int, *, seed: int, split: str = "train", image_size: int = 56,
                      max_objects: int = 5) -> list[dict]:
    """`num` examples {"image": PIL.Image, "question", "answer", "id"}; deterministic per (seed, split)."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    rng = np.random.default_rng([seed, 0 if split == "train" else 1])
    out = []
    names = list(COLOURS)
    for i in range(num):
        n_obj = int(rng.integers(1, max_objects + 1))
        r = max(3, image_size // 14)
        objects = []
        for _ in range(n_obj):
            x, y = (int(v) for v in rng.integers(r, image_size - r, size=2))
            objects.append((names[int(rng.integers(len(names)))], SHAPES[int(rng.integers(2))], x, y, r))
        target = names[int(rng.integers(len(names)))]
        answer = sum(o[0] == target for o in objects)
        out.append({"image": draw_scene(objects, image_size),
                    "question": f"How many {target} objects are there?",
                    "answer": str(answer), "id": f"counting-{split}-{seed}-{i}"})
    return out
