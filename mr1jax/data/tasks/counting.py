"""CLEVR-like counting: circles and squares of four colours and several sizes drawn with PIL; "How many
objects are there?" (and optionally "How many <colour> objects are there?").

Answers are correct by construction: counted from the scene description that drew the picture, which is
returned with every example (``ex["scene"]``). Objects sit in the cells of a grid aligned with the 14-pixel
vision patches and never touch (at least one background pixel between their bounding boxes), so every
counted object is fully visible and is its own connected blob of its colour -- the answer can be read back
from the pixels.

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


#: Objects sit at the centres of a grid of CELL x CELL pixel cells: one Qwen2-VL vision patch (14 px) each.
CELL = 14


def _place(rng: np.random.Generator, colours: list[str], image_size: int) -> list[dict]:
    """One object per entry of `colours`, each in its own randomly chosen grid cell, radius 4..CELL//2 - 1.

    Cells align with the vision patches, so each patch shows at most one whole object: counting is "how many
    patches show this colour", which a tiny model learns in minutes (free placement splits objects across
    patches and a 2-layer model stays at chance for thousands of steps). On images smaller than one cell
    the whole image is one cell. Objects beyond the number of cells are dropped.
    """
    cell = min(CELL, image_size)
    per_side = image_size // cell
    cells = rng.permutation(per_side * per_side)[:len(colours)]
    r_max = max(1, cell // 2 - 1)
    objects = []
    for colour, k in zip(colours, cells):
        cy, cx = divmod(int(k), per_side)
        r = int(rng.integers(min(4, r_max), r_max + 1))
        objects.append({"colour": colour, "shape": SHAPES[int(rng.integers(2))],
                        "x": cx * cell + cell // 2, "y": cy * cell + cell // 2, "r": r})
    return objects


def counting_examples(num: int, *, seed: int, split: str = "train", image_size: int = 56,
                      max_objects: int = 6, colour_questions: float = 0.0) -> list[dict]:
    """`num` examples {"image": PIL.Image, "question", "answer", "id", "scene"}; deterministic per (seed, split).

    Two question kinds, both with balanced answers:

    * "How many objects are there?" (SuperCLEVR counting, as in R1-V): the number of objects is drawn
      uniformly from 1..max_objects, each of a random colour. Chance accuracy 1 / max_objects.
    * "How many <colour> objects are there?" (a fraction ``colour_questions`` of the examples): the colour's
      count k is uniform in 0..max_objects - 1 and 0..max_objects - k distractors of other colours are added
      (at least one object). This needs binding the colour word to the image; the 2-layer default model
      stays at chance on it for thousands of SFT steps, hence the default of 0.

    ``scene`` = {"size": image_size, "objects": [{"colour", "shape", "x", "y", "r"}, ...]}; the answer is
    counted from the placed objects (0 included).
    """
    rng = np.random.default_rng([seed, split_index(split)])
    if image_size < 8:
        raise ValueError(f"image_size must be >= 8, got {image_size}")
    if max_objects < 1:
        raise ValueError(f"max_objects must be >= 1, got {max_objects}")
    if not 0.0 <= colour_questions <= 1.0:
        raise ValueError(f"colour_questions must be in [0, 1], got {colour_questions}")
    out = []
    names = list(COLOURS)
    for i in range(num):
        for attempt in itertools.count(1):
            if rng.random() < colour_questions:
                target = names[int(rng.integers(len(names)))]
                others = [n for n in names if n != target]
                k = int(rng.integers(0, max_objects))
                d = int(rng.integers(1 if k == 0 else 0, max_objects - k + 1))
                colours = [target] * k + [others[int(j)] for j in rng.integers(len(others), size=d)]
            else:
                target = None
                colours = [names[int(j)] for j in rng.integers(len(names), size=int(rng.integers(1, max_objects + 1)))]
            objects = _place(rng, colours, image_size)
            if objects and scene_split("counting", _canonical(objects, image_size)) == split:
                break
            rejected("counting", attempt)
        if target is None:
            question, answer = "How many objects are there?", len(objects)
        else:
            question, answer = f"How many {target} objects are there?", sum(o["colour"] == target for o in objects)
        out.append({"image": draw_scene(objects, image_size), "question": question,
                    "answer": str(answer), "id": f"counting-{split}-{seed}-{i}",
                    "scene": {"size": image_size, "objects": objects}})
    return out
