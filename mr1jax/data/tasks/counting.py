"""CLEVR-like counting: coloured shapes drawn with PIL, "How many <colour> objects are there?".

Answers are correct by construction: counted from the scene description that drew the picture, which is
returned with every example (``ex["scene"]``). Objects never touch (at least one background pixel between
their bounding boxes), so every counted object is fully visible and is its own connected blob of its
colour -- the answer can be read back from the pixels.

Splits (shared with the other tasks through `split_index` / `scene_split`):

* deterministic per ``(seed, split)``: each split draws from its own numpy seed stream
  ``default_rng([seed, split_index])`` (``split_index`` 0 = train, 1 = test);
* disjoint by construction: every scene is assigned to exactly one split by a SHA-256 hash of its
  canonical description (`scene_split`; ``TEST_BUCKETS`` of ``NUM_BUCKETS`` hash buckets, i.e. 1/4 of the
  scene space, is held out for test). Each generator rejects candidate scenes of the other split, so no
  test image ever shows a train scene -- for any seeds, any ``num`` and regardless of the question asked.
  The partition depends only on the scene, not on the seed, so it also holds across seeds.
"""

from __future__ import annotations

import hashlib
import itertools

import numpy as np
from PIL import Image, ImageDraw

COLOURS = {"red": (220, 40, 40), "blue": (40, 80, 220), "green": (40, 170, 60), "yellow": (230, 200, 40)}
BACKGROUND = (140, 140, 140)
SHAPES = ("circle", "square")
SPLITS = ("train", "test")
#: A scene belongs to the test split iff its hash bucket (of NUM_BUCKETS) is in TEST_BUCKETS.
NUM_BUCKETS = 4
TEST_BUCKETS = frozenset({0})
#: Attempts to place one object without touching the others before it is dropped (tiny images only).
_PLACE_ATTEMPTS = 100
#: Consecutive candidate scenes of the other split after which a generator gives up (scene space too small).
MAX_REJECTIONS = 10_000


def split_index(split: str) -> int:
    """0 for "train", 1 for "test"; ValueError for anything else."""
    if split not in SPLITS:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    return SPLITS.index(split)


def scene_split(task: str, canonical_scene: object) -> str:
    """The split ("train"/"test") a scene belongs to: a stable hash of ``repr((task, canonical_scene))``.

    ``canonical_scene`` must be built from str/int/tuple only (stable ``repr``) and be the same for any two
    descriptions that draw the same picture (e.g. objects sorted when drawing order does not matter).
    """
    digest = hashlib.sha256(repr((task, canonical_scene)).encode()).digest()
    return "test" if int.from_bytes(digest[:8], "big") % NUM_BUCKETS in TEST_BUCKETS else "train"


def rejected(task: str, attempts: int) -> None:
    """Raise once a generator has rejected `MAX_REJECTIONS` candidates in a row (instead of looping forever)."""
    if attempts >= MAX_REJECTIONS:
        raise RuntimeError(f"{task}: no scene of the requested split in {attempts} draws; the scene space is "
                           "too small for these settings (increase image_size)")


def draw_scene(objects, size: int) -> Image.Image:
    """objects: (colour, shape, x, y, radius) tuples or scene dicts, on a grey background."""
    img = Image.new("RGB", (size, size), BACKGROUND)
    draw = ImageDraw.Draw(img)
    for o in objects:
        colour, shape, x, y, r = (o["colour"], o["shape"], o["x"], o["y"], o["r"]) if isinstance(o, dict) else o
        box = [x - r, y - r, x + r, y + r]
        (draw.ellipse if shape == "circle" else draw.rectangle)(box, fill=COLOURS[colour])
    return img


def _canonical(objects: list[dict], size: int) -> tuple:
    # Objects never overlap, so drawing order does not change the image: sort them.
    return (size, tuple(sorted((o["colour"], o["shape"], o["x"], o["y"], o["r"]) for o in objects)))


def _apart(x: int, y: int, objects: list[dict], r: int) -> bool:
    # Bounding boxes [c - r, c + r] separated by >= 1 background pixel along x or y.
    return all(max(abs(x - o["x"]), abs(y - o["y"])) >= 2 * r + 2 for o in objects)


def _draw_objects(rng: np.random.Generator, image_size: int, max_objects: int) -> list[dict]:
    n_obj = int(rng.integers(1, max_objects + 1))
    r = max(3, image_size // 14)
    names = list(COLOURS)
    objects: list[dict] = []
    for _ in range(n_obj):
        for _ in range(_PLACE_ATTEMPTS):
            x, y = (int(v) for v in rng.integers(r, image_size - r, size=2))
            if _apart(x, y, objects, r):
                break
        else:
            continue  # no room left (only on very small images): the scene has fewer objects
        objects.append({"colour": names[int(rng.integers(len(names)))], "shape": SHAPES[int(rng.integers(2))],
                        "x": x, "y": y, "r": r})
    return objects


def counting_examples(num: int, *, seed: int, split: str = "train", image_size: int = 56,
                      max_objects: int = 5) -> list[dict]:
    """`num` examples {"image": PIL.Image, "question", "answer", "id", "scene"}; deterministic per (seed, split).

    ``scene`` = {"size": image_size, "objects": [{"colour", "shape", "x", "y", "r"}, ...]}; the answer is
    the number of objects whose colour is the one asked about (0 included).
    """
    rng = np.random.default_rng([seed, split_index(split)])
    if image_size < 8:
        raise ValueError(f"image_size must be >= 8, got {image_size}")
    out = []
    names = list(COLOURS)
    for i in range(num):
        for attempt in itertools.count(1):
            objects = _draw_objects(rng, image_size, max_objects)
            if objects and scene_split("counting", _canonical(objects, image_size)) == split:
                break
            rejected("counting", attempt)
        target = names[int(rng.integers(len(names)))]
        answer = sum(o["colour"] == target for o in objects)
        out.append({"image": draw_scene(objects, image_size),
                    "question": f"How many {target} objects are there?",
                    "answer": str(answer), "id": f"counting-{split}-{seed}-{i}",
                    "scene": {"size": image_size, "objects": objects}})
    return out
