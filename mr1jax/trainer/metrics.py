"""The files a run writes next to its checkpoints: metrics.jsonl (+ TensorBoard), summary.json; step timing."""

from __future__ import annotations

import json
import math
import os
from typing import Any

import numpy as np
from etils import epath

from mr1jax.parallel.storage import is_url

from mr1jax.trainer.config import main_task_name, phase_steps


def metrics_text(metrics: dict[str, float]) -> str:
    """'name value ...' for a console line: counts as integers, the rest with 3 decimals."""
    return " ".join(f"{k} {v:d}" if isinstance(v, int) else f"{k} {v:.3f}" for k, v in metrics.items())


def recent_step_time(times: list[float]) -> float:
    """Median of the last 10 step times of the current phase, leaving out its first (compiling) step."""
    return float(np.median((times[1:] or times)[-10:]))


def read_before_rl(workdir: str) -> dict[str, dict[str, float]]:
    """Held-out metrics per task logged just before RL began (kept in metrics.jsonl, so resumed runs find them).

    Logged as ``before_rl/<task>/<metric>``; returns {task: {metric: value}}.
    """
    path = epath.Path(workdir) / "metrics.jsonl"
    out: dict[str, dict[str, float]] = {}
    if path.exists():
        for row in _rows(path):
            for k, v in row.items():
                if k.startswith("before_rl/"):
                    _, task, metric = k.split("/", 2)
                    out.setdefault(task, {})[metric] = v
    return out


def _rows(path: str) -> list[dict[str, Any]]:
    """The JSON objects of a metrics.jsonl, leaving out a line cut short by a kill mid-write."""
    rows = []
    with epath.Path(path).open() as f:
        for line in f:
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if isinstance(row, dict):
                rows.append(row)
    return rows


def truncate_metrics(workdir: str, step: int) -> int:
    """Drop the lines of `<workdir>/metrics.jsonl` logged after `step` (a resume redoes those steps; from step 0
    every line goes). Returns how many were dropped."""
    path = epath.Path(workdir) / "metrics.jsonl"
    if not path.exists():
        return 0
    lines = path.read_text().splitlines(keepends=True)
    keep = []
    for line in lines:
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if step and isinstance(row, dict) and row.get("step", 0) <= step:
            keep.append(line if line.endswith("\n") else line + "\n")
    if len(keep) != len(lines):
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(keep))
        tmp.replace(path)
    return len(lines) - len(keep)


def json_value(v: Any) -> Any:
    """A metric as JSON: numpy scalars as Python numbers, NaN / inf as null (JSON has no NaN)."""
    if isinstance(v, (np.floating, np.integer, np.bool_)):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def log_before_rl(writer: "MetricsWriter", step: int, per_task: dict[str, dict[str, float]], say) -> None:
    writer.write(step, {f"before_rl/{t}/{k}": v for t, ev in per_task.items() for k, v in ev.items()})
    for t, ev in per_task.items():
        say(f"before RL, {t}: " + metrics_text(ev))


def write_summary(workdir: str, c, before: dict[str, dict[str, float]], after: dict[str, dict[str, float]],
                  wall_s: float) -> dict[str, Any]:
    """`<workdir>/summary.json`: held-out accuracy / format rate / length before and after RL, per task.

    ``tasks[<task>] = {"before_rl": {...}, "after_rl": {...}, "accuracy_gain": after - before}``; the
    training task comes first and is repeated at the top level (``before_rl`` / ``after_rl``).
    """
    main = main_task_name(c)
    tasks = {}
    for t, ev in after.items():
        b = before.get(t, {})
        gain = ev["eval_accuracy"] - b["eval_accuracy"] if "eval_accuracy" in b and "eval_accuracy" in ev else None
        tasks[t] = {"before_rl": b, "after_rl": ev, "accuracy_gain": gain}
    sft_steps, rl_steps = phase_steps(c)
    summary = {"task": c.data.get("tfds") or c.data.train_files or c.data.task, "mode": c.mode,
               "seed": c.seed, "sft_steps": sft_steps, "rl_steps": rl_steps, "beta_schedule": c.rl.beta_schedule,
               "wall_time_s": round(wall_s, 1), "before_rl": before.get(main, {}), "after_rl": after.get(main, {}),
               "tasks": tasks}
    (epath.Path(workdir) / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


class MetricsWriter:
    """JSONL (`<workdir>/metrics.jsonl`) and TensorBoard event files (tensorboardX); `enabled=False` (every process
    but process 0 of a multi-process run) writes nothing."""

    def __init__(self, workdir: str, enabled: bool = True):
        self.path = epath.Path(workdir) / "metrics.jsonl"
        self.enabled, self.file, self.tb, self.lines = enabled, None, None, None
        if not enabled:                                       # not process 0 of a multi-process run: no files
            return
        if is_url(workdir):       # object stores cannot append: keep the lines, rewrite the file; no TensorBoard
            self.lines = self.path.read_text().splitlines(keepends=True) if self.path.exists() else []
            return
        self.file = open(self.path, "a")
        try:
            from tensorboardX import SummaryWriter
            self.tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
        except ImportError:  # pragma: no cover - tensorboardX is a dependency
            self.tb = None

    def write(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        row = {"step": step, **{k: json_value(v) for k, v in metrics.items()}}
        if self.lines is not None:
            self.lines.append(json.dumps(row) + "\n")
            self.path.write_text("".join(self.lines))
            return
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()
        if self.tb is not None:
            for k, v in metrics.items():
                if isinstance(v, (int, float)) and math.isfinite(v):
                    self.tb.add_scalar(k, v, step)
            self.tb.flush()

    def close(self) -> None:
        if self.file is None:
            return
        self.file.close()
        if self.tb is not None:
            self.tb.close()

