"""Dataset rows (JSONL / Parquet, presets, validation) and the grain RL prompt pipeline."""

from __future__ import annotations

import base64
import io
import json
import re
from pathlib import Path

import numpy as np
import PIL.Image
import PIL.ImageDraw
import pytest

from mr1jax.data.chat import build_messages, format_prompts
from mr1jax.data.pipeline import RLBatch, make_rl_dataset, patches_per_image, prepare_source
from mr1jax.data.rows import PRESETS, DataError, FieldMap, RowSource, extract_answer_tag
from mr1jax.data.tokenizer import load_tokenizer, special_token_ids
from mr1jax.data.vision import num_image_tokens, preprocess_images

try:
    import pyarrow as pa
    import pyarrow.parquet as pq
except ImportError:  # pragma: no cover
    pa = pq = None

needs_pyarrow = pytest.mark.skipif(pq is None, reason="pyarrow not installed")

IMAGE_SIZE = (56, 84)  # -> grid (1, 4, 6): 24 patches, 6 image tokens
BUCKETS = (48, 64, 96, 128)


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer()


def png(i: int, size=(40, 30)) -> bytes:
    """A small distinct PNG: background colour and a rectangle depending on ``i``."""
    im = PIL.Image.new("RGB", size, ((37 * i) % 256, (91 * i) % 256, (53 * i + 20) % 256))
    PIL.ImageDraw.Draw(im).rectangle([i % 10, 2, i % 10 + 12, 20], fill=(255 - i, 10 * (i % 20), 128))
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def write_jsonl(path: Path, records) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def write_images(directory: Path, n: int) -> list[str]:
    (directory / "imgs").mkdir(exist_ok=True)
    names = []
    for i in range(n):
        name = f"imgs/{i}.png"
        (directory / name).write_bytes(png(i))
        names.append(name)
    return names


def generic_jsonl(tmp_path: Path, n: int = 10, *, question=lambda i: f"How many shapes in picture {i}?") -> Path:
    names = write_images(tmp_path, n)
    return write_jsonl(tmp_path / "data.jsonl", [
        {"image": names[i], "question": question(i), "answer": str(i), "id": f"ex{i}"} for i in range(n)
    ])


# ----------------------------------------------------------------------------- rows


def test_generic_jsonl_relative_paths(tmp_path):
    path = generic_jsonl(tmp_path, 4)
    src = RowSource(path, "generic")
    assert len(src) == 4 and src.skipped == 0
    ex = src[2]
    assert ex["image"] == str(tmp_path / "imgs" / "2.png")
    assert Path(ex["image"]).read_bytes() == png(2)
    assert (ex["question"], ex["answer"], ex["id"], ex["row"]) == ("How many shapes in picture 2?", "2", "ex2", 3)
    assert ex["file"] == str(path)
    # image_root overrides the data file's directory
    other = tmp_path / "elsewhere"
    other.mkdir()
    moved = write_jsonl(other / "d.jsonl", [{"image": "imgs/1.png", "question": "q", "answer": "a"}])
    assert RowSource(moved, "generic", image_root=tmp_path)[0]["image"] == str(tmp_path / "imgs" / "1.png")
    with pytest.raises(DataError, match="image file not found"):
        RowSource(moved, "generic")


def test_geometry3k_jsonl_and_generated_ids(tmp_path):
    names = write_images(tmp_path, 3)
    path = write_jsonl(tmp_path / "geo.jsonl", [
        {"images": [names[i], names[(i + 1) % 3]], "problem": f"<image>Find x{i}.", "answer": 3 + i}
        for i in range(3)
    ])
    src = RowSource(path, "geometry3k")
    assert [src[i]["image"] for i in range(3)] == [str(tmp_path / n) for n in names]  # the first image
    assert PRESETS["easyr1"].image_index is None                          # EasyR1: every image, in order
    every = RowSource(path, "easyr1")
    assert [every[i]["images"] for i in range(3)] == [[str(tmp_path / names[i]), str(tmp_path / names[(i + 1) % 3])]
                                                      for i in range(3)]
    assert every.text_fields(0)["num_images"] == 2 and src.text_fields(0)["num_images"] == 1
    assert src[1]["question"] == "<image>Find x1." and src[1]["answer"] == "4"  # numbers become strings
    assert src[1]["id"] == "geo.jsonl:2"
    with pytest.raises(DataError, match=r"geo\.jsonl line 1: field 'question': missing question"):
        RowSource(path, "generic")  # wrong preset: no 'question' field


