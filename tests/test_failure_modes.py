"""Failure modes of the trainer (issue 10): divergence, corrupt checkpoints, a shared work dir, a rerun with another
model, degenerate configs, resume bookkeeping. Each reproduces the failure on the tiny config cut to a few steps."""

from __future__ import annotations

import glob
import json
import os
import time

import jax
import numpy as np
import pytest

from mr1jax.trainer.checkpoint import Checkpointer, WorkdirLock, WorkdirLockedError
from mr1jax.trainer.config import ConfigError, validate_config
from mr1jax.trainer.loop import train_and_evaluate
from mr1jax.trainer.watch import StepWatch, TrainingDivergedError
from tests.test_train import _params, tiny_config


def _rows(workdir):
    return [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]


def _all_checkpoints_finite_and_loadable(workdir) -> list[int]:
    ck = Checkpointer(os.path.join(workdir, "checkpoints"), async_save=False)
    steps = ck.all_steps()
    for step in steps:
        meta = ck.manager.item_metadata(step)["state"]
        abstract = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), meta,
                                is_leaf=lambda m: hasattr(m, "shape"))
        state, _ = ck.restore(step, abstract)                  # verifies the fingerprints too
        for path, x in jax.tree_util.tree_leaves_with_path(state):
            if np.issubdtype(np.asarray(x).dtype, np.floating):
                assert np.isfinite(np.asarray(x)).all(), (step, jax.tree_util.keystr(path))
    ck.close()
    return steps


def test_divergence_skips_non_finite_updates_then_stops(tmp_path):
    """SFT at lr 1e30: the loss turns non-finite after the first real update; those updates are skipped, the
    run stops after max_consecutive_skips of them, and every checkpoint it saved is finite and loads."""
    c = tiny_config(mode="sft", **{"sft.steps": 8, "sft.learning_rate": 1e30, "checkpoint.every_steps": 1,
                                   "checkpoint.max_to_keep": 20, "optim.max_consecutive_skips": 3})
    with pytest.raises(TrainingDivergedError, match=r"3 steps in a row .* non-finite loss or gradient norm"):
        train_and_evaluate(c, str(tmp_path))
    rows = [r for r in _rows(tmp_path) if "sft_loss" in r]
    skipped = [r["step"] for r in rows if r["skipped"]]
    assert len(skipped) == 3 and skipped == list(range(skipped[0], skipped[0] + 3)) and rows[-1]["step"] == skipped[-1]
    assert all(r["sft_loss"] is None or np.isfinite(r["sft_loss"]) for r in rows)   # NaN written as JSON null
    assert any(r["sft_loss"] is None for r in rows)
    steps = _all_checkpoints_finite_and_loadable(tmp_path)
    assert max(steps) == skipped[-1] - 1                      # saved up to the last step before the stop
    assert not (tmp_path / "summary.json").exists()


def test_step_watch_reports_spikes_and_counts_skips():
    lines = []
    watch = StepWatch(max_skips=2, factor=10.0, grad_clip=1.0)
    for step in range(12):
        watch(step, {"sft_loss": 1.0, "grad_norm": 0.5, "skipped": 0}, lines.append)
    watch(12, {"sft_loss": 25.0, "grad_norm": 0.5, "skipped": 0}, lines.append)
    watch(13, {"sft_loss": 1.0, "grad_norm": 0.9, "skipped": 0}, lines.append)    # under the clip: noise
    assert lines == ["warning: step 12: sft_loss spike 25 (> 10 x running median 1)"]
    watch(14, {"sft_loss": float("nan"), "grad_norm": float("nan"), "skipped": 1}, lines.append)
    watch(15, {"sft_loss": 1.0, "grad_norm": 0.5, "skipped": 0}, lines.append)  # a finite step resets the count
    watch(16, {"sft_loss": float("nan"), "skipped": 1}, lines.append)
    with pytest.raises(TrainingDivergedError, match="2 steps in a row"):
        watch(17, {"sft_loss": float("nan"), "skipped": 1}, lines.append)


