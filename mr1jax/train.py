"""The training command: `python -m mr1jax.train --config=configs/grpo.py --workdir=DIR`.

`train_and_evaluate` builds the run (mesh, model, data, optimizers, TrainState, checkpoint) and then reads
top to bottom: per step, one cold-start SFT step or one RL step (rollouts -> rewards -> reference log-probs ->
GRPO updates; `mr1jax.train_steps`), metrics, the SFT -> RL boundary, evaluation, checkpoint. SIGTERM saves
a checkpoint and exits; rerunning the same command resumes exactly from the latest one.

The pieces live in their own modules: `mr1jax.config` (checks, schedules, optimizer), `mr1jax.build`
(model, rows), `mr1jax.steps` (TrainState, sharded jitted steps), `mr1jax.train_steps` (one SFT / RL step),
`mr1jax.rollout` (sampling + rewards -> update batch), `mr1jax.evaluation` (held-out metrics,
`sample_completions`), `mr1jax.metrics` (metrics.jsonl, summary.json). Names used by notebooks and scripts
stay importable from here.
"""

from __future__ import annotations

import os
import time
from typing import Any

import jax
import ml_collections
import numpy as np
import optax
from flax import nnx

from mr1jax import sharding
from mr1jax import steps as st
from mr1jax.build import build_model, build_rows, model_dtypes
from mr1jax.checkpoint import Checkpointer, PreemptionGuard
from mr1jax.config import (ConfigError, beta_schedule, make_optimizer, phase_steps, uses_kl,  # noqa: F401
                           validate_config)
from mr1jax.data.pipeline import make_rl_dataset
from mr1jax.data.sft import annotator_trace, sft_examples_for_step
from mr1jax.evaluation import eval_max_new_tokens, evaluate, evaluate_tasks, sample_completions  # noqa: F401
from mr1jax.metrics import MetricsWriter, log_before_rl, read_before_rl, recent_step_time, write_summary
from mr1jax.models.qwen2_vl.hf import save_pretrained
from mr1jax.plots import plot_curves
from mr1jax.rl import rewards as rw
from mr1jax.rl.ptst import is_stage_boundary, stage_at
from mr1jax.train_steps import StepFunctions, rl_step, sft_step, start_rl, updates_per_rl_step


