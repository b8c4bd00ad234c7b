"""Geometry: one filled regular polygon drawn with PIL, "How many sides does the shape have?" -> "3".."6".

Design (why this and not "Which segment is longer, A or B?"):

* The answer is a small integer, so it goes through exactly the same accuracy check (number match) and
  answer format as `counting`; cross-task transfer then measures the visual skill, not a new answer format.
* It needs no text in the image. Labels "A"/"B" would have to be drawn with a font, whose rendering
  depends on the Pillow/FreeType build (images would not be byte-identical across machines) and is a
  few pixels tall -- about one 14x14 vision patch -- at 56x56.
* Four balanced classes (triangle, square, pentagon, hexagon): chance is 25%, not the 50% of a two-way
  choice, so a rollout group carries more signal for GRPO.
* Learnable by a tiny model at 56x56: the circumradius is 25-40% of the image (14-22 px at 56, so a
  hexagon side is >= 14 px -- one patch), polygons are regular and filled with a solid colour on the
  same grey background as counting, so corners are sharp. Nuisance factors (position, size, rotation,
  colour, two question phrasings) vary so the count of sides is the only thing that predicts the answer.

Vertices are rounded to integer pixels before drawing and stored in ``ex["scene"]``, so the answer
(``len(scene["vertices"])``) and the picture come from the same description. Splits: deterministic per
``(seed, split)`` from ``default_rng([seed, split_index, 1])`` and disjoint by construction through the
scene hash partition of `mr1jax.data.tasks.counting.scene_split` (canonical scene = image size, colour
and the sorted vertex set, so rotations that give the same polygon are the same scene).
"""

from __future__ import annotations

import itertools
import math

import numpy as np
from PIL import Image, ImageDraw

from mr1jax.data.tasks.counting import BACKGROUND, COLOURS, rejected, scene_split, split_index

SIDES = (3, 4, 5, 6)
QUESTIONS = ("How many sides does the shape have?", "How many corners does the shape have?")
_MARGIN = 2            # background pixels kept between the polygon's circumcircle and the image border
_STREAM = 1            # distinguishes this task's seed stream from counting's


def polygon_vertices(sides: int, cx: int, cy: int, radius: int, rotation_deg: int) -> list[tuple[int, int]]:
    """Vertices of the regular polygon, rounded to integer pixels (image y grows downwards)."""
    out = []
    for k in range(sides):
        a = math.radians(rotation_deg) + 2 * math.pi * k / sides
        out.append((int(round(cx + radius * math.cos(a))), int(round(cy + radius * math.sin(a)))))
    return out


def draw_polygon(scene: dict) -> Image.Image:
    img = Image.new("RGB", (scene["size"], scene["size"]), BACKGROUND)
    ImageDraw.Draw(img).polygon(scene["vertices"], fill=COLOURS[scene["colour"]])
    return img


def _radius_range(size: int) -> tuple[int, int]:
    hi = min(round(0.40 * size), (size - 1 - 2 * _MARGIN) // 2)
    lo = min(max(4, round(0.25 * size)), hi)
    return lo, hi


def geometry_examples(num: int, *, seed: int, split: str = "train", image_size: int = 56) -> list[dict]:
    """`num` examples {"image": PIL.Image, "question", "answer", "id", "scene"}; deterministic per (seed, split).

    ``scene`` = {"size", "sides", "cx", "cy", "radius", "rotation_deg", "colour", "vertices": [(x, y), ...]};
    the answer is ``str(len(vertices))`` (= ``sides``).
    """
    rng = np.random.default_rng([seed, split_index(split), _STREAM])
    if image_size < 16:
        raise ValueError(f"image_size must be >= 16, got {image_size}")
    lo, hi = _radius_range(image_size)
    names = list(COLOURS)
    out = []
    for i in range(num):
        for attempt in itertools.count(1):
            sides = SIDES[int(rng.integers(len(SIDES)))]
            radius = int(rng.integers(lo, hi + 1))
            cx, cy = (int(v) for v in rng.integers(radius + _MARGIN, image_size - radius - _MARGIN, size=2))
            rotation = int(rng.integers(360))
            colour = names[int(rng.integers(len(names)))]
            vertices = polygon_vertices(sides, cx, cy, radius, rotation)
            if scene_split("geometry", (image_size, colour, tuple(sorted(vertices)))) == split:
                break
            rejected("geometry", attempt)
        scene = {"size": image_size, "sides": sides, "cx": cx, "cy": cy, "radius": radius,
                 "rotation_deg": rotation, "colour": colour, "vertices": vertices}
        out.append({"image": draw_polygon(scene), "question": QUESTIONS[int(rng.integers(len(QUESTIONS)))],
                    "answer": str(len(vertices)), "id": f"geometry-{split}-{seed}-{i}", "scene": scene})
    return out
