"""What `python -m mr1jax.eval` evaluates: its flags resolved against a training run (model source, data,
defaults from the run's config), and the rows to evaluate, padded to whole batches with ids that mark the real
ones."""


from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import ml_collections

from mr1jax.data.vision import DEFAULT_MAX_PIXELS, DEFAULT_MIN_PIXELS

__all__ = ["DEFAULTS", "EvalError", "FIELD_PRESETS", "load_rows", "resolve"]

# Used when no run config gives them (an --hf_path outside a run directory).
DEFAULTS = dict(image_size=448, prompt_bucket=512, batch_size=8, max_new_tokens=512, reward_timeout_s=5.0,
                question_template="{question} Think first inside <think></think>, then give the final answer "
                                  "inside <answer></answer>.")
DEFAULT_TASK_EXAMPLES = 100
NUM_SHOWN = 4
FIELD_PRESETS = ("generic", "geometry3k", "r1v", "superclevr", "easyr1")


class EvalError(ValueError):
    """A bad combination of flags, a missing checkpoint or a data set that gives nothing to evaluate."""




# ---------------------------------------------------------------------------------------------- helpers
def say(t0: float, msg: str) -> None:
    print(f"[{time.perf_counter() - t0:7.1f}s] {msg}", file=sys.stderr, flush=True)


def _load_run_config(workdir: str) -> ml_collections.ConfigDict:
    path = os.path.join(workdir, "config.json")
    if not os.path.isfile(path):
        raise EvalError(f"{path} not found: {workdir!r} is not an mr1jax training run directory")
    with open(path) as f:
        return ml_collections.ConfigDict(json.load(f))


def _run_dir_of_hf(hf_path: str) -> str | None:
    """The training run an exported HF directory sits in (DIR/hf, DIR/hf-N), if any."""
    parent = os.path.dirname(os.path.abspath(hf_path))
    try:
        with open(os.path.join(parent, "config.json")) as f:
            cfg = json.load(f)
    except (OSError, json.JSONDecodeError):
        return None
    return parent if isinstance(cfg, dict) and {"data", "rollout", "model"} <= set(cfg) else None


def _hf_dtype(hf_path: str) -> str:
    try:
        with open(os.path.join(hf_path, "config.json")) as f:
            cfg = json.load(f)
    except (OSError, json.JSONDecodeError):
        return "float32"
    dtype = cfg.get("dtype") or cfg.get("torch_dtype") or cfg.get("text_config", {}).get("dtype")
    return "bfloat16" if dtype in ("bfloat16", "float16") else "float32"


def checkpoint_steps(workdir: str) -> list[int]:
    from mr1jax.trainer.checkpoint import Checkpointer

    directory = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(directory):   # Checkpointer would create it
        return []
    ckpt = Checkpointer(directory, async_save=False)
    steps = sorted(ckpt.all_steps())
    ckpt.close()
    return steps



class IndexedRows(Sequence):
    """The first `n` rows of `base`, then `pad` copies of row 0; every example's id is its index here.

    The RL pipeline drops an incomplete last batch; padding fills it, and the ids tell real rows from padding
    (and which rows a skipped bad image left out).
    """

    def __init__(self, base: Sequence[Mapping[str, Any]], n: int, pad: int):
        self.base, self.n, self.pad = base, n, pad

    def __len__(self) -> int:
        return self.n + self.pad

    def _example(self, i: int, text_only: bool) -> dict[str, Any]:
        if not -len(self) <= i < len(self):
            raise IndexError(i)
        i %= len(self)
        src = i if i < self.n else 0
        getter = getattr(self.base, "text_fields", None) if text_only else None
        ex = dict(getter(src) if getter is not None else self.base[src])
        if text_only:
            ex.pop("image", None)
        ex["id"] = str(i)
        return ex

    def __getitem__(self, i):  # type: ignore[override]
        return self._example(int(i), False)

    def text_fields(self, i: int) -> dict[str, Any]:
        return self._example(int(i), True)


def _check_tfds(spec: str, data_dir: str | None) -> None:
    """EvalError unless `spec` names a prepared TFDS dataset with a held-out (test / validation) split."""
    from mr1jax.data.tfds_source import EVAL_SPLITS, TfdsError, eval_split   # tensorflow_datasets only when used

    try:
        split = eval_split(spec, data_dir)
    except TfdsError as e:
        raise EvalError(f"--tfds={spec}: {e}") from None
    if split is None:
        raise EvalError(f"--tfds={spec}: the dataset has no held-out split ({' / '.join(EVAL_SPLITS)}); prepare "
                        "it with --eval_files, or evaluate on --data_files / --task")


def _data_label(task: str | None, files: list[str]) -> str:
    if task:
        return task
    stems = [Path(f).name.split(".")[0] for f in files]
    label = "+".join(stems[:3]) + (f"+{len(stems) - 3}more" if len(stems) > 3 else "")
    return re.sub(r"[^A-Za-z0-9_.+-]", "_", label)


