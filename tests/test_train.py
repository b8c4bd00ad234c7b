"""The training command: config validation, a tiny end-to-end GRPO run, exact resume, SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from configs.grpo import get_config
from mr1jax.trainer.checkpoint import Checkpointer
from mr1jax.trainer.config import ConfigError, validate_config
from mr1jax.trainer.loop import train_and_evaluate

ROOT = Path(__file__).resolve().parents[1]


def tiny_config(**overrides):
    c = get_config()
    c.mode, c.optim.warmup_steps = "grpo", 0                     # the demo's SFT phase and sizes: too slow here
    c.model.tiny.hidden_size, c.model.tiny.vision_depth = 64, 1
    c.total_steps = 4
    c.data.num_train, c.data.num_eval, c.data.batch_size = 8, 4, 2
    c.data.image_size, c.data.prompt_bucket = 28, 64
    c.rollout.num_samples, c.rollout.max_new_tokens = 2, 6
    c.eval.every_steps, c.eval.num_batches = 0, 1
    c.checkpoint.every_steps = 2
    c.checkpoint.async_save = False
    c.export_hf = False
    for k, v in overrides.items():
        node = c
        *parents, leaf = k.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = v
    return c


@pytest.mark.parametrize("field, value, match", [
    ("rl.agg", "mean", r"config.rl.agg = 'mean'; allowed values: seq_mean_token_mean, token_mean, dr_grpo"),
    ("rl.kl_estimator", "k4", r"config.rl.kl_estimator = 'k4'; allowed values: k1, k2, k3"),
    ("rl.beta_schedule", "vshape", r"allowed values: constant, othink_dynamic, linear, cosine"),
    ("data.image_size", 30, r"config.data.image_size = 30 must be a multiple of 28"),
    ("rollout.num_samples", 0, r"config.rollout.num_samples must be a positive integer, got 0"),
    ("rl.micro_batches", 3, r"config.rl.minibatches x config.rl.micro_batches = 1 x 3 must divide "
                            r"config.data.batch_size = 2"),
    ("rl.ptst_stages", "16x4", r"rl.ptst_stages: cannot parse '16x4'"),
    ("rollout.top_p", 0.0, r"0 < top_p <= 1"),
    ("rl.reward", "shaped", r"config.rl.reward = 'shaped'; allowed values: othink, hard, accuracy, format"),
    ("rl.advantage_scale", "rank", r"allowed values: group, batch, none"),
    ("model.dtype", "float16", r"config.model.dtype = 'float16'; allowed values: float32, bfloat16"),
    ("mode", "dpo", r"allowed values: grpo, sft, sft_then_grpo"),
    ("rollout.num_samples", 1, r"config.rollout.num_samples: GRPO needs G >= 2 samples per prompt, got 1"),
    ("rl.ptst_stages", "6x2:2,12x1:2", r"config.rl.ptst_stages stage 2 .*GRPO needs G >= 2"),
    ("optim.learning_rate", -1.0, r"config.optim.learning_rate must be > 0, got -1.0"),
    ("sft.learning_rate", 0.0, r"config.sft.learning_rate must be > 0"),
    ("rl.warmup_fraction", 2.0, r"config.rl.warmup_fraction is a fraction and must be in \[0, 1\], got 2.0"),
    ("sft.warmup_fraction", -0.1, r"config.sft.warmup_fraction is a fraction"),
    ("rl.reward_timeout_s", 0.0, r"config.rl.reward_timeout_s must be > 0, got 0.0"),
    ("optim.max_consecutive_skips", 0, r"config.optim.max_consecutive_skips must be a positive integer"),
])
def test_bad_config_names_field_before_compiling(field, value, match):
    with pytest.raises(ConfigError, match=match):
        validate_config(tiny_config(**{field: value}))


def test_trainer_reward_combination_is_the_reward_functions():
    """The loop scores accuracy in worker processes and format inline, then combines them with the rewards
    module's table: every kind must equal the reward function of the same name, sample by sample."""
    from mr1jax.rl import rewards as rw

    t = "<think>two cubes, one ball</think>"
    texts = [f"{t}<answer>3</answer>", f"{t}<answer>4</answer>", "<answer>3</answer>", "3", f"{t}<answer></answer>"]
    answers = ["3"] * len(texts)
    acc = np.array([rw.accuracy_reward(x, a) for x, a in zip(texts, answers)], np.float32)
    fmt = np.array([rw.format_reward(x) for x in texts], np.float32)
    for alpha in (1.0, 0.5):
        np.testing.assert_array_equal(rw.combine_rewards("othink", acc, fmt, alpha),
                                      [rw.othink_reward(x, a, alpha) for x, a in zip(texts, answers)])
    np.testing.assert_array_equal(rw.combine_rewards("hard", acc, fmt, 1.0),
                                  [rw.hard_format_result_reward(x, a) for x, a in zip(texts, answers)])
    np.testing.assert_array_equal(rw.combine_rewards("accuracy", acc, fmt), acc)
    np.testing.assert_array_equal(rw.combine_rewards("format", acc, fmt), fmt)
    assert set(rw.REWARD_KINDS) == {"othink", "hard", "accuracy", "format"}
    with pytest.raises(ValueError, match="unknown reward kind"):
        rw.combine_rewards("shaped", acc, fmt)


