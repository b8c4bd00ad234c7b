"""Evaluate a checkpoint or a Hugging Face Qwen2-VL directory: `python -m mr1jax.eval`.

    python -m mr1jax.eval --workdir=DIR                          # latest checkpoint, the run's own eval data
    python -m mr1jax.eval --workdir=DIR --step=200 --task=counting --num_examples=500
    python -m mr1jax.eval --checkpoint=DIR/checkpoints/200 --data_files=superclevr200.jsonl --fields=r1v
    python -m mr1jax.eval --hf_path=/models/Qwen2-VL-2B-Instruct --data_files=mathvista.parquet \\
        --fields=geometry3k --image_size=448 --prompt_bucket=512 --max_new_tokens=512
    python -m mr1jax.eval --workdir=DIR --temperature=1.0 --num_samples=8 --seed=0   # sampled pass@8
    python -m mr1jax.eval --hf_path=/models/Qwen2-VL-2B-Instruct --peft_adapter=DIR/hf_adapter --task=counting

Model source (exactly one): a training run's latest checkpoint (`--workdir`), one of its checkpoints
(`--workdir --step` or `--checkpoint=DIR/checkpoints/N`), or a Hugging Face directory (`--hf_path`, tokenizer
from it or `--tokenizer_path`). A checkpoint restores onto the model built from the run's `DIR/config.json`
(only the parameters are read). An `--hf_path` inside a run directory (`DIR/hf`, `DIR/hf-N`) picks up that
run's data defaults.

Data: a registered synthetic task (`--task`, its held-out `test` split, `--num_examples` of them), or
JSONL / JSON / Parquet rows (`--data_files`, `--fields` preset as in training). Without either, a run is
evaluated on its own eval data (`data.eval_files`, else its synthetic task). Image size, prompt bucket,
question template, batch size and max_new_tokens default to the run's config, else to the flags' defaults.

Decoding: greedy by default; `--temperature > 0` samples (`--top_p`, `--top_k`), `--num_samples=k` draws k
completions per prompt: `accuracy` is the mean over all completions (the pass@1 estimate), `pass_at_k` the
fraction of prompts with at least one correct completion. Scoring is the trainer's: accuracy and format
rewards of `mr1jax.rl.rewards`, accuracy in worker processes with a per-sample deadline.

Output: one JSON object on stdout and in `--output` (default `DIR/eval_<task-or-data>.json` for a run,
`DIR/eval_<task-or-data>_step<N>.json` for an explicit step, `./eval.json` for `--hf_path`); progress
lines on stderr.
"""

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
import numpy as np

os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")  # "PyTorch was not found": torch is not used

__all__ = ["EvalError", "main", "pass_metrics", "restore_params", "run_eval"]

# Used when no run config gives them (an --hf_path outside a run directory).
DEFAULTS = dict(image_size=448, prompt_bucket=512, batch_size=8, max_new_tokens=512, reward_timeout_s=5.0,
                question_template="{question} Think first inside <think></think>, then give the final answer "
                                  "inside <answer></answer>.")
DEFAULT_TASK_EXAMPLES = 100
NUM_SHOWN = 4
FIELD_PRESETS = ("generic", "geometry3k", "r1v", "superclevr", "easyr1")


class EvalError(ValueError):
    """A bad combination of flags, a missing checkpoint or a data set that gives nothing to evaluate."""


