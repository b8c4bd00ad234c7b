"""Evaluation: held-out greedy accuracy / format rate / completion length per task during training, sampled
completions, and `run_eval`, the whole of `python -m mr1jax.eval` (a run's checkpoint or an HF directory on a
task or data files; greedy or sampled pass@k)."""

from __future__ import annotations

import argparse
import json
import os
import time
from typing import Any

import jax
import ml_collections
import numpy as np

from mr1jax.data.pipeline import make_rl_dataset
from mr1jax.data.tasks import TASKS
from mr1jax.generate.sampler import generate
from mr1jax.models import lora
from mr1jax.parallel import distributed, sharding
from mr1jax.rl import reward_runner
from mr1jax.rl.ptst import Stage
from mr1jax.trainer import rollout
from mr1jax.trainer.build import build_model, restore_params, task_rows
from mr1jax.trainer.config import image_kwargs, main_task_name, user_data
from mr1jax.trainer.eval_inputs import EvalError, IndexedRows, load_rows, resolve, say


def _eval_batches(rows, tokenizer, c, batch_size: int, shard_index: int = 0, shard_count: int = 1):
    """Held-out prompt batches in row order (fixed shapes, the training prompt template); with several processes,
    this process's `batch_size` rows of each global batch."""
    return make_rl_dataset(rows, tokenizer=tokenizer, batch_size=batch_size, prompt_buckets=(c.data.prompt_bucket,),
                           seed=c.seed, shuffle=False, num_epochs=1, question_template=c.data.question_template,
                           pad_to_max_bucket=True, shard_index=shard_index, shard_count=shard_count,
                           **image_kwargs(c))


def _complete_and_score(model, tokenizer, batch, c, max_new_tokens: int, temperature: float = 0.0, rng=None,
                        mesh=None):
    """One completion per prompt of `batch`: (texts, accuracy [B], format [B], completion lengths [B])."""
    ro = generate(model, batch.input_ids, batch.attention_mask, batch.pixel_values, batch.image_grid_thw,
                  num_samples=1, max_new_tokens=max_new_tokens, temperature=temperature, rng=rng, mesh=mesh,
                  patches_per_prompt=batch.patches_per_prompt)
    mask = distributed.local_rows(ro.mask)
    texts = rollout.decode_completions(tokenizer, distributed.local_rows(ro.tokens), mask)
    acc, fmt, _ = rollout.reward_parts(texts, [str(a) for a in batch.answers], c.rl.reward_timeout_s)
    return texts, acc, fmt, mask.sum(1)


def eval_max_new_tokens(c, stage: Stage) -> int:
    """Completion budget of evaluation: `config.eval.max_new_tokens`, or (0) the training stage's."""
    return c.eval.get("max_new_tokens", 0) or stage.max_new_tokens


