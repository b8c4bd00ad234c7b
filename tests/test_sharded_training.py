"""The real training loop (cold-start SFT then GRPO, micro-batches, chunked log-probs) on 8 fake CPU devices, in
its own process (tests/sharded_train_check.py): every mesh gives the 1-device result, each step function
compiles once, and the FSDP update gathers parameters with all-gather."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
LR = 1e-3  # the check's SFT and RL learning rate


def _run(*meshes: str, platforms: str = "cpu", lora_rank: int = 0) -> tuple[list[dict], dict]:
    env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS=platforms, ALLOW_MULTIPLE_LIBTPU_LOAD="1")
    if lora_rank:
        env["SHARDED_CHECK_LORA_RANK"] = str(lora_rank)
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "sharded_train_check.py"), *meshes], env=env,
                          capture_output=True, text=True, timeout=1200, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = [json.loads(ln.split(" ", 1)[1]) for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    collectives = [json.loads(ln.split(" ", 1)[1]) for ln in proc.stdout.splitlines() if ln.startswith("COLLECTIVES ")]
    return results, collectives[0]


def _check(results: list[dict]) -> None:
    base = results[0]
    assert base["mesh"] == "1dev" and len(base["losses"]) == 5            # 2 SFT + 3 RL steps
    assert min(base["grad_norms"][2:]) > 1e-3                               # a real policy gradient in RL
    assert max(base["kl"][3:]) > 1e-9                                       # the policy moved off the reference
    for r in results:
        assert r["compile_counts"] == {"sft": 1, "ref": 1, "grpo": 1, "advantages": 1}, r
        if r["mesh"] == "1dev":
            continue
        print(r["mesh"], "parameter difference: max", r["param_maxdiff"], "mean", r["param_meandiff"])
        assert r["rewards"] == base["rewards"], r["mesh"]                   # same samples on every mesh
        np.testing.assert_allclose(r["losses"], base["losses"], rtol=1e-5, atol=1e-6, err_msg=r["mesh"])
        np.testing.assert_allclose(r["grad_norms"], base["grad_norms"], rtol=1e-4, err_msg=r["mesh"])
        np.testing.assert_allclose(r["kl"], base["kl"], rtol=1e-3, atol=1e-8, err_msg=r["mesh"])
        # Parameters after 5 AdamW steps at lr 1e-3: Adam divides by sqrt(v), so where a gradient is ~0 its
        # reduction-order rounding can move an element by up to a step (lr); everywhere else it stays tiny.
        assert r["param_maxdiff"] < 0.5 * LR and r["param_meandiff"] < 2e-3 * LR, r["mesh"]


def test_fsdp_and_data_parallel_training_equals_one_device():
    results, collectives = _run("data2_fsdp4")
    _check(results)
    assert collectives["all-gather"] > 0                                    # FSDP: parameters gathered


@pytest.mark.slow
def test_every_mesh_equals_one_device():
    results, _ = _run("fsdp8", "data2_fsdp4", "fsdp4_tensor2")
    assert [r["mesh"] for r in results] == ["1dev", "fsdp8", "data2_fsdp4", "fsdp4_tensor2"]
    _check(results)


@pytest.mark.slow
def test_fsdp_update_reduce_scatters_gradients_on_tpu():
    """Compiled for a compile-only TPU v5e-8 (needs `pip install "jax[tpu]==0.10.2"`; no TPU): gradients of
    FSDP-sharded weights are reduce-scattered into their shards, parameters all-gathered."""
    pytest.importorskip("libtpu")
    _, collectives = _run("tpu", platforms="")
    assert collectives["reduce-scatter"] > 0 and collectives["all-gather"] > 0, collectives


@pytest.mark.slow
def test_lora_training_on_a_mesh_equals_one_device():
    """LoRA (adapters on the language model and vision tower, SFT adapters merged before RL) on data 2 x fsdp 4:
    adapters sharded by their logical axes give the 1-device run."""
    results, _ = _run("data2_fsdp4", lora_rank=4)
    _check(results)
