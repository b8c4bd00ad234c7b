"""TFDS datasets (array_record, no tensorflow): prepare, read back, per-process shards, errors, training."""

from __future__ import annotations

import base64
import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import tensorflow_datasets as tfds

from mr1jax.data.pipeline import make_rl_dataset
from mr1jax.data.prepare import main as prepare_main
from mr1jax.data.prepare import PrepareError, prepare_files, prepare_task
from mr1jax.data.rows import DataError, RowSource
from mr1jax.data.sft import sft_examples_for_step
from mr1jax.data.tasks import TASKS
from mr1jax.data.tfds_builders import task_config
from mr1jax.data.tfds_source import TfdsError, TfdsSource, open_tfds
from mr1jax.data.tokenizer import load_tokenizer

ROOT = Path(__file__).resolve().parents[1]
N = 11  # rows: odd, so 2 shards drop one row per epoch


def test_tensorflow_is_not_needed():
    assert "tensorflow" not in sys.modules


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer()


def png(i: int) -> bytes:
    buf = io.BytesIO()
    PIL.Image.new("RGB", (30 + i, 20), ((40 * i) % 256, 90, 200 - i)).save(buf, format="PNG")
    return buf.getvalue()


def write_rows(directory: Path, n: int = N, corrupt: int | None = None, missing_answer: int | None = None) -> Path:
    """A JSONL of n rows with images (even rows: a file path, odd rows: a base64 data URI)."""
    directory.mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(n):
        data = b"definitely not an image" if i == corrupt else png(i)
        if i % 2 == 0:
            (directory / f"{i}.png").write_bytes(data)
            image = f"{i}.png"
        else:
            image = "data:image/png;base64," + base64.b64encode(data).decode()
        row = {"image": image, "question": f"What is {i} + 1?", "answer": str(i + 1), "id": f"ex{i}"}
        if i == missing_answer:
            del row["answer"]
        lines.append(json.dumps(row))
    path = directory / "train.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """(the JSONL, the prepared dataset directory)."""
    tmp = tmp_path_factory.mktemp("tfds")
    data = write_rows(tmp / "src")
    summary = prepare_files([str(data)], out=str(tmp / "out"), name="toy", log=lambda _: None)
    return data, summary["dir"]


def test_prepared_dataset_round_trips_rows(prepared):
    data, directory = prepared
    rows, src = RowSource([data], "generic"), open_tfds(directory)
    assert len(src) == len(rows) == N
    for i in range(N):
        want, got = rows[i], src[i]
        image = want["image"] if isinstance(want["image"], bytes) else Path(want["image"]).read_bytes()
        assert got == {"image": image, "question": want["question"], "answer": want["answer"], "id": f"ex{i}",
                       "file": str(data), "row": i + 1}
    # the same dataset through plain TFDS (images decoded by tfds) and by every spelling of its location
    ds = tfds.data_source("toy", data_dir=str(Path(directory).parents[1]), split="train")
    assert ds[3]["image"].shape == (20, 33, 3) and ds[3]["question"] == b"What is 3 + 1?"
    for spec in (str(Path(directory).parent), str(Path(directory).parents[1])):
        assert open_tfds(spec)[5] == src[5]


def test_prepare_cli_reports_progress_and_refuses_to_overwrite(tmp_path, capsys):
    data = write_rows(tmp_path / "src", n=5)
    args = [f"--files={data}", f"--out={tmp_path / 'out'}", "--name=cli", "--progress_every=2"]
    summary = prepare_main(args)
    err = capsys.readouterr().err
    assert summary["splits"] == {"train": 5} and summary["skipped"] == 0
    assert "cli train: 2 rows" in err and "cli train: 4 rows" in err and "rows/s" in err
    with pytest.raises(SystemExit) as exit_info:
        prepare_main(args)
    assert exit_info.value.code == 2 and "already prepared" in capsys.readouterr().err
    assert prepare_main(args + ["--overwrite"])["splits"] == {"train": 5}


def test_bad_rows_at_prepare_time_name_file_and_line(tmp_path):
    data = write_rows(tmp_path, n=6, corrupt=3, missing_answer=4)
    with pytest.raises(DataError, match=r"train.jsonl line 4: field 'image': cannot decode image"):
        prepare_files([str(data)], out=str(tmp_path / "out"), log=lambda _: None)
    summary = prepare_files([str(data)], out=str(tmp_path / "out"), skip_bad_rows=True, log=lambda _: None)
    assert summary["skipped"] == 2 and summary["splits"] == {"train": 4}
    assert [r["row"] for r in open_tfds(summary["dir"])] == [1, 2, 3, 6]


def test_corrupt_prepared_row_is_named_by_source_file_and_line(tmp_path, tokenizer):
    data = write_rows(tmp_path, n=4, corrupt=2)
    summary = prepare_files([str(data)], out=str(tmp_path / "out"), validate_images=False, log=lambda _: None)
    ds = make_rl_dataset(open_tfds(summary["dir"]), tokenizer=tokenizer, batch_size=4, image_size=28,
                         prompt_buckets=(64,), seed=0, num_epochs=1, read_threads=1)
    with pytest.raises(DataError, match=rf"{data} line 3: field 'image'"):
        next(iter(ds))


def ids_of(ds) -> list[str]:
    return [i for batch in ds for i in batch.ids]


def test_two_processes_read_disjoint_shards_covering_every_row_once_per_epoch(prepared, tokenizer):
    _, directory = prepared
    kw = dict(tokenizer=tokenizer, batch_size=1, image_size=28, prompt_buckets=(64,), seed=3, num_epochs=2,
              read_threads=1)
    shards = [ids_of(make_rl_dataset(open_tfds(directory), shard_index=i, shard_count=2, **kw)) for i in (0, 1)]
    assert [len(s) for s in shards] == [N] * 2                                   # lockstep: equal batch counts
    merged = [x for pair in zip(*shards) for x in pair]                          # the global batches, in order
    one = ids_of(make_rl_dataset(open_tfds(directory), **{**kw, "batch_size": 2}))
    assert merged == one                                          # exactly the batches of one process of 2 prompts
    for epoch in range(2):                                        # every row once per epoch, read by one process
        assert sorted(merged[epoch * N:(epoch + 1) * N]) == sorted(f"ex{i}" for i in range(N))
    assert merged[:N] != merged[N:]                                              # reshuffled every epoch


def test_shards_stay_equal_when_rows_are_skipped(tokenizer):
    rows = [{"image": png(i), "question": "word " * (300 if i == 4 else 2), "answer": "1"} for i in range(9)]
    kw = dict(tokenizer=tokenizer, batch_size=1, image_size=28, prompt_buckets=(64,), seed=0, num_epochs=1,
              read_threads=1, skip_bad_rows=True)
    shards = [ids_of(make_rl_dataset(rows, shard_index=i, shard_count=2, **kw)) for i in (0, 1)]
    assert len(shards[0]) == len(shards[1]) == 4 and not set(shards[0]) & set(shards[1])
    assert set(shards[0]) | set(shards[1]) == {str(i) for i in range(9)} - {"4"}     # 8 kept rows, none left over
    for i in (0, 1):                          # without skipping, every process names the row and stops
        with pytest.raises(DataError, match="row 5: field 'question'"):
            ids_of(make_rl_dataset(rows, shard_index=i, shard_count=2, **{**kw, "skip_bad_rows": False}))
    with pytest.raises(ValueError, match="shard_index"):
        make_rl_dataset(rows, shard_index=2, shard_count=2, **kw)


def test_sft_shards_are_slices_of_the_global_batch():
    rows = [{"id": i} for i in range(13)]
    for epoch_steps in (range(0, 3), range(3, 6)):                               # 13 // 4 = 3 steps per epoch
        seen = [[e["id"] for s in epoch_steps for e in sft_examples_for_step(rows, s, 2, 0, i, 2)] for i in (0, 1)]
        assert not set(seen[0]) & set(seen[1]) and len(set(seen[0]) | set(seen[1])) == 12
    for step in range(5):
        assert (sft_examples_for_step(rows, step, 2, 0, 0, 2) + sft_examples_for_step(rows, step, 2, 0, 1, 2)
                == sft_examples_for_step(rows, step, 4, 0))
    with pytest.raises(ValueError):
        sft_examples_for_step(rows, 0, 2, 0, 2, 2)


def test_sharded_iterator_state_resumes_exactly(prepared, tokenizer):
    _, directory = prepared
    make = lambda: make_rl_dataset(open_tfds(directory), tokenizer=tokenizer, batch_size=2,  # noqa: E731
                                   image_size=28, prompt_buckets=(64,), seed=1, shard_index=1, shard_count=2,
                                   read_threads=1)
    it = iter(make())
    [next(it) for _ in range(3)]
    state = it.get_state()
    want = [list(next(it).ids) for _ in range(3)]
    again = iter(make())
    again.set_state(state)
    assert [list(next(again).ids) for _ in range(3)] == want


_READ_SHARD = """
import sys
from mr1jax.data.pipeline import make_rl_dataset
from mr1jax.data.tfds_source import open_tfds
from mr1jax.data.tokenizer import load_tokenizer
ds = make_rl_dataset(open_tfds(sys.argv[1]), tokenizer=load_tokenizer(), batch_size=1, image_size=28,
                     prompt_buckets=(64,), seed=0, num_epochs=1, read_threads=1,
                     shard_index=int(sys.argv[2]), shard_count=2)
