"""`python -m mr1jax.eval`: checkpoint vs exported HF model, sampled pass@k on user rows, error messages."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from configs.grpo import get_config
from mr1jax import eval as ev
from tests.text_rewards import text_reward
from mr1jax.trainer.build import restore_params
from mr1jax.trainer.evaluation import pass_metrics
from mr1jax.data.tasks import TASKS, counting_examples

NEW_TOKENS = 6


def tiny_config(train_files: str):
    c = get_config()
    c.mode, c.optim.warmup_steps = "grpo", 0                     # the demo's SFT phase and sizes: too slow here
    c.model.tiny.hidden_size, c.model.tiny.vision_depth = 64, 1
    c.total_steps = 1
    c.model.tiny.num_layers = 1                                  # compile time
    c.data.num_train, c.data.num_eval, c.data.batch_size = 8, 4, 2
    c.data.image_size, c.data.prompt_bucket = 28, 64
    c.data.train_files, c.data.fields = train_files, "generic"   # no eval files: the run skips its final eval
    c.rollout.num_samples, c.rollout.max_new_tokens = 2, NEW_TOKENS
    c.rl.beta_schedule, c.rl.beta = "constant", 0.0              # no reference model
    c.eval.every_steps, c.eval.num_batches = 0, 1
    c.checkpoint.async_save = False
    c.export_hf = True
    return c


def write_rows(directory, n: int, name: str = "rows.jsonl"):
    """A generic-preset JSONL file whose images are PNG files next to it (relative paths)."""
    lines = []
    for i, ex in enumerate(counting_examples(n, seed=3, image_size=28)):
        ex["image"].save(directory / f"img{i}.png")
        lines.append(json.dumps({"image": f"img{i}.png", "question": ex["question"], "answer": ex["answer"]}))
    path = directory / name
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A one-step training run (checkpoint at step 1 and the exported `hf/` directory) and its rows file."""
    import mr1jax.trainer.rollout
    import mr1jax.trainer.loop

    root = tmp_path_factory.mktemp("eval_run")
    rows = write_rows(root, 4)
    workdir = root / "run"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(mr1jax.trainer.rollout, "reward_parts", text_reward("graded"))
        mr1jax.trainer.loop.train_and_evaluate(tiny_config(str(rows)), str(workdir))
    assert (workdir / "checkpoints" / "1").is_dir() and (workdir / "hf" / "config.json").is_file()
    return workdir, rows


def _finite_numbers(obj) -> bool:
    if isinstance(obj, dict):
        return all(_finite_numbers(v) for v in obj.values())
    if isinstance(obj, list):
        return all(_finite_numbers(v) for v in obj)
    return not isinstance(obj, float) or math.isfinite(obj)


METRICS = ("accuracy", "format_rate", "completion_len", "truncated_frac", "mean_token_logprob", "num_examples",
           "num_samples", "num_completions", "num_skipped")


def test_checkpoint_and_exported_hf_model_give_identical_greedy_results(run, tmp_path, capsys):
    workdir, _ = run
    out = ev.main([f"--workdir={workdir}", "--task=counting", "--num_examples=3"])
    captured = capsys.readouterr()
    assert json.loads(captured.out) == out                          # the JSON on stdout
    assert "batch 2/2" in captured.err and "accuracy" in captured.err  # progress on stderr
    saved = json.loads((workdir / "eval_counting.json").read_text())  # default output: DIR/eval_<task>.json
    assert saved == out and _finite_numbers(saved)
    assert out["num_examples"] == 3 and out["num_completions"] == 3 and out["num_skipped"] == 0
    assert "pass_at_k" not in out
    assert out["model"]["kind"] == "checkpoint" and out["model"]["step"] == 1
    assert out["decoding"]["greedy"] and out["decoding"]["max_new_tokens"] == NEW_TOKENS  # the run's config
    assert out["data"]["image_size"] == 28 and out["data"]["prompt_bucket"] == 64
    assert 0 < out["completion_len"] <= NEW_TOKENS and 0 <= out["truncated_frac"] <= 1
    # every held-out prompt once, in order (3 prompts in batches of 2: the padded last batch is dropped)
    expected = counting_examples(3, seed=0, split="test", image_size=28)
    assert [s["question"] for s in out["samples"]] == [e["question"] for e in expected]
    assert [s["answer"] for s in out["samples"]] == [e["answer"] for e in expected]
    assert [s["id"] for s in out["samples"]] == [0, 1, 2]

    # the exported HF directory of the same run: run defaults (image size, template, ...) found next to it
    hf_out = ev.main([f"--hf_path={workdir / 'hf'}", "--task=counting", "--num_examples=3",
                      f"--output={tmp_path / 'hf.json'}"])
    assert json.loads((tmp_path / "hf.json").read_text()) == hf_out
    assert hf_out["model"]["kind"] == "hf" and hf_out["model"]["dtype"] == "float32"
    for key in METRICS + ("data", "samples"):
        assert hf_out[key] == out[key], key
    assert hf_out["decoding"] == out["decoding"]


