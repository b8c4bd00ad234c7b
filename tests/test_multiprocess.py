"""Multi-process training on one machine: 2 processes x 4 fake CPU devices joined by jax.distributed (gloo).

The runs are `tests/multiprocess_train.py` (the real loop on the tiny default, 2 SFT + 4 GRPO steps, a
deterministic stand-in reward). Checked: the 2-process run equals the 1-process 8-device run step by step and in
its final parameters, only process 0 writes; SIGKILL of both mid-run then a relaunch ends equal to the
uninterrupted run; SIGTERM to one process makes both save the same step and exit 143, and the rerun resumes
exactly; a reward that times out on one process only leaves the run consistent; `load_pretrained` onto a mesh
spanning both processes reads each process's slices and the export gathers them back byte for byte.

Each training run takes 1-2 minutes on 2 cores (several under load), so the training checks are in the slow set:
`python -m pytest -q -m slow tests/test_multiprocess.py` (4 tests, 21 min on a loaded 2-core machine). The default
set runs the 2-process load + export check (about 30 s).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from safetensors.numpy import load_file

RUNNER = os.path.join(os.path.dirname(__file__), "multiprocess_train.py")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LR = 3e-4                                  # the runner's learning rates (SFT and RL)
LOST_PEER_BOUND_S = 45                     # a survivor exits this soon after a peer dies (peer_timeout_s 15 + a
                                           # step in flight; measured: see BUILD.md)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _popen(args: list[str]) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.Popen([sys.executable, *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env, cwd=ROOT)


def _launch(workdir, processes: int = 2, **flags) -> list[subprocess.Popen]:
    port = _free_port()
    extra = [f"--{k}={v}" for k, v in flags.items()]
    devices = 8 // processes
    return [_popen([RUNNER, f"--workdir={workdir}", f"--processes={processes}", f"--process_id={i}",
                    f"--port={port}", f"--devices={devices}", *extra]) for i in range(processes)]


def _wait(procs, timeout: float = 900) -> list[tuple[int, str]]:
    out = []
    for p in procs:
        try:
            text, _ = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        out.append((p.returncode, text))
    return out


def _run(workdir, processes: int = 2, **flags) -> list[tuple[int, str]]:
    results = _wait(_launch(workdir, processes, **flags))
    for code, text in results:
        assert code == 0, text[-3000:]
    return results


def _results(outputs) -> list[dict]:
    return [json.loads(line[len("RESULT "):]) for _, text in outputs for line in text.splitlines()
            if line.startswith("RESULT ")]


def _steps(workdir) -> list[dict]:
    rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    return [r for r in rows if "sft_loss" in r or "loss" in r]


def _params(workdir) -> dict[str, np.ndarray]:
    return load_file(os.path.join(workdir, "hf", "model.safetensors"))


def _assert_same_run(a, b, *, exact: bool):
    sa, sb = _steps(a), _steps(b)
    assert [r["step"] for r in sa] == [r["step"] for r in sb]
    for ra, rb in zip(sa, sb):
        for k in ("sft_loss", "loss", "grad_norm", "kl", "reward", "accuracy"):
            if k in ra:
                if exact:
                    assert ra[k] == rb[k], (ra["step"], k, ra[k], rb[k])
                else:
                    np.testing.assert_allclose(rb[k], ra[k], rtol=1e-4, atol=1e-6, err_msg=f"step {ra['step']} {k}")
    pa, pb = _params(a), _params(b)
    assert pa.keys() == pb.keys()
    for k in pa:
        if exact:
            np.testing.assert_array_equal(pb[k], pa[k], err_msg=k)
        else:     # Adam turns rounding in near-zero gradients into moves of up to the step size
            np.testing.assert_allclose(pb[k], pa[k], atol=0.5 * LR, rtol=0, err_msg=k)
    if not exact:
        mean = np.mean([np.abs(pa[k] - pb[k]).mean() for k in pa])
        assert mean < 1e-6, mean


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
    work = tmp_path_factory.mktemp("two_process")
    return str(work), _run(work)


@pytest.mark.slow
def test_two_processes_equal_one_process_and_only_process_0_writes(two_process_run, tmp_path):
    work, outputs = two_process_run
    results = _results(outputs)
    assert sorted(r["process"] for r in results) == [0, 1]
    assert all(r["processes"] == 2 and r["devices"] == 8 for r in results)
    for r in results:                                   # no recompiles on either process
        assert set(r["compile_counts"].values()) == {1}, r
    one = tmp_path / "one"
    _run(one, processes=1)
    _assert_same_run(str(one), work, exact=False)
    # One writer: process 1 printed only its startup line, and every file is process 0's (one line per step).
    text1 = outputs[1][1]
    p1_lines = [ln for ln in text1.splitlines() if ln.startswith("[p1]")]
    assert len(p1_lines) == 1 and "process 1 of 2" in p1_lines[0], p1_lines
    assert not any(ln.startswith("[p1]") for ln in outputs[0][1].splitlines())
    steps = [r["step"] for r in _steps(work)]
    assert steps == sorted(set(steps)) == list(range(1, 7)), steps   # written once, not once per process
    for name in ("summary.json", "curves.png", "config.json", "hf/model.safetensors", "hf/config.json"):
        assert os.path.exists(os.path.join(work, name)), name
    assert len(open(os.path.join(work, "runs.jsonl")).readlines()) == 1


def test_load_pretrained_and_export_across_two_processes(tmp_path):
    """Each process loads only its devices' slices of an HF directory onto a mesh spanning both; the export gathers
    them back (process 0 writes) byte for byte."""
    import jax.numpy as jnp
    from flax import nnx

    from mr1jax.models.qwen2_vl import Qwen2VL, Qwen2VLConfig
    from mr1jax.models.qwen2_vl.hf import save_pretrained

    src, out = tmp_path / "src", tmp_path / "out"
    cfg = Qwen2VLConfig.tiny(vocab_size=512, hidden_size=64)
    save_pretrained(Qwen2VL(cfg, rngs=nnx.Rngs(3), dtype=jnp.float32), src)
    port = _free_port()
    procs = [_popen([os.path.join(os.path.dirname(__file__), "multiprocess_load.py"), str(src), str(out), str(i),
                     str(port)]) for i in (0, 1)]
    outputs = _wait(procs, timeout=300)
    assert all(code == 0 for code, _ in outputs), [t[-2000:] for _, t in outputs]
    r0, r1 = _results(outputs)
    assert r0["spanning"] > 0                                   # some parameters really span both processes
    assert r0["local_bytes"] < r0["total_bytes"]                # each process holds only part of the model
    assert r0["sums"] == r1["sums"]
    # the row helpers: each process's rows go into one global array (process 0's first) and come back
    both = (np.arange(8, dtype=np.float32).reshape(4, 2)[None] + 100 * np.arange(2)[:, None, None]).reshape(8, 2)
    for pid, r in enumerate((r0, r1)):
        rows = r["rows"]
        assert rows["shape"] == [8, 2] and rows["spans"]
        np.testing.assert_array_equal(rows["back"], both[4 * pid:4 * pid + 4])
        np.testing.assert_array_equal(rows["whole"], both)
        np.testing.assert_array_equal(rows["gathered"], both)
        assert rows["any_p1"] is True and rows["any_none"] is False   # true on process 1 only -> true everywhere
    a, b = load_file(str(src / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(b[k], a[k], err_msg=k)


def _wait_for_step(workdir, step: int, procs, timeout: float = 600) -> None:
    path = os.path.join(workdir, "metrics.jsonl")
    deadline = time.time() + timeout
    while time.time() < deadline:
        if os.path.exists(path) and any(json.loads(line).get("step", 0) >= step for line in open(path)
                                        if line.strip()):
            return
        assert all(p.poll() is None for p in procs), "a process ended early"
        time.sleep(0.2)
    raise TimeoutError(f"step {step} not reached in {workdir}")


def _checkpoint_steps(workdir) -> list[int]:
    d = os.path.join(workdir, "checkpoints")
    return sorted(int(n) for n in os.listdir(d) if n.isdigit())


@pytest.mark.slow
def test_sigkill_both_then_relaunch_ends_equal_to_uninterrupted(two_process_run, tmp_path):
    work, _ = two_process_run
    killed = str(tmp_path / "killed")
    procs = _launch(killed, sleep_per_step=2)
    _wait_for_step(killed, 4, procs)
    for p in procs:
        p.send_signal(signal.SIGKILL)
    _wait(procs)
    assert _checkpoint_steps(killed), "no checkpoint before the kill"
    outputs = _run(killed)
    assert "resumed from step" in outputs[0][1]
    _assert_same_run(work, killed, exact=True)


@pytest.mark.slow
def test_sigterm_to_one_process_saves_everywhere_and_resumes_exactly(two_process_run, tmp_path):
    work, _ = two_process_run
    term = str(tmp_path / "term")
    procs = _launch(term, sleep_per_step=2)
    _wait_for_step(term, 3, procs)
    procs[1].send_signal(signal.SIGTERM)
    outputs = _wait(procs)
    assert [code for code, _ in outputs] == [143, 143], [t[-2000:] for _, t in outputs]
    results = _results(outputs)
    assert all(r["preempted"] for r in results)
    saved = _checkpoint_steps(term)[-1]
    assert 3 <= saved < 6
    assert f"saved checkpoint at step {saved}" in outputs[0][1] and f"saved checkpoint at step {saved}" in outputs[1][1]
    outputs = _run(term)
    assert f"resumed from step {saved}" in outputs[0][1]
    _assert_same_run(work, term, exact=True)


@pytest.mark.slow
def test_reward_timeouts_on_one_process_keep_the_processes_consistent(two_process_run, tmp_path):
    """Each row is scored once, by the process that owns it, and the advantages come from the global rewards on
    device: process 1's timeouts (its rows scored 0) reach every process, and the run stays one consistent run."""
    base, _ = two_process_run
    work = str(tmp_path / "slow_reward")
    outputs = _run(work, slow_reward_on=1)
    rl, rl_base = [r for r in _steps(work) if "loss" in r], [r for r in _steps(base) if "loss" in r]
    assert sum(r["reward_timeouts"] for r in rl) > 0        # counted on process 1, logged by process 0
    assert sum(r["reward_timeouts"] for r in rl_base) == 0
    assert rl[0]["accuracy"] <= rl_base[0]["accuracy"]      # the same first rollouts, process 1's rows zeroed
    assert all(np.isfinite(r["loss"]) and np.isfinite(r["grad_norm"]) for r in rl)
    assert [r["compile_counts"] for r in _results(outputs)][0] == [r["compile_counts"] for r in _results(outputs)][1]


