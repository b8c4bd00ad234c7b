"""Training curves from `<workdir>/metrics.jsonl`: reward, accuracy, beta, KL and completion length per step."""

from __future__ import annotations

import json
import os

from etils import epath

PANELS = (("reward", "reward"), ("accuracy", "train accuracy"), ("beta", "KL coefficient beta"),
          ("kl", "KL to reference"), ("completion_len", "completion length"))


def read_metrics(workdir: str) -> list[dict]:
    text = (epath.Path(workdir) / "metrics.jsonl").read_text()
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def plot_curves(workdir: str, out: str | None = None) -> str:
    """Write `<workdir>/curves.png` (a 2x3 grid; held-out accuracy in the last panel). Returns its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(workdir)
    train = [r for r in rows if "loss" in r]
    evals = [r for r in rows if "eval_accuracy" in r]
    # the evaluation before RL is logged per task as before_rl/<task>/<metric>; the training task comes first
    for r in rows:
        before = [k for k in r if k.startswith("before_rl/") and k.endswith("/eval_accuracy")]
        if before:
            prefix = before[0][: -len("eval_accuracy")]
            evals.insert(0, {"step": r["step"], "eval_accuracy": r[before[0]],
                             "eval_format_rate": r.get(prefix + "eval_format_rate", float("nan"))})
            break
    fig, axes = plt.subplots(2, 3, figsize=(12, 6.5))
    for ax, (key, title) in zip(axes.flat, PANELS):
        ax.plot([r["step"] for r in train], [r.get(key, float("nan")) for r in train], lw=1.2)
        ax.set_title(title)
        ax.set_xlabel("step")
    ax = axes.flat[5]
    ax.plot([r["step"] for r in evals], [r["eval_accuracy"] for r in evals], "o-", label="accuracy")
    ax.plot([r["step"] for r in evals], [r["eval_format_rate"] for r in evals], "s--", label="format rate")
    ax.set_title("held-out (greedy)")
    ax.set_xlabel("step")
    ax.set_ylim(-0.02, 1.02)
    ax.legend()
    fig.tight_layout()
    out = out or os.path.join(workdir, "curves.png")
    with epath.Path(out).open("wb") as f:                  # any epath file system (gs://...)
        fig.savefig(f, dpi=90, format="png")
    plt.close(fig)
    return out
