"""Synthetic tasks (`mr1jax.data.tasks`): determinism, answers by construction and from pixels, disjoint splits."""

from __future__ import annotations

import math
import re
from collections import Counter

import numpy as np
import pytest

from mr1jax.data.tasks import TASKS, counting_examples, geometry_examples
from mr1jax.data.tasks.counting import BACKGROUND, COLOURS, scene_split

TASK_NAMES = ("counting", "geometry")
_COUNT_Q = re.compile(r"How many (?:(red|blue|green|yellow) )?objects are there\?")


def _counted(e) -> int:
    """The answer recomputed from the scene: all objects, or those of the colour the question names."""
    target = _COUNT_Q.fullmatch(e["question"]).group(1)
    return sum(target is None or o["colour"] == target for o in e["scene"]["objects"])


def _canonical(task: str, scene: dict):
    """Scene identity, independent of the generator's own canonicalisation."""
    if task == "counting":
        return (scene["size"], tuple(sorted(tuple(sorted(o.items())) for o in scene["objects"])))
    return (scene["size"], scene["colour"], tuple(sorted(map(tuple, scene["vertices"]))))


def _pixels(image) -> np.ndarray:
    return np.asarray(image, dtype=np.int32)


def _blobs(mask: np.ndarray) -> int:
    """8-connected components of a boolean mask (flood fill, no scipy)."""
    seen = np.zeros_like(mask)
    h, w = mask.shape
    n = 0
    for y0, x0 in zip(*np.nonzero(mask)):
        if seen[y0, x0]:
            continue
        n += 1
        seen[y0, x0] = True
        stack = [(y0, x0)]
        while stack:
            y, x = stack.pop()
            for dy in (-1, 0, 1):
                for dx in (-1, 0, 1):
                    yy, xx = y + dy, x + dx
                    if 0 <= yy < h and 0 <= xx < w and mask[yy, xx] and not seen[yy, xx]:
                        seen[yy, xx] = True
                        stack.append((yy, xx))
    return n


def _hull(points):
    pts = sorted(set(points))

    def half(ps):
        h = []
        for p in ps:
            while len(h) >= 2 and ((h[-1][0] - h[-2][0]) * (p[1] - h[-2][1])
                                   - (h[-1][1] - h[-2][1]) * (p[0] - h[-2][0])) <= 0:
                h.pop()
            h.append(p)
        return h

    return half(pts)[:-1] + half(pts[::-1])[:-1]


def _corners_from_pixels(image, tol: float = 0.2) -> int:
    """Corners of the drawn convex shape: convex hull of its pixels, then drop hull vertices whose removal
    moves the outline by less than ``tol`` x the shape's radius (digitisation steps along an edge)."""
    mask = (_pixels(image) != BACKGROUND).any(-1)
    ys, xs = np.nonzero(mask)
    pts = [np.array(p, float) for p in _hull(list(zip(xs.tolist(), ys.tolist())))]
    centre = np.mean(pts, axis=0)
    radius = max(np.hypot(*(p - centre)) for p in pts)
    while len(pts) > 3:
        def dev(i):
            a, b, c = pts[i - 1], pts[i], pts[(i + 1) % len(pts)]
            ca, ba = c - a, b - a
            return abs(ca[0] * ba[1] - ca[1] * ba[0]) / np.hypot(*ca)
        i = min(range(len(pts)), key=dev)
        if dev(i) >= tol * radius:
            break
        pts.pop(i)
    return len(pts)


# ---------------------------------------------------------------------------------------------------------
# API, determinism, images
# ---------------------------------------------------------------------------------------------------------

def test_registry_and_common_signature():
    assert TASKS == {"counting": counting_examples, "geometry": geometry_examples}
    for name in TASK_NAMES:
        ex = TASKS[name](3, seed=0, split="test", image_size=28)     # the call mr1jax.train makes
        assert len(ex) == 3
        for e in ex:
            assert set(e) >= {"image", "question", "answer", "id", "scene"}
            assert isinstance(e["question"], str) and isinstance(e["answer"], str) and e["answer"].isdigit()
        assert len({e["id"] for e in ex}) == 3 and all(f"{name}-test-0-" in e["id"] for e in ex)


@pytest.mark.parametrize("task", TASK_NAMES)
def test_deterministic_per_seed_and_split(task):
    def fingerprint(seed, split):
        return [(e["image"].tobytes(), e["question"], e["answer"], repr(e["scene"]))
                for e in TASKS[task](40, seed=seed, split=split)]

    a = fingerprint(7, "train")
    assert a == fingerprint(7, "train")
    assert fingerprint(7, "test") == fingerprint(7, "test")
    other_seed, other_split = fingerprint(8, "train"), fingerprint(7, "test")
    for other in (other_seed, other_split):
        assert other != a
        assert len({f[0] for f in a} & {f[0] for f in other}) == 0     # not even one image in common
    # a prefix of a longer request is the shorter request
    assert fingerprint(7, "train")[:10] == [(e["image"].tobytes(), e["question"], e["answer"], repr(e["scene"]))
                                            for e in TASKS[task](10, seed=7, split="train")]


