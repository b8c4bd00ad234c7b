"""The GRPO training command: `python -m mr1jax.train --config=configs/grpo.py --workdir=DIR`.

One readable loop, in sections: config checks, mesh + model, data, optimizer, checkpoint/resume, then per
step: rollouts (sampler) -> rewards (host, worker processes) -> group advantages -> reference
log-probabilities (frozen starting parameters) -> jitted GRPO update(s) -> metrics -> checkpoint.
Evaluation (greedy accuracy, format rate, completion length) runs every `eval.every_steps` and at the end.
SIGTERM saves a checkpoint and exits cleanly; rerunning the same command resumes from the latest one.
"""

from __future__ import annotations

import json
import math
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from mr1jax import sharding
from mr1jax.checkpoint import Checkpointer, PreemptionGuard
from mr1jax.data.pipeline import make_rl_dataset
from mr1jax.data.rows import RowSource
from mr1jax.data.sft import annotator_trace, sft_batch, sft_examples_for_step
from mr1jax.data.tasks import TASKS
from mr1jax.data.tokenizer import load_tokenizer, model_token_ids
from mr1jax.models.qwen2_vl import Qwen2VL, Qwen2VLConfig, prepare_inputs
from mr1jax.models.qwen2_vl.hf import load_pretrained, save_pretrained
from mr1jax.plots import plot_curves
from mr1jax.rl import group_advantages, make_schedule
from mr1jax.rl import rewards as rw
from mr1jax.rl.ptst import Stage, is_stage_boundary, parse_stages, stage_at
from mr1jax.rl.update import GRPOConfig, completion_logprobs, grpo_update, sft_update
from mr1jax.sampling import generate


class ConfigError(ValueError):
    """A training config field holds a value mr1jax cannot use."""


CHOICES = {
    "model.dtype": ("float32", "bfloat16"),
    "rl.beta_schedule": ("constant", "othink_dynamic", "linear", "cosine"),
    "rl.agg": ("seq_mean_token_mean", "token_mean", "dr_grpo"),
    "rl.kl_estimator": ("k1", "k2", "k3"),
    "rl.advantage_scale": ("group", "batch", "none"),
    "rl.reward": ("othink", "hard", "accuracy", "format"),
    "data.task": tuple(TASKS),
    "mode": ("grpo", "sft", "sft_then_grpo"),
}
POSITIVE = ("total_steps", "data.batch_size", "data.prompt_bucket", "data.image_size", "rollout.num_samples",
            "rollout.max_new_tokens", "rl.updates_per_batch", "rl.minibatches", "rl.micro_batches", "checkpoint.every_steps",
            "checkpoint.max_to_keep", "log_every")


def _get(c: ml_collections.ConfigDict, dotted: str) -> Any:
    for part in dotted.split("."):
        c = c[part]
    return c