# ---------------------------------------------------------------------------------------------- flags
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m mr1jax.eval", description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n".join(__doc__.splitlines()[2:8]))
    src = p.add_argument_group("model source (exactly one)")
    src.add_argument("--workdir", help="training run directory: latest checkpoint (or --step), DIR/config.json")
    src.add_argument("--step", type=int, help="checkpoint step of --workdir (default: the latest)")
    src.add_argument("--checkpoint", help="one checkpoint directory, DIR/checkpoints/N")
    src.add_argument("--hf_path", help="Hugging Face Qwen2-VL directory (config.json + safetensors)")
    src.add_argument("--tokenizer_path", help="tokenizer directory for --hf_path (default: --hf_path)")
    src.add_argument("--peft_adapter", help="with --hf_path: a PEFT LoRA adapter directory (adapter_config.json + "
                                            "adapter_model.safetensors) applied to the model")
    src.add_argument("--dtype", choices=("float32", "bfloat16"),
                     help="compute dtype (default: the run's, or the HF config's dtype)")
    data = p.add_argument_group("data (default: the run's eval data)")
    data.add_argument("--task", help="registered synthetic task (held-out test split)")
    data.add_argument("--data_files", help="comma-separated JSONL / JSON / Parquet files")
    data.add_argument("--fields", help=f"field preset of --data_files: {' | '.join(FIELD_PRESETS)} "
                                       "(default: the run's, else generic)")
    data.add_argument("--num_examples", type=int,
                      help=f"prompts to evaluate (default: all rows; {DEFAULT_TASK_EXAMPLES} for a task)")
    data.add_argument("--data_seed", type=int, help="seed of a synthetic task (default: the run's seed, else 0)")
    data.add_argument("--skip_bad_rows", action="store_true",
                      help="skip rows that fail to load or do not fit the prompt bucket (counted in num_skipped)")
    data.add_argument("--image_size", type=int, help="images resized to N x N (multiple of 28)")
    data.add_argument("--prompt_bucket", type=int, help="prompts left-padded to this many tokens")
    data.add_argument("--question_template", help="user text; {question} is replaced by the row's question")
    dec = p.add_argument_group("decoding")
    dec.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    dec.add_argument("--top_p", type=float, default=1.0)
    dec.add_argument("--top_k", type=int, default=0, help="0 = off")
    dec.add_argument("--num_samples", type=int, default=1, help="k completions per prompt (pass@k)")
    dec.add_argument("--max_new_tokens", type=int, help="default: the run's (last PTST stage), else "
                                                        f"{DEFAULTS['max_new_tokens']}")
    dec.add_argument("--batch_size", type=int, help="prompts per generate call (default: the run's)")
    dec.add_argument("--seed", type=int, default=0, help="sampling seed")
    dec.add_argument("--reward_timeout_s", type=float, help="per-sample deadline of the accuracy reward")
    out = p.add_argument_group("output")
    out.add_argument("--output", help="JSON file (default: DIR/eval_<task-or-data>.json, else ./eval.json)")
    out.add_argument("--num_shown", type=int, default=NUM_SHOWN, help="prompts whose completions are shown")
    return p


# ---------------------------------------------------------------------------------------------- helpers
def _say(t0: float, msg: str) -> None:
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


def _checkpoint_steps(workdir: str) -> list[int]:
    from mr1jax.checkpoint import Checkpointer

    directory = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(directory):   # Checkpointer would create it
        return []
    ckpt = Checkpointer(directory, async_save=False)
    steps = sorted(ckpt.all_steps())
    ckpt.close()
    return steps


def restore_params(model, workdir: str, step: int, config=None):
    """Load the parameters of checkpoint `step` of the run in `workdir` into `model` (in place); returns the model.

    Only the `params` subtree of the saved state is read (no optimizer state or reference copy), straight
    onto the shardings of `model`'s parameters. A LoRA run (`config.lora.rank > 0`) saved only adapters: they
    are attached to `model` (the base) and the returned model carries them (the sampler applies them).
    """
    from flax import nnx

    from mr1jax import lora
    from mr1jax.checkpoint import Checkpointer

    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), async_save=False)
    try:
        if config is not None and config.get("lora", {}).get("rank", 0):
            return lora.restore_run_adapters(model, config, workdir, step, lambda a: ckpt.restore_params(step, a))
        params = ckpt.restore_params(step, nnx.state(model, nnx.Param))
    finally:
        ckpt.close()
    nnx.update(model, params)
    return model


