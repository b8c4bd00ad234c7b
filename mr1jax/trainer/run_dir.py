"""The work dir of one run: its lock, the config it was started with, the start log, the HF export."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import time

import ml_collections
from etils import epath

from mr1jax.models import save_pretrained
from mr1jax.parallel import distributed
from mr1jax.parallel.storage import local_output_dir
from mr1jax.trainer.checkpoint import WorkdirLock, WorkdirLockedError
from mr1jax.trainer.config import ConfigError, run_dir_conflicts


def check_run_dir(c: ml_collections.ConfigDict, workdir: str) -> None:
    """ConfigError, before anything in `workdir` is touched, when the run already there has another model or
    data shape (`mr1jax.trainer.config.run_dir_conflicts`)."""
    path = epath.Path(workdir) / "config.json"
    if not path.exists():
        return
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path} is unreadable ({e}); it describes the run in {workdir}: repair or remove it") \
            from None
    conflicts = run_dir_conflicts(c, saved)
    if conflicts:
        raise ConfigError(f"{workdir} holds a run with another model / data shape; nothing was changed. Use another "
                          "--workdir, or the dir's settings:\n  " + "\n  ".join(conflicts))


def record_run_start(c: ml_collections.ConfigDict, workdir: str) -> None:
    """Append this start (time, host, pid, command line, config) to `<workdir>/runs.jsonl`."""
    entry = {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "host": socket.gethostname(), "pid": os.getpid(),
             "argv": sys.argv, "config": json.loads(c.to_json_best_effort())}
    path = epath.Path(workdir) / "runs.jsonl"
    before = path.read_text() if path.exists() else ""      # rewritten whole: object stores cannot append
    path.write_text(before + json.dumps(entry) + "\n")


def export_hf(model, tokenizer, path: str, dtype) -> None:
    """`save_pretrained` + the tokenizer into `path` (every process takes part, process 0 writes); an object-store
    path (gs://...) is written locally first and copied up file by file."""
    with local_output_dir(path, upload=distributed.is_primary()) as out:
        save_pretrained(model, out, save_dtype=dtype)
        if distributed.is_primary():
            tokenizer.save_pretrained(out)


def write_config(c: ml_collections.ConfigDict, workdir: str) -> None:
    """`<workdir>/config.json` (what export / eval rebuild the model from), replaced atomically."""
    tmp = epath.Path(workdir) / f".config.json.{os.getpid()}"
    tmp.write_text(c.to_json_best_effort(indent=2))
    tmp.replace(epath.Path(workdir) / "config.json")


@contextlib.contextmanager
def lock_workdir(workdir: str):
    """`WorkdirLock` held by process 0 for the whole run; every process stops if it cannot be taken."""
    lock, problem = WorkdirLock(workdir), None
    if distributed.is_primary():
        try:
            lock.acquire()
        except WorkdirLockedError as e:
            problem = e
    if distributed.any_process(problem is not None):
        raise problem or WorkdirLockedError(f"{workdir} is in use by another run (process 0 could not lock it)")
    try:
        yield
    finally:
        lock.release()
