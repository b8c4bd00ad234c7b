"""`python -m mr1jax.plan`: a subprocess compiles the tiny model's steps for 8 fake CPU devices and prints
memory / FLOP tables whose fit verdicts agree with the numbers; unit checks of the pieces that need no
compilation (model choice, FLOP formulas, the TPU out-of-memory message); a TPU-topology run (slow, only where
libtpu is installed)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from mr1jax.planning import compile as plan_compile, cost, environment, planner, programs, report
from mr1jax.parallel.accelerators import ACCELERATORS, for_topology
from mr1jax.models import Qwen25VLConfig, Qwen2VLConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# small shapes: 8 prompts x G=2, 8 new tokens, the tiny model (configs/grpo.py, hf_path "")
SMALL = ["--config=configs/grpo.py", "--config.mode=grpo", "--config.data.batch_size=8",
         "--config.rollout.num_samples=2", "--config.rollout.max_new_tokens=8", "--config.data.prompt_bucket=32"]


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


def _run_plan(args: list[str], timeout: int = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)
    return subprocess.run([sys.executable, "-m", "mr1jax.plan", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def _check_verdicts(plan: dict, stdout: str) -> None:
    """Every fit verdict (JSON and printed) agrees with the step's total and the accelerator's memory."""
    results = [r for st in plan["stages"] for r in st["results"]] + plan.get("sft", {}).get("results", [])
    assert results
    for r in results:
        total = r["memory"]["total"]
        line = next(ln for ln in stdout.splitlines() if ln.startswith(r["step"]) and ("fits" in ln or "NO" in ln))
        assert line.split()[1:] == " ".join(report.verdict_text(r["fits"][a]) for a in ACCELERATORS).split()
        for name, acc in ACCELERATORS.items():
            v = r["fits"][name]
            assert v["fits"] == (total <= acc.hbm_bytes), (r["step"], name, total, acc.hbm_bytes)
            assert v["fraction"] == pytest.approx(total / acc.hbm_bytes)


def test_plan_cpu_devices(tmp_path):
    out = tmp_path / "plan.json"
    proc = _run_plan(["--devices=8", "--steps=grpo_update,rollout", f"--json={out}", *SMALL])
    assert proc.returncode == 0, proc.stderr[-3000:]
    plan = json.loads(out.read_text())
    assert plan["target"]["devices"] == 8 and plan["target"]["platform"] == "cpu"
    assert plan["mesh"] == {"data": 1, "fsdp": 8, "tensor": 1}
    (stage,) = plan["stages"]
    assert (stage["rows"], stage["seq"]) == (16, 40)
    steps = {r["step"]: r for r in stage["results"]}
    assert set(steps) == {"grpo_update", "rollout"}
    upd = steps["grpo_update"]
    mem = upd["memory"]
    assert mem["temp"] > 0 and mem["argument"] > 0
    assert mem["sum"] == mem["argument"] + mem["output"] - mem["alias"] + mem["temp"] + mem["generated_code"]
    assert mem["total"] == mem.get("peak", mem["sum"]) + mem["resident"]   # + the reference, when KL is on
    assert (mem["resident"] > 0) == plan["kl"]
    assert steps["rollout"]["memory"]["resident"] > mem["resident"]          # + the optimizer state
    # fp32 params + Adam's two moments, sharded 8 ways over fsdp, are donated (aliased) by the update; a
    # replicated state would alias 8x this. The reference (fp32 here) stays resident during the update.
    n = plan["model"]["params"]
    assert 12 * n / 8 <= mem["alias"] <= 1.1 * 12 * n / 8, (mem["alias"], n)
    assert 4 * n / 8 <= mem["resident"] <= 1.1 * 4 * n / 8
    assert 12 * n / 8 <= steps["rollout"]["memory"]["resident"] <= 1.1 * 12 * n / 8   # Adam moments + reference
    # the analytic FLOPs are the compiler's order of magnitude: XLA counts the checkpointed LM-head chunk loop once
    # (a lower bound), so it sees fewer; forgetting the backward pass (3 x forward) would put it above
    ratio = upd["xla_flops_per_device"] / upd["analytic_flops_per_device"]
    assert 0.4 < ratio < 1.0, ratio
    assert upd["analytic_flops"] == pytest.approx(8 * upd["analytic_flops_per_device"])
    assert upd["compile_s"] > 0
    _check_verdicts(plan, proc.stdout)
    assert "grpo_update" in proc.stdout and "temp" in proc.stdout and "H100 80 GB" in proc.stdout


def test_resolve_model_config(tmp_path):
    from configs import othink_counting, vision_r1

    cfg, name, how = programs.resolve_model_config(othink_counting.get_config(), None)
    assert name == "qwen2_vl_2b_instruct" and "inferred" in how and cfg == Qwen2VLConfig.qwen2_vl_2b_instruct()
    cfg, name, _ = programs.resolve_model_config(vision_r1.get_config(), None)
    assert name == "qwen2_5_vl_7b_instruct" and cfg == Qwen25VLConfig.qwen2_5_vl_7b_instruct()
    c = othink_counting.get_config()
    c.model.hf_path = str(tmp_path / "my-model")
    with pytest.raises(programs.PlanError, match="--preset"):
        programs.resolve_model_config(c, None)
    assert programs.resolve_model_config(c, "qwen2_vl_7b_instruct")[1] == "qwen2_vl_7b_instruct"
    os.makedirs(c.model.hf_path)
    tiny = Qwen2VLConfig.tiny(vocab_size=512)
    with open(os.path.join(c.model.hf_path, "config.json"), "w") as f:
        json.dump(tiny.to_hf_dict(), f)
    cfg, _, how = programs.resolve_model_config(c, None)
    assert cfg.text == tiny.text and how.endswith("config.json")


def test_analytic_flops_2b():
    """~6 x params x tokens for the update, 2 x for a forward pass, attention on top; the rollout matches a
    forward over prompt + completion within the cache's extra attention span."""
    import jax.numpy as jnp

    cfg = Qwen2VLConfig.qwen2_vl_2b_instruct()
    _, state = programs.abstract_model(cfg, jnp.bfloat16)
    n = programs.ParamCounts.of(state)
    assert n.total == 2_208_985_600 and n.lm_head == 0
    s = programs.Shapes(prompts=16, num_samples=8, max_new_tokens=512, prompt_len=384, image_size=392,
                        patches=784, image_tokens=196, minibatch_prompts=16, micro_batches=1)
    tokens = s.rows * s.seq
    upd = cost.analytic_flops("grpo_update", cfg, n, s)
    fwd = cost.analytic_flops("token_logprobs", cfg, n, s)
    assert upd == pytest.approx(3 * fwd)
    dense = 2 * n.decoder * tokens
    t = cfg.text
    attention = 4 * t.num_layers * t.num_heads * t.head_dim * s.rows * s.seq ** 2
    assert dense + attention < fwd < 1.3 * (dense + attention)
    roll = cost.analytic_flops("rollout", cfg, n, s)
    assert 0.5 * fwd < roll < 2 * fwd