def _params(workdir, step=None):
    """(step, {path: array}) of checkpoint `step` (default: the latest) of the run in `workdir`."""
    ck = Checkpointer(os.path.join(workdir, "checkpoints"), async_save=False)
    step = ck.latest_step() if step is None else step
    meta = ck.manager.item_metadata(step)["state"]
    abstract = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), meta,
                            is_leaf=lambda m: hasattr(m, "shape"))
    state, _ = ck.restore(step, abstract)
    ck.close()
    return step, {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_leaves_with_path(state)}


def test_tiny_run_writes_metrics_checkpoints_and_export(tmp_path):
    c = tiny_config(total_steps=2, export_hf=True)
    out = train_and_evaluate(c, str(tmp_path))
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2]
    for r in steps:
        for key in ("reward", "accuracy", "format_rate", "beta", "kl", "completion_len", "time_rollout",
                    "time_reference", "time_update"):
            assert np.isfinite(r[key]), key
    assert steps[0]["beta"] == pytest.approx(0.07)          # OThink V-shape starts at beta_mid
    assert "eval_accuracy" in rows[-1] and "eval_accuracy" in out
    assert list((tmp_path / "tensorboard").iterdir())
    summary = json.loads((tmp_path / "summary.json").read_text())
    for part in ("before_rl", "after_rl"):
        assert 0 <= summary[part]["eval_accuracy"] <= 1 and np.isfinite(summary[part]["eval_completion_len"])
    assert list(summary["tasks"]) == ["counting", "geometry"]          # training task first, then transfer
    for task in summary["tasks"].values():
        for part in ("before_rl", "after_rl"):
            assert all(np.isfinite(task[part][k]) for k in ("eval_accuracy", "eval_format_rate",
                                                             "eval_completion_len"))
        assert task["accuracy_gain"] == pytest.approx(task["after_rl"]["eval_accuracy"]
                                                      - task["before_rl"]["eval_accuracy"])
    assert summary["tasks"]["counting"]["after_rl"] == summary["after_rl"] and summary["wall_time_s"] > 0
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from mr1jax.models.qwen2_vl.hf import load_pretrained
    model = load_pretrained(tmp_path / "hf")
    assert model.config.text.hidden_size == c.model.tiny.hidden_size
    step, _ = _params(tmp_path)
    assert step == 2