print(" ".join(i for b in ds for i in b.ids))
assert "tensorflow" not in sys.modules
"""


def test_two_python_processes_read_disjoint_shards(prepared):
    _, directory = prepared
    env = {**__import__("os").environ, "PYTHONPATH": str(ROOT)}
    procs = [subprocess.Popen([sys.executable, "-c", _READ_SHARD, directory, str(i)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env) for i in (0, 1)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
    ids = [o[0].split() for o in outs]
    assert len(ids[0]) == len(ids[1]) == N // 2 and not set(ids[0]) & set(ids[1])
    assert set(ids[0]) | set(ids[1]) <= {f"ex{i}" for i in range(N)}


def test_synthetic_task_builders_are_registered_and_offline(tmp_path):
    config = task_config(6, 3, seed=2, image_size=28)
    ds = tfds.data_source("mr1jax_geometry", data_dir=str(tmp_path), split="test", builder_kwargs={"config": config})
    want = TASKS["geometry"](3, seed=2, split="test", image_size=28)
    assert len(ds) == 3 and [r["answer"].decode() for r in ds] == [w["answer"] for w in want]
    assert ds[0]["image"].shape == (28, 28, 3)
    summary = prepare_task("counting", out=str(tmp_path / "c"), num=5, num_test=2, image_size=28, log=lambda _: None)
    src = open_tfds(summary["dir"])
    assert [r["question"] for r in src] == [w["question"] for w in TASKS["counting"](5, seed=0, image_size=28)]
    assert src[4]["file"] == "counting:train:seed0" and src[4]["row"] == 5
    with pytest.raises(PrepareError, match="image_size"):
        prepare_task("counting", out=str(tmp_path), image_size=30)


def test_bad_tfds_spec_is_named(tmp_path):
    with pytest.raises(TfdsError, match="no such directory"):
        TfdsSource(str(tmp_path / "missing" / "x"))
    with pytest.raises(TfdsError, match="no prepared TFDS dataset"):
        TfdsSource(str(tmp_path))
    with pytest.raises(TfdsError, match="no such TFDS dataset"):
        TfdsSource("no_such_dataset_here", data_dir=str(tmp_path))


# ------------------------------------------------------------------------------------- config and training


def tiny_config(tfds_dir: str, **overrides):
    from configs.grpo import get_config

    c = get_config()
    c.mode, c.optim.warmup_steps, c.total_steps = "grpo", 0, 2
    c.model.tiny.hidden_size, c.model.tiny.vision_depth = 64, 1
    c.data.tfds, c.data.batch_size, c.data.image_size, c.data.prompt_bucket = tfds_dir, 2, 28, 64
    c.rollout.num_samples, c.rollout.max_new_tokens = 2, 6
    c.eval.every_steps, c.eval.num_batches = 0, 1
    c.checkpoint.every_steps, c.checkpoint.async_save, c.export_hf = 2, False, False
    for k, v in overrides.items():
        group, leaf = k.split(".")
        c[group][leaf] = v
    return c


@pytest.mark.parametrize("spec, match", [
    ("/nonexistent/tfds/dir", r"config.data.tfds = '/nonexistent/tfds/dir': /nonexistent/tfds/dir: no such directory"),
    ("not_a_dataset", r"config.data.tfds = 'not_a_dataset': not_a_dataset: no such TFDS dataset"),
])
def test_bad_config_data_tfds_is_named_before_anything_is_built(spec, match, tmp_path):
    from mr1jax.trainer.config import ConfigError, validate_config
    from mr1jax.trainer.loop import train_and_evaluate

    c = tiny_config(spec, **{"data.tfds_data_dir": str(tmp_path)})
    with pytest.raises(ConfigError, match=match):
        validate_config(c)
    with pytest.raises(ConfigError, match=match):
        train_and_evaluate(c, str(tmp_path / "run"))
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_bad_config_data_tfds_with_train_files(prepared):
    from mr1jax.trainer.config import ConfigError, validate_config

    data, directory = prepared
    with pytest.raises(ConfigError, match="config.data.tfds = .* and config.data.train_files = .*: set one of them"):
        validate_config(tiny_config(directory, **{"data.train_files": str(data)}))


@pytest.mark.slow
def test_trains_two_steps_on_a_prepared_tfds_dataset(prepared, tmp_path):
    from mr1jax.trainer.loop import train_and_evaluate

    _, directory = prepared
    out = train_and_evaluate(tiny_config(directory), str(tmp_path / "run"))
    assert np.isfinite(out["reward"]) and "eval_accuracy" not in out      # no test split: no eval
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines if "reward" in x] == [1, 2]


def test_build_rows_reads_train_and_test_splits(prepared, tmp_path):
    import json as _json

    from mr1jax.trainer.build import build_rows
    from mr1jax.trainer.config import run_dir_conflicts

    data, directory = prepared
    c = tiny_config(directory)
    assert isinstance(build_rows(c, "train"), TfdsSource) and build_rows(c, "eval") is None   # no test split
    with_test = prepare_files([str(data)], out=str(tmp_path), name="two", eval_files=[str(data)], log=lambda _: None)
    c = tiny_config(with_test["dir"])
    assert build_rows(c, "eval").split == "test" and len(build_rows(c, "eval")) == N
    saved = _json.loads(c.to_json_best_effort())
    del saved["data"]["tfds"]                                   # a run dir written before the field existed
    assert run_dir_conflicts(tiny_config(""), saved) == []
    assert run_dir_conflicts(tiny_config(directory), saved) == [f"config.data.tfds: this run {directory!r}, the "
                                                                "dir's run None"]


def test_prepare_parquet_with_presets(tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    geo = tmp_path / "geo.parquet"
    pq.write_table(pa.table({"images": [[{"bytes": png(i), "path": None}] for i in range(3)],
                             "problem": [f"Find x{i}." for i in range(3)], "answer": ["1", "2", "3"]}), geo)
    r1v = tmp_path / "clevr.jsonl"
    r1v.write_text("".join(json.dumps({"image": "data:image/png;base64," + base64.b64encode(png(i)).decode(),
                                       "problem": f"How many? {i}", "solution": f"<answer> {i} </answer>"}) + "\n"
                           for i in range(2)))
    a = open_tfds(prepare_files([str(geo)], out=str(tmp_path / "o"), fields="geometry3k", log=lambda _: None)["dir"])
    assert [(r["question"], r["answer"], r["image"], r["row"], r["id"]) for r in a] == \
        [(f"Find x{i}.", str(i + 1), png(i), i + 1, f"geo.parquet:{i + 1}") for i in range(3)]
    assert a[0]["file"] == str(geo)
    b = open_tfds(prepare_files([str(r1v)], out=str(tmp_path / "o"), fields="r1v", log=lambda _: None)["dir"])
    assert [(r["answer"], r["file"], r["row"]) for r in b] == [("0", str(r1v), 1), ("1", str(r1v), 2)]