def test_restore_params_loads_the_trained_checkpoint(run):
    import jax
    from flax import nnx
    import ml_collections

    from mr1jax.parallel import sharding
    from mr1jax.models.qwen2_vl.hf import load_pretrained
    from mr1jax.trainer.build import build_model

    workdir, _ = run
    config = ml_collections.ConfigDict(json.loads((workdir / "config.json").read_text()))
    model, _ = build_model(config, sharding.make_mesh({"data": 1, "fsdp": -1, "tensor": 1}))
    leaves = lambda m: [np.asarray(x) for x in jax.tree.leaves(nnx.state(m, nnx.Param))]  # noqa: E731
    init = leaves(model)
    restore_params(model, str(workdir), 1)
    restored, exported = leaves(model), leaves(load_pretrained(workdir / "hf", dtype=np.float32))
    assert len(restored) == len(exported) == len(init)
    for a, b in zip(restored, exported):
        np.testing.assert_array_equal(a, b)
    assert any(not np.array_equal(a, b) for a, b in zip(restored, init))   # the step moved the parameters


def test_sampled_pass_at_k_on_jsonl_rows_is_reproducible(run, tmp_path, monkeypatch):
    import mr1jax.trainer.rollout

    workdir, rows = run
    monkeypatch.setattr(mr1jax.trainer.rollout, "reward_parts", text_reward("parity"))
    args = [f"--workdir={workdir}", f"--data_files={rows}", "--fields=generic", "--temperature=1.0",
            "--num_samples=2", "--num_shown=4"]   # batch 2 x G 2: the training rollout's shapes
    first = ev.main(args + ["--seed=5", f"--output={tmp_path / 'a.json'}"])
    again = ev.main(args + ["--seed=5", f"--output={tmp_path / 'b.json'}"])
    other = ev.main(args + ["--seed=6", f"--output={tmp_path / 'c.json'}"])
    strip = lambda r: {k: v for k, v in r.items() if k not in ("time_s", "output")}  # noqa: E731
    assert strip(first) == strip(again)                             # same seed, same completions and metrics
    texts = lambda r: [s["completion"] for s in r["samples"]]  # noqa: E731
    assert texts(first) != texts(other)                             # the seed is used
    assert first["num_examples"] == 4 and first["num_completions"] == 8 and first["num_samples"] == 2
    assert first["data"]["files"] == [str(rows)] and first["decoding"]["temperature"] == 1.0
    # all 4 prompts shown with both samples: the metrics must agree with the per-sample verdicts
    assert [(s["id"], s["sample"]) for s in first["samples"]] == [(i, j) for i in range(4) for j in range(2)]
    correct = np.array([s["correct"] for s in first["samples"]], np.float64).reshape(4, 2)
    assert correct.any() and not correct.all()                      # the parity reward gives a mix
    assert first["accuracy"] == pytest.approx(correct.mean())
    assert first["pass_at_k"] == pytest.approx(correct.any(1).mean())
    assert first["pass_at_k"] >= first["accuracy"]
    assert first["format_rate"] == pytest.approx(np.mean([s["format"] for s in first["samples"]]))
    assert [s["answer"] for s in first["samples"][::2]] == [e["answer"] for e in
                                                           counting_examples(4, seed=3, image_size=28)]


def test_bad_image_row_is_named_or_skipped_and_counted(run, tmp_path, capsys):
    workdir, _ = run
    rows = write_rows(tmp_path, 4)
    (tmp_path / "img1.png").write_bytes(b"not a png")
    err = _error(capsys, [f"--workdir={workdir}", f"--data_files={rows}"])
    assert "rows.jsonl line 2: field 'image'" in err and "cannot decode image" in err
    out = ev.main([f"--workdir={workdir}", f"--data_files={rows}", "--skip_bad_rows", "--num_shown=9"])
    assert out["num_examples"] == 3 and out["num_skipped"] == 1
    assert [s["id"] for s in out["samples"]] == [0, 2, 3]
    assert (workdir / "eval_rows.json").is_file()                  # DIR/eval_<data file stem>.json