# ---------------------------------------------------------------------------------------------- resolving
def resolve(args: argparse.Namespace) -> dict[str, Any]:
    """Check the flags and fill every default (from the run's config where there is one)."""
    from mr1jax.data.tasks import TASKS

    sources = [name for name in ("workdir", "checkpoint", "hf_path") if getattr(args, name)]
    if not sources:
        raise EvalError("no model: pass one of --workdir=DIR, --checkpoint=DIR/checkpoints/N, --hf_path=DIR")
    if len(sources) > 1:
        raise EvalError("conflicting model sources " + ", ".join(f"--{s}" for s in sources)
                        + ": pass exactly one (a step of a run: --workdir=DIR --step=N)")
    if args.step is not None and not args.workdir:
        raise EvalError("--step needs --workdir (or pass --checkpoint=DIR/checkpoints/N)")
    if args.tokenizer_path and not args.hf_path:
        raise EvalError("--tokenizer_path only applies to --hf_path (a run uses its config's tokenizer)")
    if getattr(args, "peft_adapter", None) and not args.hf_path:
        raise EvalError("--peft_adapter only applies to --hf_path (a LoRA run's checkpoints carry their adapters)")
    given = [f"--{name}" for name in ("task", "data_files", "tfds") if getattr(args, name, None)]
    if len(given) > 1:
        raise EvalError(f"conflicting data {', '.join(given)}: pass one of --task, --data_files, --tfds")
    if getattr(args, "tfds_data_dir", None) and not getattr(args, "tfds", None):
        raise EvalError("--tfds_data_dir needs --tfds")
    if args.fields and not args.data_files:
        raise EvalError("--fields needs --data_files")

    workdir, step, explicit_step = args.workdir, args.step, args.step is not None
    if args.checkpoint:
        ck = os.path.normpath(os.path.abspath(args.checkpoint))
        if not (os.path.basename(ck).isdigit() and os.path.basename(os.path.dirname(ck)) == "checkpoints"):
            raise EvalError(f"--checkpoint={args.checkpoint} must be a checkpoint directory DIR/checkpoints/N")
        workdir, step, explicit_step = os.path.dirname(os.path.dirname(ck)), int(os.path.basename(ck)), True
    run_dir = workdir
    if args.hf_path:
        if not os.path.isfile(os.path.join(args.hf_path, "config.json")):
            raise EvalError(f"--hf_path={args.hf_path} is not a Hugging Face model directory (no config.json)")
        run_dir = _run_dir_of_hf(args.hf_path)
    c = _load_run_config(run_dir) if run_dir else None

    if workdir:
        steps = checkpoint_steps(workdir)
        if not steps:
            hint = f"; the exported model can be evaluated with --hf_path={workdir}/hf" \
                if os.path.isdir(os.path.join(workdir, "hf")) else ""
            raise EvalError(f"no checkpoint under {workdir}/checkpoints{hint}")
        if step is None:
            step = steps[-1]
        elif step not in steps:
            raise EvalError(f"no checkpoint for step {step} under {workdir}/checkpoints; available steps: "
                            + ", ".join(map(str, steps)))

    def pick(flag, run_value, default):
        return flag if flag is not None else (run_value if c is not None else default)

    # data
    task, files, fields = args.task, [], args.fields
    tfds, tfds_data_dir = getattr(args, "tfds", None), getattr(args, "tfds_data_dir", None)
    if args.data_files is not None:
        files = [f.strip() for f in args.data_files.split(",") if f.strip()]
        if not files:
            raise EvalError("--data_files is empty")
        fields = fields or (c.data.fields if c is not None else "generic")
    elif not task and not tfds:
        if c is None:
            raise EvalError("no data: pass --task=NAME (one of: " + ", ".join(TASKS) + "), --data_files=... or --tfds=...")
        if c.data.eval_files:
            files = [f.strip() for f in c.data.eval_files.split(",") if f.strip()]
            fields = c.data.fields
        elif c.data.get("tfds"):
            tfds, tfds_data_dir = c.data.tfds, c.data.get("tfds_data_dir") or None
        elif c.data.train_files:
            raise EvalError(f"the run in {run_dir} has no eval data (data.train_files without data.eval_files): "
                            "pass --task or --data_files")
        else:
            task = c.data.task
    if tfds:
        _check_tfds(tfds, tfds_data_dir)
    if task and task not in TASKS:
        raise EvalError(f"unknown task {task!r}; registered tasks: {', '.join(TASKS)}")
    if fields and fields.lower() not in FIELD_PRESETS:
        raise EvalError(f"unknown --fields preset {fields!r}; known: {', '.join(FIELD_PRESETS)}")

    stages_tokens = None
    if c is not None:
        from mr1jax.rl.ptst import parse_stages
        stages = parse_stages(c.rl.ptst_stages) if c.rl.get("ptst_stages") else []
        stages_tokens = stages[-1].max_new_tokens if stages else c.rollout.max_new_tokens
    cfg = dict(
        workdir=workdir, step=step, explicit_step=explicit_step, run_dir=run_dir, config=c,
        task=task, files=files, fields=fields, tfds=tfds or "", tfds_data_dir=tfds_data_dir or "",
        num_examples=args.num_examples if args.num_examples is not None else (DEFAULT_TASK_EXAMPLES if task else None),
        data_seed=pick(args.data_seed, c.seed if c is not None else 0, 0),
        image_size=pick(args.image_size, c.data.image_size if c else None, DEFAULTS["image_size"]),
        min_pixels=pick(getattr(args, "min_pixels", None), c.data.get("min_pixels", DEFAULT_MIN_PIXELS) if c else None,
                        DEFAULT_MIN_PIXELS),
        max_pixels=pick(getattr(args, "max_pixels", None), c.data.get("max_pixels", DEFAULT_MAX_PIXELS) if c else None,
                        DEFAULT_MAX_PIXELS),
        images_per_prompt=int(c.data.get("images_per_prompt", 1)) if c else 1,
        scene_size=int(c.data.get("scene_size", 112)) if c else 112,
        prompt_bucket=pick(args.prompt_bucket, c.data.prompt_bucket if c else None, DEFAULTS["prompt_bucket"]),
        question_template=pick(args.question_template, c.data.question_template if c else None,
                               DEFAULTS["question_template"]),
        batch_size=pick(args.batch_size, c.data.batch_size if c else None, DEFAULTS["batch_size"]),
        max_new_tokens=pick(args.max_new_tokens, stages_tokens, DEFAULTS["max_new_tokens"]),
        reward_timeout_s=pick(args.reward_timeout_s, c.rl.reward_timeout_s if c else None,
                              DEFAULTS["reward_timeout_s"]),
        dtype=args.dtype or (_hf_dtype(args.hf_path) if args.hf_path else c.model.dtype),
    )
    for name in ("num_examples", "batch_size", "max_new_tokens", "prompt_bucket", "num_samples"):
        value = cfg.get(name, getattr(args, name, None))
        if value is not None and value < 1:
            raise EvalError(f"--{name} must be a positive integer, got {value}")
    if cfg["image_size"] < 0 or cfg["image_size"] % 28:
        raise EvalError(f"--image_size={cfg['image_size']} must be a multiple of 28, or 0 (native resolution "
                        "between --min_pixels and --max_pixels)")
    if not 0 < cfg["min_pixels"] <= cfg["max_pixels"]:
        raise EvalError(f"need 0 < --min_pixels <= --max_pixels, got {cfg['min_pixels']}, {cfg['max_pixels']}")
    if "{question}" not in cfg["question_template"]:
        raise EvalError(f"--question_template must contain '{{question}}', got {cfg['question_template']!r}")
    if args.temperature < 0 or not 0 < args.top_p <= 1 or args.top_k < 0:
        raise EvalError(f"need --temperature >= 0, 0 < --top_p <= 1 and --top_k >= 0, got {args.temperature}, "
                        f"{args.top_p}, {args.top_k}")
    if cfg["reward_timeout_s"] <= 0:
        raise EvalError(f"--reward_timeout_s must be > 0, got {cfg['reward_timeout_s']}")
    label = _data_label(task or (os.path.basename(os.path.normpath(tfds)) if tfds else None), files)
    if args.output:
        output = args.output
    elif workdir:
        output = os.path.join(workdir, f"eval_{label}" + (f"_step{step}" if explicit_step else "") + ".json")
    else:
        output = "eval.json"
    cfg.update(label=label, output=output)
    return cfg