@pytest.mark.slow
def test_qwen25vl_with_lora_on_two_processes_equals_one_process(tmp_path):
    """The other model family (windowed vision tower) with LoRA adapters: the same equality, and the PEFT adapters
    written once, by process 0, from the gathered adapters."""
    two, one = str(tmp_path / "two"), str(tmp_path / "one")
    outputs = _run(two, family="qwen2_5_vl", lora_rank=4)
    for r in _results(outputs):
        assert set(r["compile_counts"].values()) == {1}, r
    _run(one, processes=1, family="qwen2_5_vl", lora_rank=4)
    _assert_same_run(one, two, exact=False)
    a = load_file(os.path.join(one, "hf_adapter", "adapter_model.safetensors"))
    b = load_file(os.path.join(two, "hf_adapter", "adapter_model.safetensors"))
    assert a.keys() == b.keys() and a
    for k in a:
        np.testing.assert_allclose(b[k], a[k], atol=0.5 * LR, rtol=0, err_msg=k)


@pytest.mark.slow
def test_native_resolution_on_two_processes_equals_one_process(tmp_path):
    """Mixed image sizes at native resolution: every process pads its share of a global batch to the bucket of
    the whole batch (read from the rows' headers), so 2 processes equal 1 process step by step."""
    two, one = tmp_path / "two", tmp_path / "one"
    outputs = _run(two, native=1)
    _run(one, processes=1, native=1)
    _assert_same_run(str(one), str(two), exact=False)
    buckets = {r.get("patch_bucket") for r in _steps(str(two))}
    assert None not in buckets and len(buckets) >= 1
    assert all(r["processes"] == 2 for r in _results(outputs))


