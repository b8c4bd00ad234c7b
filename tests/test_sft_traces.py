"""Cold-start traces: exact by default, and the simulated imperfect annotator of the embedded demo."""

from __future__ import annotations

import re

from mr1jax.data.sft import annotator_trace, reasoning_trace

_ANSWER = re.compile(r"<think>.+</think><answer>(.+)</answer>")


def _rows(n: int, answer) -> list[dict]:
    return [{"id": f"row-{i}", "question": "How many objects are there?", "answer": answer(i)} for i in range(n)]


def _labels(trace, rows) -> list[str]:
    return [_ANSWER.fullmatch(trace(r)).group(1) for r in rows]


def test_zero_miss_rate_gives_the_exact_trace():
    rows = _rows(50, lambda i: str(i % 7))
    assert [annotator_trace(0.0, 4, seed=0)(r) for r in rows] == [reasoning_trace(r) for r in rows]


def test_annotator_undercounts_only_large_integer_answers():
    rows = _rows(60, lambda i: str(1 + i % 6))
    labels = _labels(annotator_trace(1.0, 4, seed=0), rows)
    for r, label in zip(rows, labels):
        truth = int(r["answer"])
        assert int(label) == (truth - 1 if truth >= 4 else truth)
    text = _rows(5, lambda i: "pentagon")                       # non-integer answers are left alone
    assert _labels(annotator_trace(1.0, 4, seed=0), text) == ["pentagon"] * 5


def test_miss_rate_is_respected_and_labels_are_fixed_per_example_and_seed():
    rows = _rows(4000, lambda i: "5")
    trace = annotator_trace(0.6, 4, seed=3)
    labels = _labels(trace, rows)
    assert set(labels) == {"4", "5"}
    assert 0.57 < labels.count("4") / len(labels) < 0.63
    assert _labels(trace, rows) == labels                          # every epoch sees the same labels
    assert _labels(annotator_trace(0.6, 4, seed=4), rows) != labels  # another seed, another draw