def test_resume_is_exact(tmp_path):
    straight, split = tmp_path / "straight", tmp_path / "split"
    train_and_evaluate(tiny_config(), str(straight))
    train_and_evaluate(tiny_config(max_steps=2), str(split))
    assert _params(split)[0] == 2
    train_and_evaluate(tiny_config(), str(split))              # resumes at step 2
    (s1, a), (s2, b) = _params(straight), _params(split)
    assert s1 == s2 == 4 and a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    log = lambda d: [(r["step"], r["reward"], r["completion_len"])  # noqa: E731
                     for r in map(json.loads, (d / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert log(straight) == log(split)                         # same data order and rollouts


def signal_when(proc: subprocess.Popen, marker: str, sig: int, timeout: float = 300) -> str:
    """Send `sig` to `proc` once a line of its output contains `marker`; its whole output after it exits."""
    lines, deadline = [], time.time() + timeout
    for line in proc.stdout:
        lines.append(line)
        if marker in line:
            proc.send_signal(sig)
            break
        assert time.time() < deadline, "".join(lines)
    rest, _ = proc.communicate(timeout=timeout)
    return "".join(lines) + rest


def test_sigterm_saves_a_loadable_checkpoint(tmp_path):
    args = [sys.executable, "-m", "mr1jax.train", "--config=configs/grpo.py", f"--workdir={tmp_path}",
            "--config.total_steps=200", "--config.data.batch_size=2", "--config.data.image_size=28",
            "--config.rollout.num_samples=2", "--config.rollout.max_new_tokens=6", "--config.eval.every_steps=0",
            "--config.checkpoint.every_steps=1000", "--config.log_every=1"]
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=dict(os.environ, PYTHONPATH=str(ROOT)))
    output = signal_when(proc, "step 2/", signal.SIGTERM)
    from mr1jax.trainer.loop import EXIT_PREEMPTED
    assert proc.returncode == EXIT_PREEMPTED == 143, output      # a scheduler tells a preemption from the end
    assert "SIGTERM: saved checkpoint" in output
    step, params = _params(tmp_path)
    assert 2 <= step < 200 and params


def test_sft_then_grpo_with_ptst_stages_and_export(tmp_path):
    """Cold-start SFT, then RL over two PTST stages; checkpoints at the SFT end and stage boundary; export."""
    from mr1jax.generate import sampler as sampling
    from mr1jax.export import export_checkpoint

    c = tiny_config(mode="sft_then_grpo", total_steps=4, **{"sft.steps": 2, "rl.ptst_stages": "6x2:2,12x2:2",
                                                            "checkpoint.every_steps": 100,
                                                            "checkpoint.max_to_keep": 10})
    before = sampling.compile_count()
    train_and_evaluate(c, str(tmp_path))
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    sft = [r for r in rows if "sft_loss" in r]
    rl = [r for r in rows if "loss" in r]
    assert [r["step"] for r in sft] == [1, 2] and [r["step"] for r in rl] == [3, 4, 5, 6]
    assert [r["stage"] for r in rl] == [0, 0, 1, 1]
    assert max(r["completion_len"] for r in rl[:2]) <= 6 and all(np.isfinite(r["sft_loss"]) for r in sft)
    assert {"before_rl/counting/eval_accuracy", "before_rl/geometry/eval_accuracy"} <= set(rows[2])  # between phases
    ck = Checkpointer(tmp_path / "checkpoints", async_save=False)
    assert {2, 4, 6} <= set(ck.all_steps())                  # SFT end, PTST stage boundary, end
    ck.close()
    # sampler: stage 1 (G=2, 6 tokens) + stage 2 (G=2, 12 tokens) + greedy eval shapes; never one per step
    assert sampling.compile_count() - before <= 4
    out = export_checkpoint(str(tmp_path), step=4)
    import transformers
    _, info = transformers.Qwen2VLForConditionalGeneration.from_pretrained(out, output_loading_info=True)
    assert not any(info.values())


def test_sft_loss_counts_only_response_tokens():
    from mr1jax.data.sft import sft_batch
    from mr1jax.data.tasks import counting_examples
    from mr1jax.data.tokenizer import load_tokenizer

    tok = load_tokenizer()
    ex = counting_examples(2, seed=0, image_size=28)
    b = sft_batch(tok, ex, image_size=28, seq_len=96)
    for row, mask, valid, e in zip(b["input_ids"], b["loss_mask"], b["attention_mask"], ex):
        target = tok.decode(row[mask.astype(bool)].tolist())
        assert target == f"<think>I look at the image.</think><answer>{e['answer']}</answer><|im_end|>"
        full = tok.decode(row[valid.astype(bool)].tolist())
        assert full.endswith("<|im_start|>assistant\n" + target)


def _write_rows(tmp_path, n, corrupt_row=None):
    from mr1jax.data.tasks import counting_examples

    lines = []
    for i, ex in enumerate(counting_examples(n, seed=3, image_size=28)):
        path = tmp_path / f"img{i}.png"
        ex["image"].save(path)
        if i == corrupt_row:
            path.write_bytes(b"not a png")
        lines.append(json.dumps({"image": path.name, "question": ex["question"], "answer": ex["answer"]}))
    data = tmp_path / "train.jsonl"
    data.write_text("\n".join(lines) + "\n")
    return data


def test_trains_on_user_jsonl_and_names_corrupt_rows(tmp_path):
    from mr1jax.data.rows import DataError

    data = _write_rows(tmp_path, 4)
    c = tiny_config(total_steps=1, **{"data.train_files": str(data), "data.fields": "generic"})
    out = train_and_evaluate(c, str(tmp_path / "run"))
    assert np.isfinite(out["reward"]) and "eval_accuracy" not in out      # no eval files: no eval
    bad = _write_rows(tmp_path / "bad" if (tmp_path / "bad").mkdir() is None else tmp_path, 4, corrupt_row=1)
    c = tiny_config(total_steps=2, **{"data.train_files": str(bad), "data.batch_size": 4})
    with pytest.raises(DataError, match=r"train.jsonl line 2"):
        train_and_evaluate(c, str(tmp_path / "run_bad"))


def test_shortened_default_command_writes_finite_summary_and_curves(tmp_path):
    """The README's main command with the default config, cut to a few steps of each phase."""
    proc = subprocess.run(
        [sys.executable, "-m", "mr1jax.train", "--config=configs/grpo.py", f"--workdir={tmp_path}",
         "--config.sft.steps=3", "--config.total_steps=2", "--config.data.num_train=64",
         "--config.data.num_eval=16", "--config.eval.num_batches=1", "--config.export_hf=False"],
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "sft step 3/5" in proc.stdout and "step 5/5" in proc.stdout and "before RL, geometry" in proc.stdout
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["mode"] == "sft_then_grpo" and (summary["sft_steps"], summary["rl_steps"]) == (3, 2)
    for task in ("counting", "geometry"):
        for part in ("before_rl", "after_rl"):
            values = summary["tasks"][task][part]
            assert set(values) == {"eval_accuracy", "eval_format_rate", "eval_completion_len", "eval_examples"}
            assert values["eval_examples"] > 0
            assert all(np.isfinite(v) for v in values.values())
    png = (tmp_path / "curves.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
