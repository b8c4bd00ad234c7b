"""Synthetic rows at several image sizes and aspect ratios (to exercise native resolution end to end).

`mixed_sizes(rows, seed)` places each row's square scene on a canvas of the background colour whose width and
height are drawn per row (aspect ratio 1/3 to 3, scale 1 to 3 times the scene): the objects, and so the
answer, are unchanged, while every image gets its own size and, under native resolution, its own patch grid.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from mr1jax.data.tasks.counting import BACKGROUND


def mixed_sizes(rows: list[dict], seed: int, *, max_aspect: float = 3.0, max_scale: float = 3.0) -> list[dict]:
    """Copies of `rows` whose images sit on canvases of varied size and aspect ratio (deterministic per seed)."""
    rng = np.random.default_rng([seed, 7919])
    out = []
    for row in rows:
        image = row["image"]
        side = max(image.size)
        aspect = float(np.exp(rng.uniform(-np.log(max_aspect), np.log(max_aspect))))
        scale = float(rng.uniform(1.0, max_scale))
        width = max(image.width, int(round(side * scale * np.sqrt(aspect))))
        height = max(image.height, int(round(side * scale / np.sqrt(aspect))))
        canvas = Image.new("RGB", (width, height), BACKGROUND)
        x, y = (int(v) for v in rng.integers(0, [width - image.width + 1, height - image.height + 1]))
        canvas.paste(image, (x, y))
        out.append({**row, "image": canvas})
    return out