def test_r1v_answer_extraction(tmp_path):
    assert extract_answer_tag("<think>2+1</think> <answer> 3 </answer>") == "3"
    assert extract_answer_tag("<answer>A</answer><answer>B</answer>") == "A"  # first tag, like R1-V
    assert extract_answer_tag("<answer>x\ny</answer>") == "x\ny"
    assert extract_answer_tag("  7 ") == "7"  # no tag: whole solution
    names = write_images(tmp_path, 3)
    path = write_jsonl(tmp_path / "clevr.jsonl", [
        {"image": names[0], "problem": "How many cubes?", "solution": "<answer> 3 </answer>"},
        {"image": names[1], "question": "How many balls?", "solution": "<think>hm</think><answer>5</answer>"},
        {"image": names[2], "problem": "Color?", "solution": "<answer>  </answer>"},
    ])
    with pytest.raises(DataError, match=r"clevr\.jsonl line 3: field 'solution': empty answer"):
        RowSource(path, "r1v")
    src = RowSource(path, "superclevr", skip_bad_rows=True)
    assert [(ex["question"], ex["answer"]) for ex in src] == [("How many cubes?", "3"), ("How many balls?", "5")]
    assert src.skipped == 1


def test_image_value_forms(tmp_path):
    names = write_images(tmp_path, 1)
    raw = png(5)
    uri = "data:image/png;base64," + base64.b64encode(raw).decode()
    path = write_jsonl(tmp_path / "forms.jsonl", [
        {"image": uri, "question": "q", "answer": "a"},
        {"image": {"bytes": None, "path": names[0]}, "question": "q", "answer": "a"},
        {"image": [names[0]], "question": "q", "answer": "a"},
    ])
    src = RowSource(path, "generic", validate_images=True)
    assert src[0]["image"] == raw
    assert src[1]["image"] == src[2]["image"] == str(tmp_path / names[0])
    b64 = write_jsonl(tmp_path / "b64.jsonl", [{"img": base64.b64encode(raw).decode(), "q": "q", "a": "a"},
                                              {"img": "@@not base64@@", "q": "q", "a": "a"}])
    fm = FieldMap(image="img", question="q", answer="a", image_base64=True)
    with pytest.raises(DataError, match=r"b64\.jsonl line 2: field 'img': invalid base64"):
        RowSource(b64, fm)
    assert RowSource(b64, {"image": "img", "question": "q", "answer": "a", "image_base64": True},
                     skip_bad_rows=True)[0]["image"] == raw


@needs_pyarrow
def test_parquet_presets(tmp_path):
    # HF datasets style: list of {"bytes", "path"} structs (geometry3k / EasyR1).
    geo = tmp_path / "geo.parquet"
    pq.write_table(pa.table({
        "images": [[{"bytes": png(i), "path": None}] for i in range(3)],
        "problem": [f"Find angle {i}." for i in range(3)],
        "answer": [f"{30 * i}" for i in range(3)],
        "extra": list(range(3)),
    }), geo)
    src = RowSource(geo, "geometry3k")
    assert len(src) == 3
    assert src[2]["image"] == png(2) and src[2]["answer"] == "60" and src[2]["id"] == "geo.parquet:3"
    # plain binary image column + R1-V solution + id column
    r1v = tmp_path / "r1v.parquet"
    pq.write_table(pa.table({
        "image": pa.array([png(0), png(1)], type=pa.binary()),
        "problem": ["How many?", "Which?"],
        "solution": ["<answer>2</answer>", "<answer>B</answer>"],
        "id": ["a", "b"],
    }), r1v)
    src = RowSource(r1v, "r1v")
    assert [(ex["image"], ex["answer"], ex["id"]) for ex in src] == [(png(0), "2", "a"), (png(1), "B", "b")]
    # two files concatenate
    both = RowSource([geo, r1v], FieldMap(image=("images", "image"), question="problem",
                                          answer=("answer", "solution"), extract_answer=True))
    assert len(both) == 5 and both[3]["file"] == str(r1v) and both[3]["row"] == 1