def test_oom_message_and_verdicts():
    msg = ("jax.errors.JaxRuntimeError: RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required "
           "for HLO temporaries (31.00G) exceeds available HBM (15.75G).\nmore")
    oom = plan_compile._oom_summary(msg)
    assert oom["message"].startswith("RESOURCE_EXHAUSTED: Ran out of memory")
    assert oom["needed_bytes"] == 31 * 2**30 and oom["available_bytes"] == 15.75 * 2**30
    v = planner.fit_verdicts(None, oom, "v5e", 8, 1e15)
    assert v["v5e"]["fits"] is False and v["v5e"]["source"] == "compiler"
    assert v["v6e"]["fits"] is None                      # 31.25 GiB > 31 GiB: unknown
    assert v["H100"]["fits"] is None and v["v5p"]["fits"] is None
    assert v["v5e"]["seconds_at_peak"] == pytest.approx(1e15 / 8 / 197e12)
    assert report.verdict_text(v["v5e"]).startswith("NO*")
    assert for_topology("v5e:2x4").name == "v5e" and for_topology("v5:2x2x1").name == "v5p"
    assert for_topology(None) is None


def test_early_environment(monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=2 --foo")
    monkeypatch.delenv("JAX_PLATFORMS", raising=False)
    environment.early_environment(["plan", "--devices", "8"])
    assert os.environ["XLA_FLAGS"].split() == ["--foo", "--xla_force_host_platform_device_count=8"]
    assert os.environ["JAX_PLATFORMS"] == "cpu"


@pytest.mark.slow
@pytest.mark.skipif(not _importable("libtpu"), reason="needs libtpu (pip install 'jax[tpu]')")
def test_plan_tpu_topology(tmp_path):
    """Compile-only TPU devices: the tiny run fits a v5e (compiler's verdict); a huge batch does not, and the
    compiler's RESOURCE_EXHAUSTED numbers are reported."""
    out = tmp_path / "plan.json"
    proc = _run_plan(["--topology=v5e:2x2", "--steps=grpo_update", f"--json={out}", *SMALL])
    assert proc.returncode == 0, proc.stderr[-3000:]
    plan = json.loads(out.read_text())
    assert plan["target"]["compiled_for"] == "v5e" and plan["target"]["devices"] == 4
    (res,) = plan["stages"][0]["results"]
    assert res["memory"]["temp"] > 0 and res["memory"]["total"] == res["memory"]["peak"] + res["memory"]["resident"] > 0
    assert res["fits"]["v5e"] == dict(res["fits"]["v5e"], fits=True, source="compiler")
    _check_verdicts(plan, proc.stdout)

    huge = ["--config.data.batch_size=64", "--config.rollout.num_samples=64", "--config.rollout.max_new_tokens=4096"]
    proc = _run_plan(["--topology=v5e:2x2", "--steps=grpo_update", f"--json={out}", *SMALL, *huge])
    assert proc.returncode == 0, proc.stderr[-3000:]
    (res,) = json.loads(out.read_text())["stages"][0]["results"]
    assert res["error"] == "RESOURCE_EXHAUSTED" and res["oom"]["needed_bytes"] > 15 * 2**30
    assert res["fits"]["v5e"]["fits"] is False
    assert "does not fit: RESOURCE_EXHAUSTED" in proc.stdout


@pytest.mark.slow
@pytest.mark.skipif(not _importable("jax_plugins.xla_cuda12"),
                    reason="needs the CUDA PJRT plugin (pip install --no-deps jax-cuda12-plugin jax-cuda12-pjrt)")
def test_plan_gpu_topology(tmp_path):
    """Compile-only H100s (no GPU, no CUDA libraries): XLA:GPU memory analysis, no cost analysis."""
    out = tmp_path / "plan.json"
    proc = _run_plan(["--topology=h100x4", "--steps=grpo_update", f"--json={out}", *SMALL])
    assert proc.returncode == 0, proc.stderr[-3000:]
    plan = json.loads(out.read_text())
    assert plan["target"]["compiled_for"] == "H100" and plan["target"]["platform"] == "gpu"
    (res,) = plan["stages"][0]["results"]
    assert res["memory"]["temp"] > 0 and res["xla_flops_per_device"] is None
    assert res["fits"]["H100"]["source"] == "compiler"
    _check_verdicts(plan, proc.stdout)


@pytest.mark.slow
def test_plan_lora_qlora_on_a_mesh(tmp_path):
    """LoRA + NF4 base on 4 fake devices (fsdp 4): adapters sharded by their logical axes, the base an argument
    of every step, only adapters (+ Adam) as the train state."""
    out = tmp_path / "plan.json"
    proc = _run_plan(["--devices=4", "--steps=grpo_update,token_logprobs,rollout", f"--json={out}", *SMALL,
                      "--config.lora.rank=4", "--config.lora.base_quant=nf4", "--config.rl.beta_schedule=constant"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    plan = json.loads(out.read_text())
    assert plan["lora"]["rank"] == 4 and 0 < plan["lora"]["trainable_params"] < 50_000
    assert "nf4" in plan["model"]["param_dtype"] and "LoRA    rank 4" in proc.stdout
    steps = {r["step"]: r for r in plan["stages"][0]["results"]}
    assert set(steps) == {"grpo_update", "token_logprobs", "rollout"}
    for r in steps.values():
        assert r["memory"]["argument"] > plan["lora"]["frozen_base_bytes_per_device"]   # the base is an argument


def test_unknown_topology_or_preset_is_one_line_and_exit_2():
    for args, expected in ((["--topology=v9z:9x9", *SMALL], "--topology=v9z:9x9"),
                           (["--config=configs/vision_r1.py", "--preset=qwen9_vl_1t"], "--preset='qwen9_vl_1t'")):
        proc = _run_plan(args, timeout=300)
        assert proc.returncode == 2, proc.stderr[-2000:]
        errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
        assert len(errors) == 1 and expected in errors[0] and "Traceback" not in proc.stderr, proc.stderr[-2000:]