def validate_config(c: ml_collections.ConfigDict) -> list[Stage]:
    """Check every field before anything is built or compiled; returns the rollout stages."""
    for field, allowed in CHOICES.items():
        if _get(c, field) not in allowed:
            raise ConfigError(f"config.{field} = {_get(c, field)!r}; allowed values: {', '.join(allowed)}")
    for field in POSITIVE:
        value = _get(c, field)
        if not isinstance(value, int) or value < 1:
            raise ConfigError(f"config.{field} must be a positive integer, got {value!r}")
    if c.mode != "grpo" and c.sft.steps < 1:
        raise ConfigError(f"config.mode = {c.mode!r} needs config.sft.steps >= 1, got {c.sft.steps}")
    if c.data.image_size % 28:
        raise ConfigError(f"config.data.image_size = {c.data.image_size} must be a multiple of 28")
    if c.data.batch_size % (c.rl.minibatches * c.rl.micro_batches):
        raise ConfigError(f"config.rl.minibatches x config.rl.micro_batches = {c.rl.minibatches} x "
                          f"{c.rl.micro_batches} must divide config.data.batch_size = {c.data.batch_size} "
                          "(both split whole prompt groups)")
    if not 0 < c.rollout.top_p <= 1 or c.rollout.temperature < 0 or c.rollout.top_k < 0:
        raise ConfigError("config.rollout needs 0 < top_p <= 1, temperature >= 0 and top_k >= 0, got "
                          f"top_p={c.rollout.top_p}, temperature={c.rollout.temperature}, top_k={c.rollout.top_k}")
    if not 0 <= c.rl.eps_low < 1 or c.rl.eps_high < 0:
        raise ConfigError(f"config.rl.eps_low must be in [0, 1) and eps_high >= 0, got {c.rl.eps_low}, "
                          f"{c.rl.eps_high}")
    if c.rl.beta_min > c.rl.beta_max or min(c.rl.beta_min, c.rl.beta, 0.0) < 0:
        raise ConfigError(f"config.rl needs 0 <= beta_min <= beta_max and beta >= 0, got beta_min={c.rl.beta_min}, "
                          f"beta_max={c.rl.beta_max}, beta={c.rl.beta}")
    if not 0.0 <= c.sft.annotator_miss_rate <= 1.0 or c.sft.annotator_min_count < 1:
        raise ConfigError(f"config.sft.annotator_miss_rate must be in [0, 1] and annotator_min_count >= 1, got "
                          f"{c.sft.annotator_miss_rate}, {c.sft.annotator_min_count}")
    if not c.data.train_files and c.data.num_train < c.data.batch_size:
        raise ConfigError(f"config.data.num_train = {c.data.num_train} is smaller than one batch "
                          f"({c.data.batch_size})")
    try:
        stages = parse_stages(c.rl.ptst_stages) if c.rl.ptst_stages else []
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return stages or [Stage(c.rollout.max_new_tokens, c.rollout.num_samples, c.total_steps)]


def beta_schedule(c: ml_collections.ConfigDict):
    if c.rl.beta_schedule == "constant":
        return make_schedule("constant", beta=c.rl.beta)
    if c.rl.beta_schedule == "othink_dynamic":
        return make_schedule("othink_dynamic", beta_min=c.rl.beta_min, beta_max=c.rl.beta_max,
                             total_steps=c.total_steps, warmup_fraction=c.rl.warmup_fraction)
    if c.rl.beta_schedule == "linear":
        return make_schedule("linear", beta_min=c.rl.beta_min, beta_max=c.rl.beta_max, total_steps=c.total_steps)
    return make_schedule("cosine", beta_start=c.rl.beta_min, beta_end=c.rl.beta_max, total_steps=c.total_steps)


def phase_steps(c: ml_collections.ConfigDict) -> tuple[int, int]:
    """(SFT steps, RL steps). Global step s < sft_steps is SFT; RL step = s - sft_steps."""
    sft = c.sft.steps if c.mode != "grpo" else 0
    return sft, (c.total_steps if c.mode != "sft" else 0)