def _flip_byte(step_dir):
    data = max(glob.glob(os.path.join(step_dir, "state", "**", "d", "*"), recursive=True), key=os.path.getsize)
    b = bytearray(open(data, "rb").read())
    b[len(b) // 2] ^= 0x10
    open(data, "wb").write(b)
    return data


def test_corrupt_checkpoint_fallback_exact_resume_and_run_dir_rules(tmp_path, capsys, graded_reward):
    """One short run, then: a flipped byte in its latest checkpoint -> the rerun falls back to the previous one
    (saying so) and resumes exactly, metrics.jsonl keeps one line per step, wall time adds up; a second run
    on the locked dir and a rerun with another model size both stop before touching anything."""
    run = str(tmp_path)
    train_and_evaluate(tiny_config(), run)                          # checkpoints 2 and 4
    step, want = _params(run)
    assert step == 4 and len(_rows(run)) > 0
    _, at_2 = _params(run, 2)                                       # RL moved the policy between the saves
    moved = [k for k in want if "['params']" in k and not np.array_equal(want[k], at_2[k])]
    assert len(moved) > len([k for k in want if "['params']" in k]) // 2, moved
    ck = Checkpointer(os.path.join(run, "checkpoints"), async_save=False)
    elapsed_at_2 = ck.read_meta(2)["elapsed_s"]
    ck.close()
    _flip_byte(os.path.join(run, "checkpoints", "4"))
    capsys.readouterr()

    t0 = time.perf_counter()
    train_and_evaluate(tiny_config(), run)                          # falls back to step 2, redoes 3 and 4
    segment = time.perf_counter() - t0
    out = capsys.readouterr().out
    assert "warning: checkpoint step 4" in out and ("do not match the fingerprints" in out or "cannot read" in out)
    assert "fell back to checkpoint step 2" in out and "resumed from step 2" in out
    assert glob.glob(os.path.join(run, "checkpoints_bad", "4-*"))
    step, got = _params(run)
    assert step == 4 and got.keys() == want.keys()
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)
    assert [r["step"] for r in _rows(run) if "loss" in r] == [1, 2, 3, 4]     # no duplicated steps after resume
    wall = json.loads((tmp_path / "summary.json").read_text())["wall_time_s"]
    assert elapsed_at_2 < wall <= elapsed_at_2 + segment + 0.2              # cumulative over both segments
    assert [json.loads(line)["pid"] for line in open(os.path.join(run, "runs.jsonl"))] == [os.getpid()] * 2

    # another run holds the dir: stop at once, naming the holder
    config_json = (tmp_path / "config.json").read_bytes()
    with WorkdirLock(run):
        with pytest.raises(WorkdirLockedError, match=rf"is in use by another run: pid {os.getpid()} on "):
            train_and_evaluate(tiny_config(), run)
    # a rerun with another model size: named fields, config.json / runs.jsonl / checkpoints untouched
    before = sorted(os.listdir(os.path.join(run, "checkpoints")))
    with pytest.raises(ConfigError, match=r"config.model.tiny.hidden_size: this run 32, the dir's run 64"):
        train_and_evaluate(tiny_config(**{"model.tiny.hidden_size": 32}), run)
    assert (tmp_path / "config.json").read_bytes() == config_json
    assert len(open(os.path.join(run, "runs.jsonl")).readlines()) == 2
    assert sorted(os.listdir(os.path.join(run, "checkpoints"))) == before


def test_flipped_byte_fails_the_fingerprint_and_falls_back(tmp_path):
    import jax.numpy as jnp

    ck = Checkpointer(tmp_path / "ck", async_save=False)
    state = lambda v: {"params": {"w": jnp.arange(4000.0) * v, "b": jnp.ones(3)}}  # noqa: E731
    ck.save(1, state(1.0), {"step": 1})
    ck.save(2, state(2.0), {"step": 2})
    _flip_byte(str(tmp_path / "ck" / "2"))
    lines = []
    step, restored, meta = ck.restore_latest_good(lambda s: state(0.0), warn=lines.append)
    assert step == 1 and meta == {"step": 1}
    np.testing.assert_array_equal(restored["params"]["w"], state(1.0)["params"]["w"])
    assert lines[0].startswith("warning: checkpoint step 2: 1 array(s) in ") and lines[0].endswith(
        "do not match the fingerprints recorded at save (corrupted on disk?): params/w")
    assert "fell back to checkpoint step 1" in lines[-1] and ck.all_steps() == [1]
    ck.close()