def load_rows(cfg: dict[str, Any]) -> tuple[Sequence[Mapping[str, Any]], int, int]:
    """(rows, how many of them to evaluate, rows skipped while loading), via the trainer's `build_rows`."""
    from mr1jax.trainer.build import build_rows

    c = ml_collections.ConfigDict(dict(
        seed=cfg["data_seed"],
        data=dict(task=cfg["task"] or "", train_files="", eval_files=",".join(cfg["files"]), tfds=cfg["tfds"],
                  tfds_data_dir=cfg["tfds_data_dir"],
                  fields=cfg["fields"] or "generic", skip_bad_rows=cfg["skip_bad_rows"],
                  num_eval=cfg["num_examples"] or 0, image_size=cfg["image_size"], scene_size=cfg["scene_size"])))
    rows = build_rows(c, "eval")
    skipped = int(getattr(rows, "skipped", 0))
    n = len(rows) if cfg["num_examples"] is None else min(cfg["num_examples"], len(rows))
    if n == 0:
        what = f"task {cfg['task']!r}" if cfg["task"] else f"TFDS {cfg['tfds']!r}" if cfg["tfds"] \
            else ", ".join(cfg["files"])
        raise EvalError(f"no data: {what} gave no usable rows" + (f" ({skipped} skipped)" if skipped else ""))
    return rows, n, skipped