def make_optimizer(lr, c: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """One optimizer structure for both phases (so checkpoints of either phase have the same tree)."""
    return optax.chain(optax.clip_by_global_norm(c.optim.grad_clip), optax.adamw(lr, weight_decay=c.optim.weight_decay))


def uses_kl(c: ml_collections.ConfigDict) -> bool:
    """False when beta is 0 for the whole run: the reference model is then skipped."""
    if c.rl.beta_schedule == "constant":
        return c.rl.beta > 0
    return c.rl.beta_max > 0


# ---------------------------------------------------------------------------------------------- building
def build_model(c: ml_collections.ConfigDict, mesh) -> tuple[Qwen2VL, Any]:
    dtype = jnp.bfloat16 if c.model.dtype == "bfloat16" else jnp.float32
    if c.model.hf_path:
        model = load_pretrained(c.model.hf_path, dtype=dtype, mesh=mesh)
        tokenizer = load_tokenizer(c.model.tokenizer_path or c.model.hf_path)
        return model, tokenizer
    tokenizer = load_tokenizer(c.model.tokenizer_path or None)
    cfg = Qwen2VLConfig.tiny(
        vocab_size=len(tokenizer), hidden_size=c.model.tiny.hidden_size, num_layers=c.model.tiny.num_layers,
        vision_depth=c.model.tiny.vision_depth, **model_token_ids(tokenizer))
    model = Qwen2VL(cfg, rngs=nnx.Rngs(c.seed), dtype=dtype, param_dtype=dtype)
    return sharding.shard_model(model, mesh), tokenizer


def build_rows(c: ml_collections.ConfigDict, split: str):
    """Rows of a split: the user's files, or the synthetic task; None for eval when only train files are set."""
    files = c.data.train_files if split == "train" else c.data.eval_files
    if split == "eval" and c.data.train_files and not files:
        return None
    if files:
        return RowSource([f.strip() for f in files.split(",") if f.strip()], c.data.fields,
                         skip_bad_rows=c.data.skip_bad_rows)
    num = c.data.num_train if split == "train" else c.data.num_eval
    return TASKS[c.data.task](num, seed=c.seed, split="train" if split == "train" else "test",
                              image_size=c.data.image_size)


def decode_completions(tokenizer, tokens: np.ndarray, mask: np.ndarray) -> list[str]:
    """Completion texts as they are scored: pad after the stop token, special tokens dropped."""
    return tokenizer.batch_decode(np.where(mask > 0, tokens, tokenizer.pad_token_id), skip_special_tokens=True)


def reward_parts(completions: list[str], answers: list[str], timeout_s: float) -> tuple[np.ndarray, np.ndarray, dict]:
    """(accuracy [N], format [N], runner stats): accuracy in worker processes with a deadline per sample."""
    acc, stats = rw.score_batch(rw.accuracy_reward, completions, answers, timeout_s=timeout_s)
    fmt = np.array([rw.format_reward(t) for t in completions], np.float32)
    return acc, fmt, stats


def combine_reward(kind: str, acc: np.ndarray, fmt: np.ndarray, alpha: float) -> np.ndarray:
    if kind == "othink":
        return acc + alpha * fmt
    if kind == "hard":
        return acc * fmt
    return acc if kind == "accuracy" else fmt


def recent_step_time(times: list[float]) -> float:
    """Median of the last 10 step times of the current phase, leaving out its first (compiling) step."""
    return float(np.median((times[1:] or times)[-10:]))


def read_before_rl(workdir: str) -> dict[str, dict[str, float]]:
    """Held-out metrics per task logged just before RL began (kept in metrics.jsonl, so resumed runs find them).

    Logged as ``before_rl/<task>/<metric>``; returns {task: {metric: value}}.
    """
    path = os.path.join(workdir, "metrics.jsonl")
    out: dict[str, dict[str, float]] = {}
    if os.path.exists(path):
        for line in open(path):
            for k, v in json.loads(line).items():
                if k.startswith("before_rl/"):
                    _, task, metric = k.split("/", 2)
                    out.setdefault(task, {})[metric] = v
    return out


def main_task_name(c: ml_collections.ConfigDict) -> str:
    """The key of the training task's metrics: the synthetic task's name, or "eval" for the user's files."""
    return "eval" if c.data.train_files else c.data.task


def evaluate_tasks(model, tokenizer, eval_rows, c, stage: Stage) -> dict[str, dict[str, float]]:
    """Held-out metrics on the training task (key: `main_task_name`) and, when training on a synthetic task,
    on every other synthetic task (cross-task transfer)."""
    out = {main_task_name(c): evaluate(model, tokenizer, eval_rows, c, stage)}
    if not c.data.train_files:
        for task in TASKS:
            if task != c.data.task:
                rows = TASKS[task](c.data.num_eval, seed=c.seed, split="test", image_size=c.data.image_size)
                out[task] = evaluate(model, tokenizer, rows, c, stage)
    return out


def log_before_rl(writer: "MetricsWriter", step: int, per_task: dict[str, dict[str, float]], say) -> None:
    writer.write(step, {f"before_rl/{t}/{k}": v for t, ev in per_task.items() for k, v in ev.items()})
    for t, ev in per_task.items():
        say(f"before RL, {t}: " + " ".join(f"{k} {v:.3f}" for k, v in ev.items()))


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
    summary = {"task": c.data.task if not c.data.train_files else c.data.train_files, "mode": c.mode,
               "seed": c.seed, "sft_steps": sft_steps, "rl_steps": rl_steps, "beta_schedule": c.rl.beta_schedule,
               "wall_time_s": round(wall_s, 1), "before_rl": before.get(main, {}), "after_rl": after.get(main, {}),
               "tasks": tasks}
    with open(os.path.join(workdir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    return summary


class MetricsWriter:
    """JSONL (`<workdir>/metrics.jsonl`), TensorBoard event files (tensorboardX) and a console line."""

    def __init__(self, workdir: str):
        self.path = os.path.join(workdir, "metrics.jsonl")
        self.file = open(self.path, "a")
        try:
            from tensorboardX import SummaryWriter
            self.tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
        except ImportError:  # pragma: no cover - tensorboardX is a dependency
            self.tb = None

    def write(self, step: int, metrics: dict[str, float]) -> None:
        self.file.write(json.dumps({"step": step, **metrics}) + "\n")
        self.file.flush()
        if self.tb is not None:
            for k, v in metrics.items():
                if isinstance(v, (int, float)) and math.isfinite(v):
                    self.tb.add_scalar(k, v, step)
            self.tb.flush()

    def close(self) -> None:
        self.file.close()
        if self.tb is not None:
            self.tb.close()


# ---------------------------------------------------------------------------------------------- steps
def rollout_batch(model, tokenizer, batch, stage: Stage, c, rng) -> tuple[dict, dict]:
    """Sample G completions per prompt, score them, and build the update batch (device arrays)."""
    g = stage.num_samples
    ro = generate(model, batch.input_ids, batch.attention_mask, batch.pixel_values, batch.image_grid_thw,
                  num_samples=g, max_new_tokens=stage.max_new_tokens, temperature=c.rollout.temperature,
                  top_p=c.rollout.top_p, top_k=c.rollout.top_k, rng=rng)
    tokens, mask = np.asarray(ro.tokens), np.asarray(ro.mask)
    texts = decode_completions(tokenizer, tokens, mask)
    answers = [str(a) for a in np.repeat(batch.answers, g)]
    acc, fmt, stats = reward_parts(texts, answers, c.rl.reward_timeout_s)
    rewards = combine_reward(c.rl.reward, acc, fmt, c.rl.alpha)
    adv = group_advantages(jnp.asarray(rewards), g, scale=c.rl.advantage_scale)
    full_ids = np.concatenate([np.repeat(batch.input_ids, g, 0), tokens], 1)
    full_mask = np.concatenate([np.repeat(batch.attention_mask, g, 0), mask], 1)
    cfg = model.config
    positions = prepare_inputs(cfg, full_ids, full_mask, np.repeat(batch.image_grid_thw, g, 0)).position_ids
    prompt_extra = prepare_inputs(cfg, batch.input_ids, batch.attention_mask, batch.image_grid_thw)
    device_batch = dict(input_ids=jnp.asarray(full_ids), attention_mask=jnp.asarray(full_mask),
                        position_ids=jnp.asarray(positions), pixel_values=jnp.asarray(batch.pixel_values),
                        patch_pos=jnp.asarray(prompt_extra.patch_pos), completion_mask=ro.mask,
                        old_logps=ro.logprobs, advantages=adv)
    info = dict(reward=float(rewards.mean()), accuracy=float(acc.mean()), format_rate=float(fmt.mean()),
                completion_len=float(mask.sum(1).mean()), truncated_frac=float(np.asarray(ro.truncated).mean()),
                reward_errors=int(stats.get("n_errors", 0)), reward_timeouts=int(stats.get("n_timeouts", 0)),
                reward_std=float(rewards.std()), sample=texts[0][:200])
    return device_batch, info


def select_groups(batch: dict[str, jax.Array], groups: np.ndarray, g: int, prompts: int) -> dict[str, jax.Array]:
    """The rows (and per-prompt images) of prompt groups `groups` from an update batch of `prompts` prompts."""
    rows = (groups[:, None] * g + np.arange(g)).reshape(-1)
    out = {}
    for k, v in batch.items():
        if k == "position_ids":
            out[k] = v[:, rows]
        elif k in ("pixel_values", "patch_pos"):
            out[k] = v.reshape(prompts, -1, v.shape[-1])[groups].reshape(-1, v.shape[-1])
        else:
            out[k] = v[rows]
    return out


def _eval_batches(rows, tokenizer, c, batch_size: int):
    """Held-out prompt batches in row order (fixed shapes, the training prompt template)."""
    return make_rl_dataset(rows, tokenizer=tokenizer, batch_size=batch_size, image_size=c.data.image_size,
                           prompt_buckets=(c.data.prompt_bucket,), seed=c.seed, shuffle=False, num_epochs=1,
                           question_template=c.data.question_template, pad_to_max_bucket=True)


def _complete_and_score(model, tokenizer, batch, c, max_new_tokens: int, temperature: float = 0.0, rng=None):
    """One completion per prompt of `batch`: (texts, accuracy [B], format [B], completion lengths [B])."""
    ro = generate(model, batch.input_ids, batch.attention_mask, batch.pixel_values, batch.image_grid_thw,
                  num_samples=1, max_new_tokens=max_new_tokens, temperature=temperature, rng=rng)
    mask = np.asarray(ro.mask)
    texts = decode_completions(tokenizer, np.asarray(ro.tokens), mask)
    acc, fmt, _ = reward_parts(texts, [str(a) for a in batch.answers], c.rl.reward_timeout_s)
    return texts, acc, fmt, mask.sum(1)


def evaluate(model, tokenizer, rows, c, stage: Stage) -> dict[str, float]:
    """Greedy rollouts on held-out rows: accuracy, format rate, mean completion length ({} without rows)."""
    if rows is None:
        return {}
    accs, fmts, lens = [], [], []
    for i, batch in enumerate(_eval_batches(rows, tokenizer, c, c.data.batch_size)):
        if i >= c.eval.num_batches:
            break
        _, acc, fmt, length = _complete_and_score(model, tokenizer, batch, c, stage.max_new_tokens)
        accs.append(acc)
        fmts.append(fmt)
        lens.append(length)
    if not accs:
        return {}
    return {"eval_accuracy": float(np.concatenate(accs).mean()), "eval_format_rate": float(np.concatenate(fmts).mean()),
            "eval_completion_len": float(np.concatenate(lens).mean())}


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


# ---------------------------------------------------------------------------------------------- the loop
def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Run (or resume) training in `workdir`; returns the final metrics."""
    c = config
    stages = validate_config(c)
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "config.json"), "w") as f:
        f.write(c.to_json_best_effort(indent=2))
    t_start = time.perf_counter()

    def say(msg: str) -> None:
        print(f"[{time.perf_counter() - t_start:7.1f}s] {msg}", flush=True)

    # ---- mesh, model, reference
    mesh = sharding.make_mesh(dict(c.mesh))
    say(f"mesh {dict(mesh.shape)} on {jax.device_count()} {jax.devices()[0].platform} device(s); building model")
    model, tokenizer = build_model(c, mesh)
    graphdef, params = nnx.split(model)
    n_params = sum(x.size for x in jax.tree.leaves(params))
    kl_on = uses_kl(c) and phase_steps(c)[1] > 0
    ref_params = jax.tree.map(jnp.copy, params) if kl_on else None
    say(f"model: {n_params:,} parameters ({c.model.dtype}); reference model {'kept' if kl_on else 'skipped (beta = 0)'}")

    # ---- data
    train_rows, eval_rows = build_rows(c, "train"), build_rows(c, "eval")
    ds = make_rl_dataset(train_rows, tokenizer=tokenizer, batch_size=c.data.batch_size,
                         image_size=c.data.image_size, prompt_buckets=(c.data.prompt_bucket,), seed=c.seed,
                         question_template=c.data.question_template, pad_to_max_bucket=True,
                         skip_bad_rows=c.data.skip_bad_rows)
    data_iter = iter(ds)
    say(f"data: {len(train_rows)} train rows, {len(eval_rows) if eval_rows is not None else 'no'} eval rows, "
        f"{c.data.batch_size} prompts per step")

    # ---- optimizers and schedules (SFT: warmup + cosine; RL: constant after optional warmup)
    sft_steps, rl_steps = phase_steps(c)
    lr = optax.warmup_constant_schedule(0.0, c.optim.learning_rate, c.optim.warmup_steps) \
        if c.optim.warmup_steps else c.optim.learning_rate
    tx = make_optimizer(lr, c)
    sft_tx = make_optimizer(optax.warmup_cosine_decay_schedule(
        0.0, c.sft.learning_rate, max(1, int(c.sft.warmup_fraction * sft_steps)), max(sft_steps, 2)), c) \
        if sft_steps else None
    opt_state = sharding.place_on_mesh((sft_tx or tx).init(params), mesh)
    beta_of = beta_schedule(c)
    total = sft_steps + rl_steps
    keep_ref = kl_on and sft_steps > 0 and rl_steps > 0   # reference = the model after SFT: checkpoint it

    # ---- checkpoint / resume
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), max_to_keep=c.checkpoint.max_to_keep,
                        async_save=c.checkpoint.async_save)
    rng = jax.random.key(c.seed)
    start = 0

    def state_tree() -> dict[str, Any]:
        state = {"params": params, "opt_state": opt_state, "rng": jax.random.key_data(rng)}
        if keep_ref:
            state["ref_params"] = ref_params
        return state

    if ckpt.latest_step() is not None:
        restored, meta = ckpt.restore(None, state_tree(), data_iterator=data_iter)
        params, opt_state = restored["params"], restored["opt_state"]
        ref_params = restored.get("ref_params", ref_params)
        rng = jax.random.wrap_key_data(restored["rng"])
        start = int(meta["step"])
        nnx.update(model, params)
        say(f"resumed from step {start} ({ckpt.directory})")

    def save(step: int) -> None:
        rl_step = max(step - sft_steps, 0)
        ckpt.save(step, state_tree(), {"step": step, "beta": float(beta_of(rl_step)),
                                       "stage": stage_at(stages, rl_step)[0], "phase": "sft" if step < sft_steps
                                       else "rl"}, data_iterator=data_iter)

    update_fn = jax.jit(grpo_update, static_argnames=("graphdef", "tx", "cfg"))
    ref_fn = jax.jit(lambda p, b, **kw: completion_logprobs(nnx.merge(graphdef, p), b["input_ids"],
                                                             b["attention_mask"], b["position_ids"],
                                                             b["pixel_values"], b["patch_pos"], **kw),
                     static_argnames=("prompt_len", "num_samples", "patch_segments"))
    sft_fn = jax.jit(sft_update, static_argnames=("graphdef", "tx", "patch_segments"))
    end = total if c.max_steps < 0 else min(total, start + c.max_steps)
    sft_rows = train_rows
    sft_trace = annotator_trace(c.sft.annotator_miss_rate, c.sft.annotator_min_count, c.seed)
    sft_len = c.data.prompt_bucket + max(s.max_new_tokens for s in stages)

    def sft_phase_step(step: int):
        t0 = time.perf_counter()
        examples = sft_examples_for_step(sft_rows, step, c.data.batch_size, c.seed)
        b = sft_batch(tokenizer, examples, image_size=c.data.image_size, seq_len=sft_len,
                      question_template=c.data.question_template, response_fn=sft_trace)
        extra = prepare_inputs(model.config, b["input_ids"], b["attention_mask"], b["image_grid_thw"])
        dev = dict(input_ids=jnp.asarray(b["input_ids"]), attention_mask=jnp.asarray(b["attention_mask"]),
                   loss_mask=jnp.asarray(b["loss_mask"]), position_ids=jnp.asarray(extra.position_ids),
                   pixel_values=jnp.asarray(b["pixel_values"]), patch_pos=jnp.asarray(extra.patch_pos))
        new_params, new_opt, m = sft_fn(graphdef, params, opt_state, dev, tx=sft_tx,
                                        patch_segments=c.data.batch_size)
        nnx.update(model, new_params)
        return new_params, new_opt, {"sft_loss": float(m["loss"]), "grad_norm": float(m["grad_norm"]),
                                     "time_step": time.perf_counter() - t0}

    writer = MetricsWriter(workdir)
    before_rl = read_before_rl(workdir)
    last: dict[str, Any] = {}
    step_times: list[float] = []
    say(f"training steps {start} -> {end} of {total} ({sft_steps} SFT + {rl_steps} RL)")
    if start == 0 and sft_steps == 0 and rl_steps:
        say("evaluating the starting model on the held-out splits")
        before_rl = evaluate_tasks(model, tokenizer, eval_rows, c, stages[0])
        log_before_rl(writer, 0, before_rl, say)
    with PreemptionGuard() as guard:
        step = start
        while step < end:
            t0 = time.perf_counter()
            if step < sft_steps:
                params, opt_state, last = sft_phase_step(step)
                step += 1
                step_times.append(time.perf_counter() - t0)
                writer.write(step, last)
                if step % c.log_every == 0 or step == sft_steps:
                    say(f"sft step {step}/{end} loss {last['sft_loss']:.4f} grad_norm {last['grad_norm']:.3f} "
                        f"| {last['time_step']:.2f}s | eta {(end - step) * recent_step_time(step_times):.0f}s")
                if step == sft_steps and rl_steps:
                    # RL starts from the SFT model: it becomes the frozen reference; fresh optimizer state
                    ref_params = jax.tree.map(jnp.copy, params) if kl_on else None
                    opt_state = sharding.place_on_mesh(tx.init(params), mesh)
                    say("SFT done; evaluating on the held-out splits before RL")
                    before_rl = evaluate_tasks(model, tokenizer, eval_rows, c, stages[0])
                    log_before_rl(writer, step, before_rl, say)
                    step_times.clear()   # the ETA of the RL phase comes from RL steps only
                if guard.requested or step % c.checkpoint.every_steps == 0 or step == end or step == sft_steps:
                    save(step)
                if guard.requested:
                    ckpt.wait()
                    say(f"{guard.signal_name}: saved checkpoint at step {step}; exiting")
                    writer.close()
                    ckpt.close()
                    return last
                continue
            rl_step = step - sft_steps
            if step in (start, sft_steps):
                say("first RL step: compiling the sampler, reference and update")
            stage_idx, stage = stage_at(stages, rl_step)
            rng, sample_rng = jax.random.split(rng)
            batch = next(data_iter)
            dev_batch, info = rollout_batch(model, tokenizer, batch, stage, c, sample_rng)
            t1 = time.perf_counter()
            per_mb = c.data.batch_size // c.rl.minibatches          # prompts per optimizer step
            gcfg = GRPOConfig(num_samples=stage.num_samples, prompt_len=c.data.prompt_bucket, eps_low=c.rl.eps_low,
                              eps_high=c.rl.eps_high, agg=c.rl.agg, kl_estimator=c.rl.kl_estimator,
                              micro_batches=c.rl.micro_batches, patch_segments=per_mb // c.rl.micro_batches)
            if kl_on:
                dev_batch["ref_logps"] = ref_fn(ref_params, dev_batch, prompt_len=gcfg.prompt_len,
                                                num_samples=gcfg.num_samples,
                                                patch_segments=c.data.batch_size)
            t2 = time.perf_counter()
            beta = jnp.float32(beta_of(rl_step))
            # mu passes over the rollout batch, each over shuffled mini-batches of whole prompt groups
            order_rng = np.random.default_rng([c.seed, step])
            for _ in range(c.rl.updates_per_batch):
                for groups in np.split(order_rng.permutation(c.data.batch_size), c.rl.minibatches):
                    sub = dev_batch if c.rl.minibatches == 1 else select_groups(
                        dev_batch, np.sort(groups), stage.num_samples, c.data.batch_size)
                    params, opt_state, m = update_fn(graphdef, params, opt_state, sub, beta, tx=tx, cfg=gcfg)
            nnx.update(model, params)
            m = {k: float(v) for k, v in m.items()}
            t3 = time.perf_counter()
            step += 1
            step_times.append(t3 - t0)
            eta = (end - step) * recent_step_time(step_times)
            last = dict(info, **{k: m[k] for k in ("loss", "policy_loss", "beta", "grad_norm", "clip_frac")},
                        kl=m.get("kl", 0.0), stage=stage_idx, time_rollout=t1 - t0, time_reference=t2 - t1,
                        time_update=t3 - t2, time_step=t3 - t0)
            sample = last.pop("sample")
            writer.write(step, last)
            if step % c.log_every == 0 or step == end:
                say(f"step {step}/{end} reward {last['reward']:.3f} acc {last['accuracy']:.2f} "
                    f"fmt {last['format_rate']:.2f} len {last['completion_len']:.1f} beta {last['beta']:.4f} "
                    f"kl {last['kl']:.4f} | rollout {last['time_rollout']:.2f}s ref {last['time_reference']:.2f}s "
                    f"update {last['time_update']:.2f}s | eta {eta:.0f}s")
            if step == start + 1:
                say(f"sample completion: {sample!r}")
            if c.eval.every_steps and step % c.eval.every_steps == 0 and step < end:
                ev = evaluate(model, tokenizer, eval_rows, c, stage)
                writer.write(step, ev)
                say("eval " + " ".join(f"{k} {v:.3f}" for k, v in ev.items()))
            if guard.requested:
                save(step)
                ckpt.wait()
                say(f"{guard.signal_name}: saved checkpoint at step {step}; exiting")
                writer.close()
                ckpt.close()
                return last
            if step % c.checkpoint.every_steps == 0 or is_stage_boundary(stages, step - sft_steps) or step == end:
                save(step)
    final_stage = stage_at(stages, max(end - 1 - sft_steps, 0))[1]
    say("final evaluation on the held-out splits")
    after = evaluate_tasks(model, tokenizer, eval_rows, c, final_stage)
    ev = next(iter(after.values()))
    writer.write(end, ev)
    for t, m in after.items():
        say(f"final eval, {t}: " + " ".join(f"{k} {v:.3f}" for k, v in m.items()))
    if end == total:
        summary = write_summary(workdir, c, before_rl, after, time.perf_counter() - t_start)
        for t, m in summary["tasks"].items():
            if m["accuracy_gain"] is not None:
                say(f"{t}: held-out accuracy {m['before_rl']['eval_accuracy']:.3f} before RL -> "
                    f"{m['after_rl']['eval_accuracy']:.3f} after RL ({m['accuracy_gain']:+.3f})")
        say(f"wrote {os.path.join(workdir, 'summary.json')} and {plot_curves(workdir)}")
    ckpt.close()
    writer.close()
    if c.export_hf and end == total:
        save_pretrained(model, os.path.join(workdir, "hf"))
        tokenizer.save_pretrained(os.path.join(workdir, "hf"))
        say(f"exported Hugging Face directory {os.path.join(workdir, 'hf')}")
    rw.close_default_runner()
    return dict(last, **ev)


def main(argv: list[str]) -> None:
    del argv
    from absl import flags, logging

    logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO

    train_and_evaluate(flags.FLAGS.config, flags.FLAGS.workdir)


if __name__ == "__main__":
    from absl import app, flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", "configs/grpo.py", "training config file", lock_config=True)
    flags.DEFINE_string("workdir", "/tmp/mr1jax", "where checkpoints, metrics and exports go")
    app.run(main)