class _Indexed(Sequence):
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
    if args.task and args.data_files:
        raise EvalError("conflicting data: pass --task or --data_files, not both")
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
        steps = _checkpoint_steps(workdir)
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
    if args.data_files is not None:
        files = [f.strip() for f in args.data_files.split(",") if f.strip()]
        if not files:
            raise EvalError("--data_files is empty")
        fields = fields or (c.data.fields if c is not None else "generic")
    elif not task:
        if c is None:
            raise EvalError("no data: pass --task=NAME (one of: " + ", ".join(TASKS) + ") or --data_files=...")
        if c.data.eval_files:
            files = [f.strip() for f in c.data.eval_files.split(",") if f.strip()]
            fields = c.data.fields
        elif c.data.get("tfds"):
            raise EvalError(f"the run in {run_dir} trained on the TFDS dataset {c.data.tfds!r}: pass --data_files "
                            "(its source files) or --task")
        elif c.data.train_files:
            raise EvalError(f"the run in {run_dir} has no eval data (data.train_files without data.eval_files): "
                            "pass --task or --data_files")
        else:
            task = c.data.task
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
        task=task, files=files, fields=fields,
        num_examples=args.num_examples if args.num_examples is not None else (DEFAULT_TASK_EXAMPLES if task else None),
        data_seed=pick(args.data_seed, c.seed if c is not None else 0, 0),
        image_size=pick(args.image_size, c.data.image_size if c else None, DEFAULTS["image_size"]),
        prompt_bucket=pick(args.prompt_bucket, c.data.prompt_bucket if c else None, DEFAULTS["prompt_bucket"]),
        question_template=pick(args.question_template, c.data.question_template if c else None,
                               DEFAULTS["question_template"]),
        batch_size=pick(args.batch_size, c.data.batch_size if c else None, DEFAULTS["batch_size"]),
        max_new_tokens=pick(args.max_new_tokens, stages_tokens, DEFAULTS["max_new_tokens"]),
        reward_timeout_s=pick(args.reward_timeout_s, c.rl.reward_timeout_s if c else None,
                              DEFAULTS["reward_timeout_s"]),
        dtype=args.dtype or (_hf_dtype(args.hf_path) if args.hf_path else c.model.dtype),
    )
    for name in ("num_examples", "batch_size", "max_new_tokens", "prompt_bucket", "image_size", "num_samples"):
        value = cfg.get(name, getattr(args, name, None))
        if value is not None and value < 1:
            raise EvalError(f"--{name} must be a positive integer, got {value}")
    if cfg["image_size"] % 28:
        raise EvalError(f"--image_size={cfg['image_size']} must be a multiple of 28")
    if "{question}" not in cfg["question_template"]:
        raise EvalError(f"--question_template must contain '{{question}}', got {cfg['question_template']!r}")
    if args.temperature < 0 or not 0 < args.top_p <= 1 or args.top_k < 0:
        raise EvalError(f"need --temperature >= 0, 0 < --top_p <= 1 and --top_k >= 0, got {args.temperature}, "
                        f"{args.top_p}, {args.top_k}")
    if cfg["reward_timeout_s"] <= 0:
        raise EvalError(f"--reward_timeout_s must be > 0, got {cfg['reward_timeout_s']}")
    label = _data_label(task, files)
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
    from mr1jax.build import build_rows

    c = ml_collections.ConfigDict(dict(
        seed=cfg["data_seed"],
        data=dict(task=cfg["task"] or "", train_files="", eval_files=",".join(cfg["files"]),
                  fields=cfg["fields"] or "generic", skip_bad_rows=cfg["skip_bad_rows"],
                  num_eval=cfg["num_examples"] or 0, image_size=cfg["image_size"])))
    rows = build_rows(c, "eval")
    skipped = int(getattr(rows, "skipped", 0))
    n = len(rows) if cfg["num_examples"] is None else min(cfg["num_examples"], len(rows))
    if n == 0:
        what = f"task {cfg['task']!r}" if cfg["task"] else ", ".join(cfg["files"])
        raise EvalError(f"no data: {what} gave no usable rows" + (f" ({skipped} skipped)" if skipped else ""))
    return rows, n, skipped


# ---------------------------------------------------------------------------------------------- evaluation
def pass_metrics(correct: np.ndarray) -> dict[str, float]:
    """`correct` [prompts, k] (1 = correct): accuracy = mean over all completions (the pass@1 estimate);
    with k > 1 also pass_at_k = fraction of prompts with at least one correct completion."""
    correct = np.asarray(correct, np.float64)
    if correct.ndim != 2 or correct.size == 0:
        raise ValueError(f"correct must be a non-empty [prompts, k] array, got shape {correct.shape}")
    out = {"accuracy": float(correct.mean())}
    if correct.shape[1] > 1:
        out["pass_at_k"] = float((correct > 0).any(1).mean())
    return out


