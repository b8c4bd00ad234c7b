"""The GRPO training command: `python -m mr1jax.train --config=configs/grpo.py --workdir=DIR`.

One readable loop, in sections: config checks, mesh + model, data, optimizer, checkpoint/resume, then per
step: rollouts (sampler) -> rewards (host, worker processes) -> group advantages -> reference
log-probabilities (frozen starting parameters) -> jitted GRPO update(s) -> metrics -> checkpoint.
Evaluation (greedy accuracy, format rate, completion length) runs every `eval.every_steps` and at the end.
SIGTERM saves a checkpoint and exits cleanly; rerunning the same command resumes from the latest one.

The pieces live in their own modules: `mr1jax.config` (checks, schedules, optimizer), `mr1jax.build`
(model, rows), `mr1jax.rollout` (sampling + rewards -> update batch), `mr1jax.evaluation` (held-out
metrics, `sample_completions`), `mr1jax.metrics` (metrics.jsonl, summary.json). Their names used by
notebooks and scripts stay importable from here.
"""

from __future__ import annotations

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
from mr1jax.build import build_model, build_rows
from mr1jax.checkpoint import Checkpointer, PreemptionGuard
from mr1jax.config import (ConfigError, beta_schedule, make_optimizer, phase_steps, uses_kl,  # noqa: F401
                           validate_config)
from mr1jax.data.pipeline import make_rl_dataset
from mr1jax.data.sft import annotator_trace, sft_batch, sft_examples_for_step
from mr1jax.evaluation import evaluate, evaluate_tasks, sample_completions  # noqa: F401  (re-export)
from mr1jax.metrics import MetricsWriter, log_before_rl, read_before_rl, recent_step_time, write_summary
from mr1jax.models.qwen2_vl import prepare_inputs
from mr1jax.models.qwen2_vl.hf import save_pretrained
from mr1jax.plots import plot_curves
from mr1jax.rl import rewards as rw
from mr1jax.rl.ptst import is_stage_boundary, stage_at
from mr1jax.rl.update import GRPOConfig, completion_logprobs, grpo_update, sft_update
from mr1jax.rollout import rollout_batch, select_groups


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