def test_different_settings_on_one_process_are_refused_before_compiling(tmp_path):
    """Process 1 started with another learning rate: both processes stop with exit 2 before anything compiles or
    is written, naming the field and each process's value."""
    port = _free_port()
    procs = [_popen([RUNNER, f"--workdir={tmp_path}", "--processes=2", f"--process_id={i}", f"--port={port}",
                     "--devices=4", *(["--lr=0.001"] if i == 1 else [])]) for i in (0, 1)]
    outputs = _wait(procs, timeout=300)
    assert [code for code, _ in outputs] == [2, 2], [t[-2000:] for _, t in outputs]
    for _, text in outputs:
        assert "different settings" in text and "config.optim.learning_rate: process 0 0.0003, process 1 0.001" in text
    assert not (tmp_path / "checkpoints").exists() and not (tmp_path / "metrics.jsonl").exists()


def test_unreachable_coordinator_is_named_promptly(tmp_path):
    """Process 1 of 2 started alone: it says the coordinator's host:port was not reachable within the timeout and
    exits with status 4 (no C++ abort)."""
    port = _free_port()
    t0 = time.time()
    (code, text), = _wait([_popen([RUNNER, f"--workdir={tmp_path}", "--processes=2", "--process_id=1",
                                   f"--port={port}", "--devices=4", "--timeout_s=3"])], timeout=120)
    assert code == 4, text[-2000:]
    assert f"the coordinator localhost:{port} (process 0) was not reachable within 3 s" in text
    assert time.time() - t0 < 60 and "Check failure" not in text