def test_eval_on_a_prepared_tfds_dataset(run, tmp_path, capsys):
    """--tfds: a prepared dataset's test split, the same rows as the source files give; a dataset without a
    held-out split, or --tfds beside --data_files, is refused naming the problem."""
    from mr1jax.data.prepare import prepare_files

    workdir, rows = run
    with_test = prepare_files([str(rows)], out=str(tmp_path / "tfds"), name="evalrows", eval_files=[str(rows)],
                              log=lambda _: None)["dir"]
    out = ev.main([f"--workdir={workdir}", f"--tfds={with_test}", f"--output={tmp_path / 'tfds.json'}"])
    files = ev.main([f"--workdir={workdir}", f"--data_files={rows}", f"--output={tmp_path / 'files.json'}"])
    assert out["data"]["tfds"] == with_test and out["data"]["split"] == "test" and out["num_examples"] == 4
    assert out["accuracy"] == files["accuracy"] and out["completion_len"] == files["completion_len"]
    train_only = prepare_files([str(rows)], out=str(tmp_path / "tfds2"), name="trainonly", log=lambda _: None)["dir"]
    err = _error(capsys, [f"--workdir={workdir}", f"--tfds={train_only}"])
    assert "has no held-out split (test / validation)" in err
    err = _error(capsys, [f"--workdir={workdir}", f"--tfds={with_test}", f"--data_files={rows}"])
    assert "conflicting data --data_files, --tfds" in err


def test_pass_metrics():
    m = pass_metrics(np.array([[1, 0, 0], [0, 0, 0], [1, 1, 1], [0, 0, 1]]))
    assert m["accuracy"] == pytest.approx(5 / 12) and m["pass_at_k"] == pytest.approx(3 / 4)
    assert pass_metrics(np.array([[1], [0], [0], [1]])) == {"accuracy": 0.5}
    with pytest.raises(ValueError, match=r"\[prompts, k\]"):
        pass_metrics(np.zeros((0, 2)))


def _error(capsys, argv) -> str:
    with pytest.raises(SystemExit) as info:
        ev.main(argv)
    assert info.value.code == 2
    return capsys.readouterr().err


def test_errors_name_the_problem(run, tmp_path, capsys):
    workdir, rows = run
    err = _error(capsys, [f"--workdir={workdir}", "--step=7", "--task=counting"])
    assert "no checkpoint for step 7" in err and "available steps: 1" in err
    err = _error(capsys, [f"--checkpoint={workdir}/checkpoints/3", "--task=counting"])
    assert "no checkpoint for step 3" in err and "available steps: 1" in err
    err = _error(capsys, [f"--workdir={workdir}", "--task=shapes"])
    assert f"unknown task 'shapes'; registered tasks: {', '.join(TASKS)}" in err
    err = _error(capsys, [f"--workdir={workdir}", f"--hf_path={workdir / 'hf'}", "--task=counting"])
    assert "conflicting model sources --workdir, --hf_path" in err
    err = _error(capsys, [f"--workdir={workdir}", "--task=counting", f"--data_files={rows}"])
    assert "conflicting data" in err
    err = _error(capsys, ["--task=counting"])
    assert "no model" in err
    err = _error(capsys, [f"--checkpoint={workdir}", "--task=counting"])
    assert "must be a checkpoint directory DIR/checkpoints/N" in err
    # the run trained on files without eval files: no default data
    err = _error(capsys, [f"--workdir={workdir}"])
    assert "has no eval data" in err and "--task or --data_files" in err
    # an HF directory outside a run: no default data either
    lone = tmp_path / "lone_hf"
    lone.mkdir()
    (lone / "config.json").write_text((workdir / "hf" / "config.json").read_text())
    err = _error(capsys, [f"--hf_path={lone}"])
    assert f"no data: pass --task=NAME (one of: {', '.join(TASKS)}), --data_files=... or --tfds=..." in err
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    err = _error(capsys, [f"--workdir={workdir}", f"--data_files={empty}"])
    assert "no data" in err and "empty.jsonl" in err
    err = _error(capsys, [f"--workdir={workdir}", f"--data_files={tmp_path / 'missing.jsonl'}"])
    assert "data file not found" in err
    bare = tmp_path / "bare_run"
    bare.mkdir()
    (bare / "config.json").write_text((workdir / "config.json").read_text())
    err = _error(capsys, [f"--workdir={bare}", "--task=counting"])
    assert f"no checkpoint under {bare}/checkpoints" in err
    assert not (bare / "checkpoints").exists()                  # looking did not create the directory
    err = _error(capsys, [f"--workdir={tmp_path}", "--task=counting"])
    assert "config.json not found" in err and "not an mr1jax training run directory" in err
    err = _error(capsys, [f"--workdir={workdir}", "--task=counting", "--image_size=30"])
    assert "multiple of 28" in err
    assert not (workdir / "eval_shapes.json").exists()