def test_all_checkpoints_bad_names_them(tmp_path):
    import jax.numpy as jnp

    ck = Checkpointer(tmp_path / "ck", async_save=False)
    ck.save(1, {"w": jnp.arange(300.0)}, {"step": 1})
    (tmp_path / "ck" / "1" / "meta" / "metadata").write_text('{"step": 1,')    # a broken meta file
    with pytest.raises(Exception, match=r"no usable checkpoint in .*ck; every one is bad:\n  checkpoint step 1: "
                                        r"cannot read .*ck/1/meta: JSONDecodeError"):
        ck.restore_latest_good(lambda step: {"w": jnp.zeros(300)}, warn=lambda msg: None)
    from mr1jax.trainer.checkpoint import NonFiniteStateError
    with pytest.raises(NonFiniteStateError, match=r"refusing to save checkpoint step 2 .* w \(1 values\)"):
        ck.save(2, {"w": jnp.array([1.0, jnp.inf])}, {"step": 2})
    assert ck.all_steps() == [1]
    ck.close()


@pytest.mark.parametrize("field, value, match", [
    ("rl.warmup_fracton", 0.3, r"config.rl.warmup_fracton: unknown field \(did you mean config.rl.warmup_fraction\?\)"),
    ("optim.lr", 0.1, r"config.optim.lr: unknown field"),
])
def test_unknown_fields_named_with_closest(field, value, match):
    with pytest.raises(ConfigError, match=match):
        validate_config(tiny_config(**{field: value}))


def test_export_and_eval_on_empty_dir_say_one_line_and_exit_2(tmp_path, capsys):
    from mr1jax import eval as ev
    from mr1jax import export

    for main in (export.main, ev.main):
        with pytest.raises(SystemExit) as e:
            main([f"--workdir={tmp_path}"])
        assert e.value.code == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and str(tmp_path) in err and "Traceback" not in err


def test_sft_batch_names_bad_rows_and_skips_them(tmp_path):
    """The SFT path: a corrupt image names its file and line; with skip_bad_rows the row is replaced by a spare
    one and the batch keeps its size."""
    from mr1jax.data.rows import DataError, RowSource
    from mr1jax.data.sft import sft_batch
    from mr1jax.data.tokenizer import load_tokenizer
    from tests.test_train import _write_rows

    rows = RowSource(_write_rows(tmp_path, 4, corrupt_row=1))
    tok = load_tokenizer()
    with pytest.raises(DataError, match=r"train.jsonl line 2: field 'image': \(.*img1.png\): cannot decode image"):
        sft_batch(tok, rows[:2], image_size=28, seq_len=96)
    b = sft_batch(tok, rows[:2], image_size=28, seq_len=96, skip_bad_rows=True, spare=rows[2:])
    assert b["input_ids"].shape == (2, 96) and b["image_grid_thw"].shape == (2, 3)
    with pytest.raises(DataError, match=r"train.jsonl line 2.*no good row left"):
        sft_batch(tok, rows[:2], image_size=28, seq_len=96, skip_bad_rows=True)


def test_unknown_override_and_missing_workdir_on_the_command_line():
    import subprocess
    import sys

    from mr1jax.train import check_overrides

    assert check_overrides(["--config=configs/grpo.py", "--config.rl.warmup_fracton=0.2"]) == (
        "--config.rl.warmup_fracton: unknown config field (did you mean config.rl.warmup_fraction?)")
    assert check_overrides(["--config=configs/grpo.py", "--config.rl.warmup_fraction=0.2"]) is None
    proc = subprocess.run([sys.executable, "-m", "mr1jax.train", "--config=configs/grpo.py"], capture_output=True,
                          text=True, timeout=300, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert proc.returncode != 0 and "--workdir" in proc.stderr and "Traceback" not in proc.stderr