@pytest.mark.slow
def test_lost_peer_is_named_promptly_and_the_relaunch_resumes_exactly(two_process_run, tmp_path):
    """SIGKILL of process 1 during RL: process 0 exits with status 4 and one line naming the loss and the last
    complete checkpoint, within LOST_PEER_BOUND_S; relaunching both resumes and ends equal to the uninterrupted
    run."""
    work, _ = two_process_run
    lost = str(tmp_path / "lost")
    procs = _launch(lost, sleep_per_step=2, peer_timeout_s=15)
    _wait_for_step(lost, 4, procs)                                  # steps 3-6 are RL
    t0 = time.time()
    procs[1].send_signal(signal.SIGKILL)
    (code, text), = _wait([procs[0]], timeout=300)
    elapsed = time.time() - t0
    procs[1].wait()
    assert code == 4, text[-3000:]
    line = next(ln for ln in text.splitlines() if "lost at step" in ln or "was lost" in ln)
    assert "the last complete checkpoint is step" in line and "rerun all processes to resume" in line
    assert "Check failure" not in text                              # not JAX's C++ abort
    print(f"survivor exited {elapsed:.1f} s after the kill: {line}")
    assert elapsed < LOST_PEER_BOUND_S
    outputs = _run(lost)
    assert "resumed from step" in outputs[0][1]
    _assert_same_run(work, lost, exact=True)


@pytest.mark.slow
def test_peer_lost_outside_a_collective_is_caught_by_the_watch(tmp_path):
    """Process 1 dies while process 0 is between collectives (a long step): no collective fails, so the heartbeat
    watch must notice within peer_timeout_s and exit with status 4 before JAX's C++ abort."""
    work = str(tmp_path / "idle")
    procs = _launch(work, sleep_per_step=40, peer_timeout_s=10)
    _wait_for_step(work, 3, procs)                       # in RL; every RL step now starts with a 40 s sleep
    time.sleep(2)
    t0 = time.time()
    procs[1].send_signal(signal.SIGKILL)
    (code, text), = _wait([procs[0]], timeout=300)
    elapsed = time.time() - t0
    procs[1].wait()
    assert code == 4 and "process 1 of 2 stopped answering for 10 s" in text, text[-3000:]
    assert "the last complete checkpoint is step" in text and "Check failure" not in text
    print(f"survivor exited {elapsed:.1f} s after the kill (peer_timeout_s 10)")
    assert elapsed < 10 + 15
