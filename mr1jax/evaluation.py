"""Held-out evaluation: greedy accuracy / format rate / completion length per task, and sampled completions."""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

from mr1jax import distributed, rollout
from mr1jax.config import main_task_name, user_data
from mr1jax.data.pipeline import make_rl_dataset
from mr1jax.data.tasks import TASKS
from mr1jax.rl.ptst import Stage
from mr1jax.sampling import generate


def _eval_batches(rows, tokenizer, c, batch_size: int, shard_index: int = 0, shard_count: int = 1):
    """Held-out prompt batches in row order (fixed shapes, the training prompt template); with several processes,
    this process's `batch_size` rows of each global batch."""
    return make_rl_dataset(rows, tokenizer=tokenizer, batch_size=batch_size, image_size=c.data.image_size,
                           prompt_buckets=(c.data.prompt_bucket,), seed=c.seed, shuffle=False, num_epochs=1,
                           question_template=c.data.question_template, pad_to_max_bucket=True,
                           shard_index=shard_index, shard_count=shard_count)


def _complete_and_score(model, tokenizer, batch, c, max_new_tokens: int, temperature: float = 0.0, rng=None,
                        mesh=None):
    """One completion per prompt of `batch`: (texts, accuracy [B], format [B], completion lengths [B])."""
    ro = generate(model, batch.input_ids, batch.attention_mask, batch.pixel_values, batch.image_grid_thw,
                  num_samples=1, max_new_tokens=max_new_tokens, temperature=temperature, rng=rng, mesh=mesh)
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
    accs, fmts, lens = [], [], []
    n = jax.process_count()
    batches = _eval_batches(rows, tokenizer, c, c.data.batch_size // n, jax.process_index(), n)
    for i, batch in enumerate(batches):
        if i >= c.eval.num_batches:
            break
        _, acc, fmt, length = _complete_and_score(model, tokenizer, batch, c, max_new_tokens, mesh=mesh)
        accs.append(acc)
        fmts.append(fmt)
        lens.append(length)
    if not accs:
        return {}
    scores = distributed.gather(np.stack([np.concatenate(x) for x in (accs, fmts, lens)], 1).astype(np.float64))
    return {"eval_accuracy": float(scores[:, 0].mean()), "eval_format_rate": float(scores[:, 1].mean()),
            "eval_completion_len": float(scores[:, 2].mean())}


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
                rows = TASKS[task](c.data.num_eval, seed=c.seed, split="test", image_size=c.data.image_size)
                out[task] = evaluate(model, tokenizer, rows, c, max_new_tokens, mesh)
    return out

