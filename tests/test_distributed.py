"""Multi-process plumbing that runs in one process: what `config.distributed` and the environment ask for, the
row helpers on one process, and the run files on an object-store work dir (gs://, through epath)."""

from __future__ import annotations

import json
import os

import jax
import numpy as np
import pytest
from etils.epath import testing as epath_testing
from jax.sharding import NamedSharding, PartitionSpec as P

from configs import grpo
from mr1jax.parallel import distributed, sharding
from mr1jax.trainer.checkpoint import _absolute
from mr1jax.trainer.config import ConfigError, validate_config
from mr1jax.trainer.metrics import MetricsWriter, read_before_rl, truncate_metrics, write_summary
from mr1jax.trainer.run_dir import check_run_dir, record_run_start, write_config

_ENV = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE",
        "TPU_WORKER_HOSTNAMES")


@pytest.fixture
def clean_env(monkeypatch):
    for name in _ENV:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_single_process_by_default_and_off(clean_env):
    assert distributed.requested(grpo.get_config().distributed) is None
    clean_env.setenv("SLURM_NTASKS", "4")
    assert distributed.requested({"mode": "auto"}) == {"detected": "SLURM"}
    assert distributed.requested({"mode": "off"}) is None
    clean_env.setenv("SLURM_NTASKS", "1")                             # one task: nothing to join
    assert distributed.requested({}) is None
    clean_env.setenv("TPU_WORKER_HOSTNAMES", "localhost")            # a one-host TPU VM
    assert distributed.requested({}) is None
    clean_env.setenv("TPU_WORKER_HOSTNAMES", "w0,w1,w2,w3")          # a slice of 4 hosts
    assert distributed.requested({}) == {"detected": "TPU slice"}


def test_explicit_coordinator_from_config_or_environment(clean_env):
    want = dict(coordinator_address="node0:1234", num_processes=2, process_id=1)
    assert distributed.requested(dict(coordinator="node0:1234", num_processes=2, process_id=1)) == want
    clean_env.setenv("JAX_COORDINATOR_ADDRESS", "node0:1234")
    clean_env.setenv("JAX_NUM_PROCESSES", "2")
    clean_env.setenv("JAX_PROCESS_ID", "1")
    assert distributed.requested(grpo.get_config().distributed) == want
    assert distributed.requested(dict(process_id=0))["process_id"] == 0          # the config wins


@pytest.mark.parametrize("fields, match", [
    (dict(coordinator="h:1"), "distributed.coordinator = 'h:1' also needs"),
    (dict(coordinator="h:1", num_processes=2, process_id=2), r"process_id = 2 must be in \[0, num_processes = 2\)"),
    (dict(num_processes=2, process_id=0), "distributed.coordinator"),
])
def test_incomplete_settings_name_the_field_before_anything_compiles(clean_env, fields, match):
    c = grpo.get_config()
    c.distributed.update(fields)
    with pytest.raises(ConfigError, match=match):
        validate_config(c)
    c = grpo.get_config()
    c.distributed.mode = "always"
    with pytest.raises(ConfigError, match="config.distributed.mode = 'always'; allowed values: auto, off"):
        validate_config(c)


def test_rows_round_trip_on_one_process():
    mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
    x = np.arange(12.0, dtype=np.float32).reshape(3, 4)
    g = distributed.to_global(x, NamedSharding(mesh, P(None, sharding.BATCH_AXES)), dim=1)
    assert g.shape == (3, 4)
    np.testing.assert_array_equal(distributed.local_rows(g, dim=1), x)
    np.testing.assert_array_equal(distributed.fetch(g), x)
    # gather / any_process across processes: tests/test_multiprocess.py (2 processes, rows that differ per process)
    assert distributed.is_primary() and "process 0 of 1" in distributed.describe()


def test_object_store_work_dir_files_never_append(tmp_path, monkeypatch):
    """On gs:// (any epath file system) run files are rewritten whole (object stores cannot append); the mocked
    file system refuses append mode, so any append would fail here. Paths stay URLs (no abspath mangling)."""
    monkeypatch.chdir(tmp_path)
    opened = []

    def no_append(open_fn, path, mode):
        opened.append((os.fspath(path), mode))
        if "a" in mode:
            raise OSError(f"append is not supported on {path}")
        return open_fn(path, mode)

    work = "gs://bucket/run"
    c = grpo.get_config()
    with epath_testing.mock_epath(open=no_append):
        from etils import epath
        epath.Path(work).mkdir(parents=True, exist_ok=True)
        record_run_start(c, work)
        record_run_start(c, work)
        write_config(c, work)
        check_run_dir(c, work)                                      # reads config.json back: same run, no error
        writer = MetricsWriter(work)
        assert writer.tb is None                                    # no TensorBoard on an object store
        for step in (1, 2, 3):
            writer.write(step, {"loss": float(step), "before_rl/counting/eval_accuracy": 0.5})
        writer.close()
        assert truncate_metrics(work, 2) == 1
        assert read_before_rl(work) == {"counting": {"eval_accuracy": 0.5}}
        write_summary(work, c, {}, {"counting": {"eval_accuracy": 1.0}}, 1.0)
        root = epath.Path(work)
        assert len(root.joinpath("runs.jsonl").read_text().splitlines()) == 2
        assert [json.loads(x)["step"] for x in root.joinpath("metrics.jsonl").read_text().splitlines()] == [1, 2]
        assert json.loads(root.joinpath("summary.json").read_text())["after_rl"] == {"eval_accuracy": 1.0}
    assert opened and not any("a" in mode for _, mode in opened)
    assert _absolute("gs://bucket/run/checkpoints") == "gs://bucket/run/checkpoints"
    assert _absolute("rel/dir") == os.path.join(os.getcwd(), "rel/dir")
