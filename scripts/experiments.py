"""The papers' comparisons in small, on the synthetic tasks, over several seeds.

    python scripts/experiments.py --seeds=0,1,2 --out=docs/results          # ~40 min on a 2-core CPU
    python scripts/experiments.py --seeds=0 --set=sft.steps=20 --set=total_steps=10 --out=/tmp/exp  # smoke

For every seed, starting from the default config (`configs/grpo.py`, overrides with --set):

* **base**: the randomly initialised model, evaluated as is;
* **SFT**: the cold-start SFT model (the first `sft.steps` steps of the default run) -- the start of RL;
* **SFT, same steps**: SFT for `sft.steps + total_steps` steps (a control: is RL better than simply
  continuing supervised training for as many steps?);
* **GRPO, constant beta**: RL from the SFT model with beta = `rl.beta` throughout;
* **GRPO-D**: RL from the same SFT model with OThink-MR1's dynamic KL (the default run).

Both RL arms resume from one copy of the SFT checkpoint, so they share their starting point exactly. Every
model is evaluated greedily on the held-out split of the training task and of every other synthetic task
(cross-task transfer); `--train_tasks=counting,geometry` also trains on the other task.

Writes `<out>/results.md` (a Markdown table of means and standard deviations over seeds, plus per-seed
numbers), `<out>/results.png` and `<out>/results.json`; runs live in `<out>/runs/`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from typing import Any

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

ARMS = ("base", "sft", "sft_same_steps", "grpo_constant", "grpo_dynamic")
ARM_NAMES = {"base": "base (random init)", "sft": "cold-start SFT (start of RL)",
             "sft_same_steps": "SFT for as many steps", "grpo_constant": "GRPO, constant beta",
             "grpo_dynamic": "GRPO-D (OThink-MR1 dynamic KL)"}


def load_config(path: str, overrides: list[str]):
    """The config file's get_config() with `key=value` overrides (values parsed as JSON when they parse)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("exp_config", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    c = mod.get_config()
    for item in overrides:
        key, _, raw = item.partition("=")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        node = c
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        if leaf not in node:
            raise SystemExit(f"--set {item}: the config has no field {key!r}")
        node[leaf] = type(node[leaf])(value) if node[leaf] is not None else value
    return c


def evaluate_base(c) -> dict[str, dict[str, float]]:
    from mr1jax.parallel import sharding
    from mr1jax.trainer.build import build_model, build_rows
    from mr1jax.trainer.config import validate_config
    from mr1jax.trainer.evaluation import eval_max_new_tokens, evaluate_tasks

    stages = validate_config(c)
    model, tokenizer = build_model(c, sharding.make_mesh(dict(c.mesh)))
    return evaluate_tasks(model, tokenizer, build_rows(c, "eval"), c, eval_max_new_tokens(c, stages[0]))


def final_metrics(workdir: str) -> dict[str, dict[str, float]]:
    with open(os.path.join(workdir, "summary.json")) as f:
        return {t: m["after_rl"] for t, m in json.load(f)["tasks"].items()}


def run_seed(base_config, seed: int, task: str, out: str, log) -> dict[str, Any]:
    """All arms for one (seed, training task); returns {arm: {eval_task: metrics}}."""
    from mr1jax.trainer.metrics import read_before_rl
    from mr1jax.trainer.loop import train_and_evaluate

    c = base_config.copy_and_resolve_references()
    c.seed, c.data.task, c.export_hf = seed, task, False
    root = os.path.join(out, "runs", f"{task}_seed{seed}")
    os.makedirs(root, exist_ok=True)
    res: dict[str, Any] = {}

    log(f"[{task} seed {seed}] base")
    res["base"] = evaluate_base(c)

    log(f"[{task} seed {seed}] cold-start SFT ({c.sft.steps} steps)")
    sft_dir = os.path.join(root, "sft")
    shutil.rmtree(sft_dir, ignore_errors=True)
    cs = c.copy_and_resolve_references()
    cs.mode, cs.max_steps = "sft_then_grpo", c.sft.steps
    train_and_evaluate(cs, sft_dir)
    res["sft"] = read_before_rl(sft_dir)

    log(f"[{task} seed {seed}] SFT for {c.sft.steps + c.total_steps} steps")
    cl = c.copy_and_resolve_references()
    cl.mode, cl.sft.steps = "sft", c.sft.steps + c.total_steps
    long_dir = os.path.join(root, "sft_same_steps")
    shutil.rmtree(long_dir, ignore_errors=True)
    train_and_evaluate(cl, long_dir)
    res["sft_same_steps"] = final_metrics(long_dir)

    for arm, schedule in (("grpo_constant", "constant"), ("grpo_dynamic", "othink_dynamic")):
        log(f"[{task} seed {seed}] {ARM_NAMES[arm]} ({c.total_steps} RL steps from the SFT checkpoint)")
        d = os.path.join(root, arm)
        shutil.rmtree(d, ignore_errors=True)
        shutil.copytree(sft_dir, d)
        ca = c.copy_and_resolve_references()
        ca.mode, ca.rl.beta_schedule = "sft_then_grpo", schedule
        train_and_evaluate(ca, d)
        res[arm] = final_metrics(d)
    return res