@pytest.mark.parametrize("task", TASK_NAMES)
@pytest.mark.parametrize("size", [28, 56, 84])
def test_images_are_rgb_of_requested_size(task, size):
    for e in TASKS[task](5, seed=1, split="train", image_size=size):
        assert e["image"].mode == "RGB" and e["image"].size == (size, size)
        assert e["scene"]["size"] == size
        assert (_pixels(e["image"]) != BACKGROUND).any()                # something is drawn


@pytest.mark.parametrize("task", TASK_NAMES)
@pytest.mark.parametrize("split", ["val", "eval", "Train", "", None])
def test_bad_split_is_rejected(task, split):
    with pytest.raises(ValueError, match="split must be 'train' or 'test'"):
        TASKS[task](2, seed=0, split=split)


# ---------------------------------------------------------------------------------------------------------
# Answers by construction and from the pixels
# ---------------------------------------------------------------------------------------------------------

def test_counting_answers_from_scene():
    for split in ("train", "test"):
        for e in counting_examples(300, seed=3, split=split, max_objects=5, colour_questions=0.5):
            objects = e["scene"]["objects"]
            assert 1 <= len(objects) <= 5
            assert e["answer"] == str(_counted(e))
            for o in objects:
                assert o["colour"] in COLOURS and o["shape"] in ("circle", "square")
                assert 0 <= o["x"] - o["r"] and o["x"] + o["r"] < e["scene"]["size"]
                assert 0 <= o["y"] - o["r"] and o["y"] + o["r"] < e["scene"]["size"]
            for i, a in enumerate(objects):                                # never touching
                for b in objects[i + 1:]:
                    assert max(abs(a["x"] - b["x"]), abs(a["y"] - b["y"])) > a["r"] + b["r"] + 1


def test_counting_max_objects():
    assert max(len(e["scene"]["objects"]) for e in counting_examples(100, seed=0, max_objects=2)) == 2


@pytest.mark.parametrize("size", [28, 56])
def test_counting_answers_from_pixels(size):
    """Count 8-connected blobs of the asked colour in the image itself."""
    examples = counting_examples(16, seed=11, split="test", image_size=size, colour_questions=0.5)
    assert len({e["answer"] for e in examples}) >= 2
    assert {_COUNT_Q.fullmatch(e["question"]).group(1) is None for e in examples} == {True, False}
    for e in examples:
        px = _pixels(e["image"])
        target = _COUNT_Q.fullmatch(e["question"]).group(1)
        colours = COLOURS.values() if target is None else [COLOURS[target]]
        assert str(sum(_blobs((px == c).all(-1)) for c in colours)) == e["answer"]
        # every pixel is background or one of the palette colours, and every object is its own blob
        known = (px == BACKGROUND).all(-1) | np.any([(px == c).all(-1) for c in COLOURS.values()], axis=0)
        assert known.all()
        assert sum(_blobs((px == c).all(-1)) for c in COLOURS.values()) == len(e["scene"]["objects"])
        for o in e["scene"]["objects"]:
            assert tuple(px[o["y"], o["x"]]) == COLOURS[o["colour"]]


def test_geometry_answers_from_scene():
    for split in ("train", "test"):
        for e in geometry_examples(300, seed=3, split=split):
            s = e["scene"]
            n = len(s["vertices"])
            assert e["answer"] == str(n) and s["sides"] == n and n in (3, 4, 5, 6)
            assert e["question"] in ("How many sides does the shape have?", "How many corners does the shape have?")
            assert 0.25 * s["size"] - 1 <= s["radius"] <= 0.40 * s["size"] + 1
            for k, (x, y) in enumerate(s["vertices"]):                   # a regular polygon with these params
                a = math.radians(s["rotation_deg"]) + 2 * math.pi * k / n
                assert abs(x - (s["cx"] + s["radius"] * math.cos(a))) <= 0.5
                assert abs(y - (s["cy"] + s["radius"] * math.sin(a))) <= 0.5
                assert 0 <= x < s["size"] and 0 <= y < s["size"]
            # each vertex is a real corner: turn of about 360/n degrees, same direction all round
            v = np.array(s["vertices"], float)
            for k in range(n):
                e1, e2 = v[k] - v[k - 1], v[(k + 1) % n] - v[k]
                turn = math.degrees(math.atan2(e1[0] * e2[1] - e1[1] * e2[0], e1 @ e2))
                assert abs(turn - 360 / n) < 12


@pytest.mark.parametrize("size", [28, 56])
def test_geometry_answers_from_pixels(size):
    examples = geometry_examples(24, seed=5, split="test", image_size=size)
    assert {e["answer"] for e in examples} == {"3", "4", "5", "6"}
    for e in examples:
        s = e["scene"]
        assert str(_corners_from_pixels(e["image"])) == e["answer"]
        # the image is the scene's polygon: pixels more than one pixel inside are its colour, more than
        # one pixel outside are background
        px = _pixels(e["image"])
        ys, xs = np.mgrid[0:size, 0:size]
        v = np.array(s["vertices"], float)
        depth = np.full((size, size), np.inf)
        for k in range(len(v)):
            a, b = v[k], v[(k + 1) % len(v)]
            nx, ny = a[1] - b[1], b[0] - a[0]               # inward normal for the vertices' orientation
            depth = np.minimum(depth, ((xs - a[0]) * nx + (ys - a[1]) * ny) / math.hypot(nx, ny))
        assert (px[depth > 1] == COLOURS[s["colour"]]).all()
        assert (px[depth < -1] == BACKGROUND).all()
        assert (depth > 1).sum() > 0.3 * s["radius"] ** 2