# ---------------------------------------------------------------------------------------------- setup
def make_optimizers(c: ml_collections.ConfigDict) -> tuple[optax.GradientTransformation | None,
                                                           optax.GradientTransformation]:
    """(SFT optimizer or None, RL optimizer): the same structure, so checkpoints of either phase match.

    SFT: warmup + cosine over the SFT steps. RL: constant after `optim.warmup_steps` RL steps (the schedule
    counts RL steps, however many optimizer steps each takes)."""
    sft_steps, _ = phase_steps(c)
    per_step = updates_per_rl_step(c)
    warm = optax.warmup_constant_schedule(0.0, c.optim.learning_rate, c.optim.warmup_steps) \
        if c.optim.warmup_steps else optax.constant_schedule(c.optim.learning_rate)
    rl_lr = lambda n: warm(n // per_step)  # noqa: E731  (a schedule even when constant: one state structure)
    sft_tx = make_optimizer(optax.warmup_cosine_decay_schedule(
        0.0, c.sft.learning_rate, max(1, int(c.sft.warmup_fraction * sft_steps)), max(sft_steps, 2)), c) \
        if sft_steps else None
    return sft_tx, make_optimizer(rl_lr, c)


def check_mesh_fits(c: ml_collections.ConfigDict, mesh) -> list[str]:
    """ConfigError unless every batch splits over the mesh's (data, fsdp) devices; returns warnings for
    micro-batches that do not split evenly."""
    checks = [(c.data.batch_size // c.rl.minibatches, c.rl.micro_batches,
               "config.data.batch_size / rl.minibatches / rl.micro_batches")]
    if phase_steps(c)[0]:
        checks.append((c.data.batch_size, c.sft.micro_batches, "config.data.batch_size / sft.micro_batches"))
    warnings = []
    for prompts, micro, what in checks:
        error, warning = st.batch_split_problems(mesh, prompts, micro, what)
        if error:
            raise ConfigError(error)
        warnings += [warning] if warning else []
    return warnings


def checkpoint_tree(state: st.TrainState) -> dict[str, Any]:
    """What a checkpoint holds: parameters, optimizer state, RNG and, when present, the reference."""
    tree = {"params": state.params, "opt_state": state.opt_state, "rng": state.rng}
    if state.ref_params is not None:
        tree["ref_params"] = state.ref_params
    return tree


def restore_state(ckpt: Checkpointer, state: st.TrainState, data_iter, *, with_ref_after: int | None,
                  ref_dtype) -> st.TrainState:
    """`state` from the latest checkpoint (and the data iterator's position), or unchanged without one.

    with_ref_after: a checkpoint of step >= this holds the reference (the SFT model); None = never saved (the
    reference is the starting model, rebuilt at start).
    """
    step = ckpt.latest_step()
    if step is None:
        return state
    tree = checkpoint_tree(state)
    if with_ref_after is not None and step >= with_ref_after and state.ref_params is None:
        tree["ref_params"] = jax.tree.map(lambda x: jax.ShapeDtypeStruct(
            x.shape, ref_dtype if jax.numpy.issubdtype(x.dtype, jax.numpy.floating) else x.dtype,
            sharding=x.sharding), state.params)
    elif with_ref_after is not None and step < with_ref_after:
        tree.pop("ref_params", None)
    restored, meta = ckpt.restore(step, tree, data_iterator=data_iter)
    return st.TrainState(params=restored["params"], opt_state=restored["opt_state"],
                         ref_params=restored.get("ref_params", state.ref_params if with_ref_after is None else None),
                         rng=restored["rng"], step=int(meta["step"]))


# ---------------------------------------------------------------------------------------------- the loop
def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *, devices=None) -> dict[str, Any]:
    """Run (or resume) training in `workdir` on `devices` (default: all); returns the final metrics and, under
    ``compile_counts``, how many times each jitted step compiled."""
    c = config
    stages = validate_config(c)
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "config.json"), "w") as f:
        f.write(c.to_json_best_effort(indent=2))
    t_start = time.perf_counter()

    def say(msg: str) -> None:
        print(f"[{time.perf_counter() - t_start:7.1f}s] {msg}", flush=True)

    # ---- mesh, model, optimizers, state
    mesh = sharding.make_mesh(dict(c.mesh), devices)
    say(f"mesh {dict(mesh.shape)} on {mesh.size} {jax.devices()[0].platform} device(s); building model")
    for warning in check_mesh_fits(c, mesh):
        say(f"warning: {warning}")
    model, tokenizer = build_model(c, mesh)
    graphdef, params = nnx.split(model)
    compute_dtype, _ = model_dtypes(c)
    sft_steps, rl_steps = phase_steps(c)
    total, kl_on = sft_steps + rl_steps, uses_kl(c) and rl_steps > 0
    sft_tx, rl_tx = make_optimizers(c)
    state = st.init_train_state(params, sft_tx or rl_tx, mesh, ref_dtype=compute_dtype,
                                keep_ref=kl_on and not sft_steps, seed=c.seed)
    fns = StepFunctions(graphdef, mesh, st.state_shardings(state, mesh), sft_tx=sft_tx, rl_tx=rl_tx)
    say(f"model: {sum(x.size for x in jax.tree.leaves(params)):,} parameters ({c.model.param_dtype} master, "
        f"{c.model.dtype} compute, remat {c.model.remat}); reference model "
        f"{'kept (' + c.model.dtype + ')' if kl_on else 'skipped (beta = 0)'}")
    model_config = model.config
    del model, params                                                     # the state owns the parameters now

    # ---- data
    train_rows, eval_rows = build_rows(c, "train"), build_rows(c, "eval")
    data_iter = iter(make_rl_dataset(
        train_rows, tokenizer=tokenizer, batch_size=c.data.batch_size, image_size=c.data.image_size,
        prompt_buckets=(c.data.prompt_bucket,), seed=c.seed, question_template=c.data.question_template,
        pad_to_max_bucket=True, skip_bad_rows=c.data.skip_bad_rows))
    sft_trace = annotator_trace(c.sft.annotator_miss_rate, c.sft.annotator_min_count, c.seed)
    sft_len = c.data.prompt_bucket + max(s.max_new_tokens for s in stages)
    say(f"data: {len(train_rows)} train rows, {len(eval_rows) if eval_rows is not None else 'no'} eval rows, "
        f"{c.data.batch_size} prompts per step")

    # ---- checkpoint / resume
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), max_to_keep=c.checkpoint.max_to_keep,
                        async_save=c.checkpoint.async_save)
    state = restore_state(ckpt, state, data_iter, with_ref_after=sft_steps if kl_on and sft_steps else None,
                          ref_dtype=compute_dtype)
    start = state.step
    if start:
        say(f"resumed from step {start} ({ckpt.directory})")
    beta_of = beta_schedule(c)
    policy = lambda: nnx.merge(graphdef, state.params)  # noqa: E731  (the model on the current parameters)
    evaluate_all = lambda stage: evaluate_tasks(policy(), tokenizer, eval_rows, c,  # noqa: E731
                                                eval_max_new_tokens(c, stage), mesh)

    def save(s: st.TrainState) -> None:
        rl = max(s.step - sft_steps, 0)
        ckpt.save(s.step, checkpoint_tree(s), {"step": s.step, "beta": float(beta_of(rl)),
                                               "stage": stage_at(stages, rl)[0],
                                               "phase": "sft" if s.step < sft_steps else "rl"},
                  data_iterator=data_iter)

    # ---- the loop
    writer = MetricsWriter(workdir)
    before_rl, last, step_times = read_before_rl(workdir), {}, []
    end = total if c.max_steps < 0 else min(total, start + c.max_steps)
    say(f"training steps {start} -> {end} of {total} ({sft_steps} SFT + {rl_steps} RL)")
    if start == 0 and sft_steps == 0 and rl_steps:
        say("evaluating the starting model on the held-out splits")
        before_rl = evaluate_all(stages[0])
        log_before_rl(writer, 0, before_rl, say)
    with PreemptionGuard() as guard:
        while state.step < end and not guard.requested:
            if state.step < sft_steps:
                examples = sft_examples_for_step(train_rows, state.step, c.data.batch_size, c.seed)
                state, last = sft_step(state, fns, tokenizer, model_config, examples, c=c,
                                       seq_len=sft_len, response_fn=sft_trace)
                line = f"sft step {state.step}/{end} loss {last['sft_loss']:.4f} grad_norm {last['grad_norm']:.3f}"
            else:
                stage_idx, stage = stage_at(stages, state.step - sft_steps)
                if state.step in (start, sft_steps):
                    say("first RL step: compiling the sampler, reference and update")
                state, last = rl_step(state, fns, tokenizer, next(data_iter), stage,
                                      float(beta_of(state.step - sft_steps)), c=c)
                last["stage"] = stage_idx
                line = (f"step {state.step}/{end} reward {last['reward']:.3f} acc {last['accuracy']:.2f} "
                        f"fmt {last['format_rate']:.2f} len {last['completion_len']:.1f} beta {last['beta']:.4f} "
                        f"kl {last['kl']:.4f} | rollout {last['time_rollout']:.2f}s ref {last['time_reference']:.2f}s "
                        f"update {last['time_update']:.2f}s")
            step = state.step
            sample = last.pop("sample", None)
            step_times.append(last["time_step"])
            writer.write(step, last)
            if step % c.log_every == 0 or step in (end, sft_steps):
                say(f"{line} | eta {(end - step) * recent_step_time(step_times):.0f}s")
            if sample is not None and step == max(start, sft_steps) + 1:
                say(f"sample completion: {sample!r}")
            if step == sft_steps and rl_steps:                # SFT -> RL: the SFT model becomes the reference
                state = start_rl(state, fns, kl_on=kl_on, ref_dtype=compute_dtype)
                say("SFT done; evaluating on the held-out splits before RL")
                before_rl = evaluate_all(stages[0])
                log_before_rl(writer, step, before_rl, say)
                step_times.clear()                             # the RL phase's ETA comes from RL steps only
            elif step > sft_steps and c.eval.every_steps and step % c.eval.every_steps == 0 and step < end:
                ev = evaluate(policy(), tokenizer, eval_rows, c, eval_max_new_tokens(c, stage), mesh)
                writer.write(step, ev)
                say("eval " + " ".join(f"{k} {v:.3f}" for k, v in ev.items()))
            if (guard.requested or step % c.checkpoint.every_steps == 0 or step in (end, sft_steps)
                    or (step > sft_steps and is_stage_boundary(stages, step - sft_steps))):
                save(state)
    if guard.requested:
        ckpt.close()
        writer.close()
        say(f"{guard.signal_name}: saved checkpoint at step {state.step}; exiting")
        return last

    # ---- final evaluation, summary, export
    say("final evaluation on the held-out splits")
    after = evaluate_all(stage_at(stages, max(end - 1 - sft_steps, 0))[1])
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
        save_pretrained(policy(), os.path.join(workdir, "hf"), save_dtype=compute_dtype)
        tokenizer.save_pretrained(os.path.join(workdir, "hf"))
        say(f"exported Hugging Face directory {os.path.join(workdir, 'hf')}")
    rw.close_default_runner()
    counts = fns.compile_counts()
    say("compilations per step function: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    return dict(last, **ev, compile_counts=counts)


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