def table(results: dict[str, dict[int, dict]], tasks: list[str]) -> str:
    """Markdown: one row per (training task, arm), held-out accuracy mean +- std over seeds per eval task."""
    lines = []
    for train_task, per_seed in results.items():
        seeds = sorted(per_seed)
        lines += [f"Trained on **{train_task}** (held-out greedy accuracy, mean ± std over seeds {seeds}; "
                  "format rate in brackets)", ""]
        head = "| arm | " + " | ".join(f"{t}{' (transfer)' if t != train_task else ''}" for t in tasks) + " |"
        lines += [head, "|---|" + "---|" * len(tasks)]
        for arm in ARMS:
            cells = []
            for t in tasks:
                acc = np.array([per_seed[s][arm][t]["eval_accuracy"] for s in seeds])
                fmt = np.array([per_seed[s][arm][t]["eval_format_rate"] for s in seeds])
                cells.append(f"{acc.mean():.3f} ± {acc.std(ddof=1) if len(acc) > 1 else 0.0:.3f} "
                             f"({fmt.mean():.2f})")
            lines.append(f"| {ARM_NAMES[arm]} | " + " | ".join(cells) + " |")
        lines += ["", "Per seed, " + train_task + " accuracy: "
                  + "; ".join(f"seed {s}: " + ", ".join(f"{a} {per_seed[s][a][train_task]['eval_accuracy']:.3f}"
                                                         for a in ARMS) for s in seeds), ""]
    return "\n".join(lines)


def plot(results: dict[str, dict[int, dict]], tasks: list[str], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 4), squeeze=False)
    for ax, (train_task, per_seed) in zip(axes[0], results.items()):
        x = np.arange(len(ARMS))
        width = 0.8 / len(tasks)
        for i, t in enumerate(tasks):
            acc = np.array([[per_seed[s][a][t]["eval_accuracy"] for a in ARMS] for s in sorted(per_seed)])
            ax.bar(x + i * width, acc.mean(0), width, yerr=acc.std(0, ddof=1) if len(acc) > 1 else None,
                   label=t + (" (transfer)" if t != train_task else ""), capsize=3)
            for j in range(len(ARMS)):
                ax.scatter(np.full(len(acc), x[j] + i * width), acc[:, j], s=8, color="k", zorder=3)
        ax.set_xticks(x + width * (len(tasks) - 1) / 2, [a.replace("_", "\n") for a in ARMS], fontsize=8)
        ax.set_ylabel("held-out accuracy")
        ax.set_title(f"trained on {train_task}")
        ax.set_ylim(0, 1)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/grpo.py")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--train_tasks", default="counting", help="comma-separated synthetic tasks to train on")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    p.add_argument("--out", default="docs/results")
    args = p.parse_args()
    from mr1jax.data.tasks import TASKS

    base = load_config(args.config, args.set)
    seeds = [int(s) for s in args.seeds.split(",")]
    train_tasks = [t.strip() for t in args.train_tasks.split(",")]
    unknown = [t for t in train_tasks if t not in TASKS]
    if unknown:
        raise SystemExit(f"--train_tasks: unknown {unknown}; allowed {sorted(TASKS)}")
    os.makedirs(args.out, exist_ok=True)
    t0 = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[experiments {time.perf_counter() - t0:7.1f}s] {msg}", flush=True)

    raw_path = os.path.join(args.out, "results.json")
    results: dict[str, dict[int, dict]] = {}
    for task in train_tasks:
        results[task] = {}
        for seed in seeds:
            results[task][seed] = run_seed(base, seed, task, args.out, log)
            with open(raw_path, "w") as f:        # partial results survive an interrupted sweep
                json.dump(results, f, indent=2)
    tasks = list(TASKS)
    md = table(results, tasks)
    cmd = "python scripts/experiments.py " + " ".join(sys.argv[1:])
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(f"# Experiments\n\nCommand: `{cmd}` ({(time.perf_counter() - t0) / 60:.1f} min)\n\n{md}\n")
    plot(results, tasks, os.path.join(args.out, "results.png"))
    print(md)
    log(f"wrote {args.out}/results.md, results.png, results.json")


if __name__ == "__main__":
    main()
