"""Ctrl-C and small held-out splits: SIGINT saves like SIGTERM (a second one aborts at once), and an evaluation
with fewer rows than one global batch is padded and reported with its real example count."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from mr1jax.trainer.checkpoint import PreemptionGuard

ROOT = Path(__file__).resolve().parents[1]


def test_sigint_is_a_save_request_and_a_second_one_aborts():
    before = signal.getsignal(signal.SIGINT)
    with PreemptionGuard((signal.SIGTERM, signal.SIGINT)) as guard:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)
        assert guard.requested and guard.signal_name == "SIGINT"
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)
    assert signal.getsignal(signal.SIGINT) is before                          # restored


def test_evaluation_smaller_than_a_batch_is_padded_and_counted():
    from configs.grpo import get_config
    from mr1jax.parallel import sharding
    from mr1jax.trainer.build import build_model, task_rows
    from mr1jax.trainer.evaluation import evaluate

    c = get_config()
    c.model.tiny.hidden_size, c.model.tiny.vision_depth = 32, 1
    c.data.batch_size, c.data.image_size = 8, 28
    model, tokenizer = build_model(c, sharding.make_mesh(dict(c.mesh)))
    rows = task_rows(c, "counting", 3, "test")
    out = evaluate(model, tokenizer, rows, c, max_new_tokens=4)
    assert out["eval_examples"] == 3 and 0 <= out["eval_accuracy"] <= 1 and out["eval_completion_len"] > 0
    with pytest.raises(ValueError, match="no rows"):
        evaluate(model, tokenizer, [], c, max_new_tokens=4)


def _train(workdir, *extra) -> subprocess.Popen:
    args = [sys.executable, "-m", "mr1jax.train", "--config=configs/grpo.py", f"--workdir={workdir}",
            "--config.mode=sft", "--config.sft.steps=40", "--config.data.batch_size=2", "--config.data.image_size=28",
            "--config.model.tiny.hidden_size=32", "--config.checkpoint.every_steps=1000", "--config.log_every=1",
            "--config.checkpoint.async_save=False", "--config.export_hf=False", *extra]
    return subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=dict(os.environ, PYTHONPATH=str(ROOT)))


def _checkpoint_params(workdir, step):
    from tests.test_train import _params

    return _params(workdir, step)[1]


@pytest.mark.slow
def test_ctrl_c_mid_sft_saves_and_the_rerun_resumes_exactly(tmp_path):
    from tests.test_train import signal_when

    proc = _train(tmp_path / "a")
    out = signal_when(proc, "sft step 3/", signal.SIGINT)
    assert proc.returncode == 130, out[-3000:]
    assert "SIGINT: saved checkpoint at step" in out and "Traceback" not in out
    saved = int(out.split("SIGINT: saved checkpoint at step ")[1].split(";")[0])
    resumed = _train(tmp_path / "a", "--config.max_steps=2")
    text, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0 and f"resumed from step {saved}" in text, text[-3000:]
    straight = _train(tmp_path / "b", f"--config.max_steps={saved + 2}")
    text, _ = straight.communicate(timeout=300)
    assert straight.returncode == 0, text[-3000:]
    a, b = _checkpoint_params(tmp_path / "a", saved + 2), _checkpoint_params(tmp_path / "b", saved + 2)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