def run_eval(args: argparse.Namespace) -> dict[str, Any]:
    """Evaluate as the parsed flags say; returns the result dict (also written to the output file)."""
    import jax

    from mr1jax import rollout, sharding
    from mr1jax.build import build_model
    from mr1jax.data.pipeline import make_rl_dataset
    from mr1jax.rl import rewards as rw
    from mr1jax.sampling import generate

    t0 = time.perf_counter()
    cfg = resolve(args)
    cfg["skip_bad_rows"] = args.skip_bad_rows
    k = args.num_samples
    if k > 1 and args.temperature == 0:
        _say(t0, f"warning: --num_samples={k} with greedy decoding gives {k} identical completions; "
                 "pass --temperature > 0 for pass@k")

    rows, n, skipped = load_rows(cfg)     # before the model: bad data fails fast

    # ---- model
    mesh = sharding.make_mesh({"data": 1, "fsdp": -1, "tensor": 1})
    if args.hf_path:
        mc = ml_collections.ConfigDict(dict(seed=0, model=dict(hf_path=args.hf_path, dtype=cfg["dtype"],
                                                               tokenizer_path=args.tokenizer_path or "")))
        try:
            model, tokenizer = build_model(mc, mesh)
        except FileNotFoundError as e:
            hint = "; pass --tokenizer_path=DIR" if "tokenizer" in str(e) and not args.tokenizer_path else ""
            raise EvalError(f"{e}{hint}") from None
        if args.peft_adapter:                 # adapters applied in the sampler, no merge
            from mr1jax import lora

            lora.load_peft(model, args.peft_adapter, mesh=mesh)
        source = dict(kind="hf", hf_path=os.path.abspath(args.hf_path),
                      tokenizer_path=os.path.abspath(args.tokenizer_path or args.hf_path), dtype=cfg["dtype"])
        if cfg["run_dir"]:
            source["run_config"] = os.path.join(os.path.abspath(cfg["run_dir"]), "config.json")
    else:
        c = ml_collections.ConfigDict(cfg["config"].to_dict())
        c.model.dtype = cfg["dtype"]
        model, tokenizer = build_model(c, mesh)
        model = restore_params(model, cfg["workdir"], cfg["step"], c)
        source = dict(kind="checkpoint", workdir=os.path.abspath(cfg["workdir"]), step=cfg["step"],
                      checkpoint=os.path.join(os.path.abspath(cfg["workdir"]), "checkpoints", str(cfg["step"])),
                      dtype=cfg["dtype"])
    _say(t0, f"model: {source.get('checkpoint') or source['hf_path']} ({cfg['dtype']})")

    # ---- data: pad to whole batches (an extra one when bad images may be skipped); ids mark real rows
    bs = min(cfg["batch_size"], n)
    pad = -n % bs + (bs if args.skip_bad_rows else 0)
    ds = make_rl_dataset(_Indexed(rows, n, pad), tokenizer=tokenizer, batch_size=bs,
                         image_size=cfg["image_size"], prompt_buckets=(cfg["prompt_bucket"],), seed=0,
                         shuffle=False, num_epochs=1, question_template=cfg["question_template"],
                         skip_bad_rows=args.skip_bad_rows, pad_to_max_bucket=True)
    num_batches = (n + pad) // bs
    data_info = dict(task=cfg["task"], split="test", seed=cfg["data_seed"]) if cfg["task"] else \
        dict(files=[os.path.abspath(f) for f in cfg["files"]], fields=cfg["fields"])
    data_info.update(image_size=cfg["image_size"], prompt_bucket=cfg["prompt_bucket"],
                     question_template=cfg["question_template"])
    _say(t0, f"data: {n} prompt(s) of {cfg['label']}, {num_batches} batch(es) of {bs}, {k} completion(s) each, "
             f"up to {cfg['max_new_tokens']} new tokens, "
             + ("greedy" if args.temperature == 0 else f"temperature {args.temperature}"))

    # ---- decode + score
    key = jax.random.key(args.seed)
    per_prompt: dict[int, dict[str, Any]] = {}
    errors = timeouts = 0
    t_loop = time.perf_counter()
    for b, batch in enumerate(ds):
        ro = generate(model, batch.input_ids, batch.attention_mask, batch.pixel_values, batch.image_grid_thw,
                      num_samples=k, max_new_tokens=cfg["max_new_tokens"], temperature=args.temperature,
                      top_p=args.top_p, top_k=args.top_k, rng=jax.random.fold_in(key, b))
        tokens, mask = np.asarray(ro.tokens), np.asarray(ro.mask)
        texts = rollout.decode_completions(tokenizer, tokens, mask)
        answers = [str(a) for a in np.repeat(batch.answers, k)]
        acc, fmt, stats = rollout.reward_parts(texts, answers, cfg["reward_timeout_s"])
        errors += int(stats.get("n_errors", 0))
        timeouts += int(stats.get("n_timeouts", 0))
        lengths, truncated = mask.sum(1), np.asarray(ro.truncated)
        logp_sums = (np.asarray(ro.logprobs, np.float64) * (mask > 0)).sum(1)
        for j, idx in enumerate(int(i) for i in batch.ids):
            if idx >= n or idx in per_prompt:
                continue
            rs = slice(j * k, (j + 1) * k)
            per_prompt[idx] = dict(acc=acc[rs], fmt=fmt[rs], len=lengths[rs], trunc=truncated[rs], logp=logp_sums[rs],
                                   question=str(batch.questions[j]), answer=str(batch.answers[j]),
                                   texts=texts[rs] if idx < args.num_shown else None)
        done = len(per_prompt)
        rate = (time.perf_counter() - t_loop) / (b + 1)
        accs = np.concatenate([r["acc"] for r in per_prompt.values()]) if per_prompt else np.zeros(1)
        _say(t0, f"batch {b + 1}/{num_batches}: {done}/{n} prompts, accuracy so far {accs.mean():.3f} | "
                 f"{rate:.2f}s/batch, eta {(num_batches - b - 1) * rate:.0f}s")
    rw.close_default_runner()
    if not per_prompt:
        raise EvalError(f"no data: every one of the {n} row(s) was skipped")

    # ---- metrics
    order = sorted(per_prompt)
    acc = np.stack([per_prompt[i]["acc"] for i in order])       # [prompts, k]
    cat = lambda key: np.concatenate([per_prompt[i][key] for i in order]).astype(np.float64)  # noqa: E731
    result: dict[str, Any] = dict(
        **pass_metrics(acc),
        format_rate=float(cat("fmt").mean()), completion_len=float(cat("len").mean()),
        truncated_frac=float(cat("trunc").mean()),
        mean_token_logprob=float(cat("logp").sum() / max(cat("len").sum(), 1)), num_examples=len(order),
        num_skipped=skipped + n - len(order), num_samples=k, num_completions=int(acc.size),
        reward_errors=errors, reward_timeouts=timeouts,
        model=source, data=data_info,
        decoding=dict(greedy=args.temperature == 0, temperature=args.temperature, top_p=args.top_p,
                      top_k=args.top_k, num_samples=k, max_new_tokens=cfg["max_new_tokens"], batch_size=bs,
                      seed=args.seed),
        time_s=round(time.perf_counter() - t0, 3),
        samples=[dict(id=i, sample=s, question=per_prompt[i]["question"], answer=per_prompt[i]["answer"],
                      completion=per_prompt[i]["texts"][s], correct=bool(per_prompt[i]["acc"][s] > 0),
                      format=bool(per_prompt[i]["fmt"][s] > 0))
                 for i in order if per_prompt[i]["texts"] is not None for s in range(k)],
    )
    result["output"] = os.path.abspath(cfg["output"])
    os.makedirs(os.path.dirname(result["output"]), exist_ok=True)
    with open(result["output"], "w") as f:
        json.dump(result, f, indent=2)
        f.write("\n")
    summary = f"accuracy {result['accuracy']:.4f}" + (f", pass@{k} {result['pass_at_k']:.4f}" if k > 1 else "")
    _say(t0, f"{summary}, format {result['format_rate']:.3f}, length {result['completion_len']:.1f} over "
             f"{len(order)} prompt(s); wrote {result['output']}")
    return result


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """CLI entry: parse `argv` (default sys.argv[1:]), evaluate, print the JSON to stdout; returns it.

    Usage errors and missing checkpoints / data exit with status 2 and one `error:` line on stderr.
    """
    from absl import logging as absl_logging

    from mr1jax.checkpoint import CheckpointCorruptError
    from mr1jax.checkpoint import CheckpointMismatchError as StateMismatch
    from mr1jax.data.rows import DataError
    from mr1jax.models.qwen2_vl.hf import CheckpointMismatchError as HFMismatch

    absl_logging.set_verbosity(absl_logging.WARNING)  # Orbax logs every restore at INFO
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        result = run_eval(args)
    except (EvalError, DataError, StateMismatch, HFMismatch, CheckpointCorruptError) as e:
        parser.exit(2, f"{parser.prog}: error: {e}\n")
    except FileNotFoundError as e:
        parser.exit(2, f"{parser.prog}: error: {e}\n")
    print(json.dumps(result, indent=2), flush=True)
    return result


if __name__ == "__main__":
    main()