def evaluate(model, tokenizer, rows, c, max_new_tokens: int, mesh=None) -> dict[str, float]:
    """Greedy rollouts on held-out rows: accuracy, format rate, mean completion length ({} without rows).

    `mesh`: run the sampler with the prompts split over its (data, fsdp) axes (as in training). With several
    processes each scores its share of every batch and the metrics are over all of them (all processes call it)."""
    if rows is None:
        return {}
    if len(rows) == 0:
        raise ValueError("the held-out split has no rows to evaluate")
    accs, fmts, lens, real = [], [], [], []
    n = jax.process_count()
    pad = -len(rows) % c.data.batch_size      # fewer rows than whole global batches: pad, score only the real ones
    source = IndexedRows(rows, len(rows), pad) if pad else rows
    batches = _eval_batches(source, tokenizer, c, c.data.batch_size // n, jax.process_index(), n)
    for i, batch in enumerate(batches):
        if i >= c.eval.num_batches:
            break
        _, acc, fmt, length = _complete_and_score(model, tokenizer, batch, c, max_new_tokens, mesh=mesh)
        accs.append(acc)
        fmts.append(fmt)
        lens.append(length)
        real.append(np.array([int(x) < len(rows) for x in batch.ids]) if pad else np.ones(len(acc), bool))
    columns = [np.concatenate(x) for x in (accs, fmts, lens, real)] if accs else [np.zeros(0)] * 4
    scores = distributed.gather(np.stack(columns, 1).astype(np.float64))
    scores = scores[scores[:, 3] > 0]
    if not len(scores):
        raise ValueError(f"no held-out example was evaluated ({len(rows)} rows, batches of {c.data.batch_size})")
    return {"eval_accuracy": float(scores[:, 0].mean()), "eval_format_rate": float(scores[:, 1].mean()),
            "eval_completion_len": float(scores[:, 2].mean()), "eval_examples": int(len(scores))}


def sample_completions(model, tokenizer, rows, c, *, num: int = 8, max_new_tokens: int | None = None,
                       temperature: float = 0.0, seed: int = 0) -> list[dict[str, Any]]:
    """The model's completions for the first `num` rows (greedy by default), scored like the evaluation.

    Returns [{"question", "answer", "completion", "accuracy", "format"}] in row order (for notebooks/demos).
    """
    batch = next(iter(_eval_batches([rows[i] for i in range(num)], tokenizer, c, num)))
    texts, acc, fmt, _ = _complete_and_score(model, tokenizer, batch, c, max_new_tokens or c.rollout.max_new_tokens,
                                             temperature, jax.random.key(seed))
    return [{"question": rows[i]["question"], "answer": str(batch.answers[i]), "completion": texts[i],
             "accuracy": float(acc[i]), "format": float(fmt[i])} for i in range(num)]


def evaluate_tasks(model, tokenizer, eval_rows, c, max_new_tokens: int, mesh=None) -> dict[str, dict[str, float]]:
    """Held-out metrics on the training task (key: `main_task_name`) and, when training on a synthetic task,
    on every other synthetic task (cross-task transfer)."""
    out = {main_task_name(c): evaluate(model, tokenizer, eval_rows, c, max_new_tokens, mesh)}
    if not user_data(c):
        for task in TASKS:
            if task != c.data.task:
                rows = task_rows(c, task, c.data.num_eval, "test")
                out[task] = evaluate(model, tokenizer, rows, c, max_new_tokens, mesh)
    return out


# ---------------------------------------------------------------------------------------------- python -m mr1jax.eval
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
    t0 = time.perf_counter()
    cfg = resolve(args)
    cfg["skip_bad_rows"] = args.skip_bad_rows
    k = args.num_samples
    if k > 1 and args.temperature == 0:
        say(t0, f"warning: --num_samples={k} with greedy decoding gives {k} identical completions; "
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
    say(t0, f"model: {source.get('checkpoint') or source['hf_path']} ({cfg['dtype']})")

    # ---- data: pad to whole batches (an extra one when bad images may be skipped); ids mark real rows
    bs = min(cfg["batch_size"], n)
    pad = -n % bs + (bs if args.skip_bad_rows else 0)
    ds = make_rl_dataset(IndexedRows(rows, n, pad), tokenizer=tokenizer, batch_size=bs,
                         image_size=cfg["image_size"], min_pixels=cfg["min_pixels"], max_pixels=cfg["max_pixels"],
                         images_per_prompt=cfg["images_per_prompt"], prompt_buckets=(cfg["prompt_bucket"],), seed=0,
                         shuffle=False, num_epochs=1, question_template=cfg["question_template"],
                         skip_bad_rows=args.skip_bad_rows, pad_to_max_bucket=True)
    num_batches = (n + pad) // bs
    data_info = dict(task=cfg["task"], split="test", seed=cfg["data_seed"]) if cfg["task"] else \
        dict(tfds=cfg["tfds"], split=getattr(rows, "split", None)) if cfg["tfds"] else \
        dict(files=[os.path.abspath(f) for f in cfg["files"]], fields=cfg["fields"])
    data_info.update(image_size=cfg["image_size"], prompt_bucket=cfg["prompt_bucket"],
                     **({} if cfg["image_size"] else dict(min_pixels=cfg["min_pixels"], max_pixels=cfg["max_pixels"])),
                     question_template=cfg["question_template"])
    say(t0, f"data: {n} prompt(s) of {cfg['label']}, {num_batches} batch(es) of {bs}, {k} completion(s) each, "
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
                      top_p=args.top_p, top_k=args.top_k, rng=jax.random.fold_in(key, b),
                      patches_per_prompt=batch.patches_per_prompt)
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
        say(t0, f"batch {b + 1}/{num_batches}: {done}/{n} prompts, accuracy so far {accs.mean():.3f} | "
                 f"{rate:.2f}s/batch, eta {(num_batches - b - 1) * rate:.0f}s")
    reward_runner.close_default_runner()
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
    say(t0, f"{summary}, format {result['format_rate']:.3f}, length {result['completion_len']:.1f} over "
             f"{len(order)} prompt(s); wrote {result['output']}")
    return result