@pytest.mark.parametrize("task,min_distinct", [("counting", 4), ("geometry", 4)])
def test_answer_distribution_not_degenerate(task, min_distinct):
    for split in ("train", "test"):
        counts = Counter(e["answer"] for e in TASKS[task](500, seed=0, split=split))
        assert len(counts) >= min_distinct, counts
        assert counts.most_common(1)[0][1] < 0.6 * 500, counts
    if task == "geometry":                                               # four balanced classes
        assert set(counts) == {"3", "4", "5", "6"} and min(counts.values()) > 0.15 * 500
    else:                                                                # counts 1..6, balanced
        assert set(counts) == {"1", "2", "3", "4", "5", "6"} and min(counts.values()) > 0.1 * 500


def test_colour_questions_are_balanced_and_mixed_in_at_the_requested_rate():
    ex = counting_examples(1000, seed=0, colour_questions=0.3)
    coloured = [e for e in ex if _COUNT_Q.fullmatch(e["question"]).group(1)]
    assert 0.25 < len(coloured) / len(ex) < 0.35
    counts = Counter(e["answer"] for e in coloured)
    assert set(counts) == {"0", "1", "2", "3", "4", "5"} and min(counts.values()) > 0.08 * len(coloured)
    with pytest.raises(ValueError, match="colour_questions"):
        counting_examples(1, seed=0, colour_questions=1.5)


# ---------------------------------------------------------------------------------------------------------
# Train / test disjointness
# ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("task", TASK_NAMES)
def test_train_and_test_are_disjoint(task):
    def keyed(seed, split):
        ex = TASKS[task](500, seed=seed, split=split)
        return ({(e["question"], _canonical(task, e["scene"])) for e in ex},
                {_canonical(task, e["scene"]) for e in ex}, {e["image"].tobytes() for e in ex})

    train, test = keyed(0, "train"), keyed(0, "test")
    assert len(train[0]) > 450 and len(test[0]) > 450                    # mostly distinct within a split
    for a, b in zip(train, test):
        assert not a & b
    other = keyed(1, "train")                                            # the partition holds across seeds
    assert not other[1] & test[1] and not other[2] & test[2]


@pytest.mark.parametrize("task", TASK_NAMES)
def test_disjoint_even_when_the_scene_space_is_tiny(task):
    """16x16 images (a few thousand possible scenes): independent draws would share many scenes."""
    kw = {"max_objects": 1} if task == "counting" else {}
    train = TASKS[task](500, seed=0, split="train", image_size=16, **kw)
    test = TASKS[task](500, seed=0, split="test", image_size=16, **kw)
    tr = {_canonical(task, e["scene"]) for e in train}
    te = {_canonical(task, e["scene"]) for e in test}
    assert len(tr) < 500 and len(te) < 500                               # repeats within a split: space is small
    assert not tr & te
    assert not {e["image"].tobytes() for e in train} & {e["image"].tobytes() for e in test}


def test_every_scene_lies_in_its_splits_hash_partition():
    for split in ("train", "test"):
        for e in counting_examples(100, seed=2, split=split):
            objs = tuple(sorted((o["colour"], o["shape"], o["x"], o["y"], o["r"]) for o in e["scene"]["objects"]))
            assert scene_split("counting", (e["scene"]["size"], objs)) == split
        for e in geometry_examples(100, seed=2, split=split):
            s = e["scene"]
            assert scene_split("geometry", (s["size"], s["colour"], tuple(sorted(s["vertices"])))) == split
    # roughly a quarter of the scene space is held out
    held = [scene_split("geometry", (56, "red", ((i, 0), (0, i), (i, i)))) for i in range(2000)]
    assert 0.2 < held.count("test") / len(held) < 0.3


def test_generators_give_up_instead_of_looping_when_a_split_has_no_scenes(monkeypatch):
    import mr1jax.data.tasks.counting as counting
    import mr1jax.data.tasks.geometry as geometry

    monkeypatch.setattr(counting, "MAX_REJECTIONS", 50)
    for module in (counting, geometry):
        monkeypatch.setattr(module, "scene_split", lambda task, scene: "train")
    for fn in (counting_examples, geometry_examples):
        assert len(fn(3, seed=0, split="train")) == 3
        with pytest.raises(RuntimeError, match="scene space is"):
            fn(1, seed=0, split="test")


@pytest.mark.parametrize("task,size", [("counting", 7), ("geometry", 15)])
def test_too_small_image_is_rejected(task, size):
    with pytest.raises(ValueError, match="image_size must be"):
        TASKS[task](1, seed=0, image_size=size)