def test_bad_rows_raise_with_file_and_row(tmp_path):
    names = write_images(tmp_path, 2)
    good = {"image": names[0], "question": "q", "answer": "a"}
    cases = [
        ({"image": names[0], "question": "q"}, "answer", "missing answer"),
        ({"image": names[0], "question": "   ", "answer": "a"}, "question", "empty question"),
        ({"image": "imgs/nope.png", "question": "q", "answer": "a"}, "image", "image file not found"),
        ({"question": "q", "answer": "a"}, "image", "missing image"),
        ({"image": 17, "question": "q", "answer": "a"}, "image", "unsupported image value"),
    ]
    for k, (bad, field, reason) in enumerate(cases):
        path = write_jsonl(tmp_path / f"bad{k}.jsonl", [good, good, bad])
        with pytest.raises(DataError) as info:
            RowSource(path, "generic")
        err = info.value
        assert (err.file, err.row, err.field) == (str(path), 3, field), (k, str(err))
        assert f"bad{k}.jsonl line 3: field '{field}': {reason}" in str(err)
    # blank lines do not shift line numbers; invalid JSON names its line
    path = tmp_path / "blank.jsonl"
    path.write_text(json.dumps(good) + "\n\n" + "{not json\n")
    with pytest.raises(DataError, match=r"blank\.jsonl line 3: invalid JSON"):
        RowSource(path, "generic")
    # corrupt image bytes: found at load time with validate_images=True
    (tmp_path / "imgs" / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    path = write_jsonl(tmp_path / "corrupt.jsonl", [good, {"image": "imgs/bad.png", "question": "q", "answer": "a"}])
    assert len(RowSource(path, "generic")) == 2  # lazy by default
    with pytest.raises(DataError, match=r"corrupt\.jsonl line 2: field 'image': cannot decode image"):
        RowSource(path, "generic", validate_images=True)


@needs_pyarrow
def test_parquet_corrupt_bytes_named_row(tmp_path):
    path = tmp_path / "c.parquet"
    pq.write_table(pa.table({"image": [png(0), b"not an image", png(2)], "question": ["q"] * 3,
                             "answer": ["a", "b", None]}), path)
    with pytest.raises(DataError, match=r"c\.parquet row 3: field 'answer': missing answer"):
        RowSource(path, "generic")
    with pytest.raises(DataError, match=r"c\.parquet row 2: field 'image': cannot decode image"):
        RowSource(path, "generic", validate_images=True)


def test_skip_bad_rows_counts_and_summary(tmp_path):
    names = write_images(tmp_path, 4)
    (tmp_path / "imgs" / "bad.png").write_bytes(b"corrupt")
    records = [
        {"image": names[0], "question": "q0", "answer": "a0"},
        {"image": names[1], "question": "q1"},                                   # no answer
        {"image": "imgs/missing.png", "question": "q2", "answer": "a2"},         # missing file
        {"image": names[2], "question": "q3", "answer": "a3"},
        {"image": "imgs/bad.png", "question": "q4", "answer": "a4"},             # corrupt
        {"image": names[3], "answer": "a5"},                                     # no question
        {"image": names[3], "question": "q6", "answer": "a6"},
    ]
    path = write_jsonl(tmp_path / "mixed.jsonl", records)
    src = RowSource(path, "generic", skip_bad_rows=True, validate_images=True)
    assert [ex["question"] for ex in src] == ["q0", "q3", "q6"]
    assert [ex["row"] for ex in src] == [1, 4, 7]
    assert src.skipped == 4
    assert [(e.row, e.field) for e in src.skip_reasons] == [(2, "answer"), (3, "image"), (5, "image"), (6, "question")]
    summary = src.summary()
    assert (summary["rows"], summary["kept"], summary["skipped"]) == (7, 3, 4)
    assert summary["skipped_by_field"] == {"answer": 1, "image": 2, "question": 1}
    assert "mixed.jsonl line 3: field 'image': image file not found" in src.summary_text()
    # lazy image validation keeps the corrupt row (it fails when read by the pipeline)
    assert RowSource(path, "generic", skip_bad_rows=True).skipped == 3


# ----------------------------------------------------------------------------- pipeline


def take(iterator, n):
    return [next(iterator) for _ in range(n)]


def test_batch_shapes_and_contents(tmp_path, tokenizer):
    path = generic_jsonl(tmp_path, 10, question=lambda i: "Count the shapes. " * (7 if i == 4 else 1))
    src = RowSource(path, "generic")
    ds = make_rl_dataset(src, tokenizer=tokenizer, batch_size=4, image_size=IMAGE_SIZE,
                         prompt_buckets=BUCKETS, seed=3, system_prompt="Think step by step.",
                         question_template="{question} Answer in \\boxed{}.")
    batches = take(iter(ds), 5)  # crosses the epoch boundary (10 rows, 4 per batch)
    P = patches_per_image(IMAGE_SIZE)
    assert P == (56 // 14) * (84 // 14) == 24
    pad_id = special_token_ids(tokenizer)["image_pad"]
    by_id = {ex["id"]: ex for ex in src}
    lengths_seen = set()
    for b in batches:
        assert isinstance(b, RLBatch) and b.batch_size == 4
        assert b.input_ids.dtype == np.int32 and b.attention_mask.dtype == np.int32
        assert b.seq_len in BUCKETS
        assert b.pixel_values.shape == (4 * P, 1176) and b.pixel_values.dtype == np.float32
        assert b.image_grid_thw.tolist() == [[1, 4, 6]] * 4
        np.testing.assert_array_equal((b.input_ids == pad_id).sum(-1), num_image_tokens(b.image_grid_thw))
        lengths = b.attention_mask.sum(-1)
        lengths_seen.add(b.seq_len)
        assert b.seq_len == (96 if "ex4" in b.ids else 48)  # prompt lengths are 95 (ex4) and 47
        # smallest bucket that fits; left padding
        assert lengths.max() <= b.seq_len and all(bk < lengths.max() for bk in BUCKETS if bk < b.seq_len)
        assert (b.attention_mask[:, -1] == 1).all()
        # same tokens as format_prompts on this batch, same pixels as preprocess_images per image
        exs = [by_id[i] for i in b.ids]
        assert list(b.answers) == [ex["answer"] for ex in exs]
        assert list(b.questions) == [ex["question"] for ex in exs]
        ref = format_prompts(
            tokenizer,
            [build_messages(ex["question"] + " Answer in \\boxed{}.", 1, "Think step by step.") for ex in exs],
            [[6]] * 4, buckets=BUCKETS)
        np.testing.assert_array_equal(b.input_ids, ref.input_ids)
        np.testing.assert_array_equal(b.attention_mask, ref.attention_mask)
        ref_pixels, _ = preprocess_images([ex["image"] for ex in exs], fixed_size=IMAGE_SIZE)
        np.testing.assert_array_equal(b.pixel_values, ref_pixels)
        text = tokenizer.decode(b.input_ids[0][b.attention_mask[0] == 1])
        assert "Think step by step." in text and "Answer in \\boxed{}." in text
    assert lengths_seen == {48, 96}

    single = make_rl_dataset(src, tokenizer=tokenizer, batch_size=4, image_size=IMAGE_SIZE,
                             prompt_buckets=BUCKETS, seed=3, pad_to_max_bucket=True)
    assert {b.seq_len for b in take(iter(single), 3)} == {max(BUCKETS)}


def _ids(batches):
    return [list(b.ids) for b in batches]


def test_order_deterministic_per_seed_and_reshuffled_per_epoch(tmp_path, tokenizer):
    src = RowSource(generic_jsonl(tmp_path, 8), "generic")

    def run(seed, **kw):
        ds = make_rl_dataset(src, tokenizer=tokenizer, batch_size=4, image_size=(28, 28),
                             prompt_buckets=BUCKETS, seed=seed, **kw)
        return _ids(list(iter(ds)))

    a = run(7, num_epochs=3)
    assert len(a) == 6  # 8 rows x 3 epochs / 4, then the iterator ends
    assert a == run(7, num_epochs=3)
    assert a != run(8, num_epochs=3)
    epochs = [a[0] + a[1], a[2] + a[3], a[4] + a[5]]
    for order in epochs:
        assert sorted(order) == sorted(f"ex{i}" for i in range(8))  # each epoch is a permutation
    assert len({tuple(o) for o in epochs}) == 3  # and a different one each epoch
    assert a[0] + a[1] != [f"ex{i}" for i in range(8)]
    unshuffled = run(7, num_epochs=2, shuffle=False)
    assert unshuffled == [[f"ex{i}" for i in range(4)], [f"ex{i}" for i in range(4, 8)]] * 2
    # 8 rows, batch 3, one epoch: the incomplete batch is dropped
    assert len(list(iter(make_rl_dataset(src, tokenizer=tokenizer, batch_size=3, image_size=28,
                                         prompt_buckets=BUCKETS, seed=0, num_epochs=1)))) == 2


def test_iterator_state_restore(tmp_path, tokenizer):
    src = RowSource(generic_jsonl(tmp_path, 10), "generic")

    def build():
        return make_rl_dataset(src, tokenizer=tokenizer, batch_size=3, image_size=IMAGE_SIZE,
                               prompt_buckets=BUCKETS, seed=11)

    it = iter(build())
    take(it, 4)  # 12 rows: past the first epoch (10 rows)
    state = it.get_state()
    json.dumps(state)  # small and serialisable (goes into checkpoints)
    expected = take(it, 4)
    it2 = iter(build())
    take(it2, 1)  # a different position, overwritten by set_state
    it2.set_state(state)
    got = take(it2, 4)
    assert _ids(got) == _ids(expected)
    for g, e in zip(got, expected):
        for name in ("input_ids", "attention_mask", "pixel_values", "image_grid_thw"):
            np.testing.assert_array_equal(getattr(g, name), getattr(e, name))
        assert list(g.answers) == list(e.answers)
    # restoring into the original iterator rewinds it too
    it.set_state(state)
    assert _ids(take(it, 2)) == _ids(expected[:2])


def test_too_long_prompt_named_or_skipped(tmp_path, tokenizer):
    path = generic_jsonl(tmp_path, 6, question=lambda i: "word " * (200 if i == 4 else 3))
    src = RowSource(path, "generic")
    with pytest.raises(DataError, match=r"data\.jsonl line 5: field 'question': prompt has \d+ tokens"):
        make_rl_dataset(src, tokenizer=tokenizer, batch_size=2, image_size=IMAGE_SIZE, prompt_buckets=BUCKETS, seed=0)
    rows, lengths, skipped = prepare_source(src, tokenizer=tokenizer, image_size=IMAGE_SIZE,
                                            prompt_buckets=BUCKETS, skip_bad_rows=True)
    assert len(rows) == 5 and [e.row for e in skipped] == [5] and (lengths <= max(BUCKETS)).all()
    ds = make_rl_dataset(src, tokenizer=tokenizer, batch_size=5, image_size=IMAGE_SIZE, prompt_buckets=BUCKETS,
                         seed=0, num_epochs=1, skip_bad_rows=True)
    (batch,) = list(iter(ds))
    assert sorted(batch.ids) == ["ex0", "ex1", "ex2", "ex3", "ex5"]


def test_undecodable_image_in_pipeline(tmp_path, tokenizer):
    path = generic_jsonl(tmp_path, 6)
    (tmp_path / "imgs" / "3.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    src = RowSource(path, "generic")  # lazy: loads fine
    assert len(src) == 6
    ds = make_rl_dataset(src, tokenizer=tokenizer, batch_size=2, image_size=(28, 28), prompt_buckets=BUCKETS,
                         seed=0, shuffle=False, num_epochs=1)
    it = iter(ds)
    assert list(next(it).ids) == ["ex0", "ex1"]
    with pytest.raises(DataError) as info:
        next(it)
    assert (info.value.file, info.value.row, info.value.field) == (str(path), 4, "image")
    assert re.search(r"data\.jsonl line 4: field 'image': .*cannot decode image", str(info.value))
    # skip_bad_rows (taken from the source) drops the row and keeps batches full
    skipping = RowSource(path, "generic", skip_bad_rows=True)
    ds = make_rl_dataset(skipping, tokenizer=tokenizer, batch_size=2, image_size=(28, 28), prompt_buckets=BUCKETS,
                         seed=0, shuffle=False, num_epochs=1)
    assert _ids(list(iter(ds))) == [["ex0", "ex1"], ["ex2", "ex4"]]  # ex5 alone: dropped remainder


@needs_pyarrow
def test_pipeline_from_parquet_and_in_memory(tmp_path, tokenizer):
    path = tmp_path / "geo.parquet"
    pq.write_table(pa.table({
        "images": [[{"bytes": png(i), "path": None}] for i in range(4)],
        "problem": [f"Find x{i}." for i in range(4)],
        "answer": [str(i) for i in range(4)],
    }), path)
    ds = make_rl_dataset(RowSource(path, "geometry3k"), tokenizer=tokenizer, batch_size=2, image_size=IMAGE_SIZE,
                         prompt_buckets=BUCKETS, seed=1, num_epochs=1)
    batches = list(iter(ds))
    assert len(batches) == 2 and sorted(a for b in batches for a in b.answers) == ["0", "1", "2", "3"]
    # a plain list of dicts (PIL images) works as a source too
    mem = [{"image": PIL.Image.open(io.BytesIO(png(i))), "question": f"q{i}", "answer": f"a{i}"} for i in range(4)]
    ds = make_rl_dataset(mem, tokenizer=tokenizer, batch_size=4, image_size=IMAGE_SIZE, prompt_buckets=BUCKETS,
                         seed=1, num_epochs=1, shuffle=False)
    (b,) = list(iter(ds))
    assert list(b.ids) == ["0", "1", "2", "3"] and list(b.answers) == ["a0", "a1", "a2", "a3"]
    np.testing.assert_array_equal(b.pixel_values[: patches_per_image(IMAGE_SIZE)],
                                  preprocess_images(mem[0]["image"], fixed_size=IMAGE_SIZE)[0])
    with pytest.raises(DataError, match=r"<in-memory source> row 2: field 'answer'"):
        make_rl_dataset([mem[0], {"image": mem[1]["image"], "question": "q"}], tokenizer=tokenizer, batch_size=1,
                        image_size=IMAGE_SIZE, prompt_buckets=BUCKETS, seed=1)


def test_argument_checks(tmp_path, tokenizer):
    src = RowSource(generic_jsonl(tmp_path, 2), "generic")
    kw = dict(tokenizer=tokenizer, batch_size=2, image_size=IMAGE_SIZE, prompt_buckets=BUCKETS, seed=0)
    with pytest.raises(ValueError, match="image_size"):
        make_rl_dataset(src, **{**kw, "image_size": (50, 84)})
    with pytest.raises(ValueError, match="question_template"):
        make_rl_dataset(src, **kw, question_template="no placeholder")
    with pytest.raises(ValueError, match="cannot fill one batch"):
        make_rl_dataset(src, **{**kw, "batch_size": 5}, num_epochs=2)
    with pytest.raises(ValueError, match="seed"):
        make_rl_dataset(src, **{**kw, "seed": -1})
