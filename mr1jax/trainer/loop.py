"""The training loop: `train_and_evaluate(config, workdir)` over an explicit `TrainState`.

It builds the run (mesh, model, data, optimizers, state, checkpoint) and then reads top to bottom: per step,
one cold-start SFT step or one RL step (`mr1jax.trainer.step`), metrics, the SFT -> RL boundary, evaluation,
checkpoint. SIGTERM saves a checkpoint and stops; rerunning resumes exactly from the latest one. The command
line around it is `mr1jax.train`.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import time
from typing import Any

import jax
import ml_collections
from etils import epath

from mr1jax.data.pipeline import make_rl_dataset
from mr1jax.data.sft import annotator_trace, sft_examples_for_step
from mr1jax.models import lora
from mr1jax.parallel import distributed, sharding
from mr1jax.rl import reward_runner
from mr1jax.rl.ptst import is_stage_boundary, stage_at
from mr1jax.trainer import state as st
from mr1jax.trainer.build import build_model, build_rows, split_for_training
from mr1jax.trainer.checkpoint import Checkpointer, PreemptionGuard, checkpoint_tree, restore_state
from mr1jax.trainer.config import (ConfigError, beta_schedule, log_every, image_kwargs, image_sizing,
                                   make_optimizers, model_dtypes, phase_steps, updates_per_rl_step, uses_kl,
                                   run_fingerprint, validate_config)
from mr1jax.trainer.evaluation import eval_max_new_tokens, evaluate, evaluate_tasks
from mr1jax.trainer.metrics import (MetricsWriter, log_before_rl, metrics_text, read_before_rl, truncate_metrics,
                                    write_summary)
from mr1jax.trainer.plots import plot_curves
from mr1jax.trainer.run_dir import check_run_dir, export_hf, lock_workdir, record_run_start, write_config
from mr1jax.trainer.step import StepFunctions, rl_step, sft_patch_bucket, sft_step, start_rl
from mr1jax.trainer.watch import StepWatch, TrainingDivergedError, eta_text, rl_step_cost_ratio

#: Exit statuses of `python -m mr1jax.train` (README, "Two commands"): 0 finished (or stopped at max_steps),
#: 1 an unexpected error, 2 a config / work dir problem found before training (bad field, work dir in use
#: by another run, another model in the dir), 3 training diverged (non-finite updates), 143 (128 + SIGTERM)
#: preempted: a checkpoint was saved and rerunning the same command resumes.
EXIT_CONFIG, EXIT_DIVERGED, EXIT_PEER, EXIT_INTERRUPTED, EXIT_PREEMPTED = 2, 3, 4, 130, 143


# ---------------------------------------------------------------------------------------------- the loop
@contextlib.contextmanager
def _peers_watched(checkpoint_dir: str, processes: int):
    """Turn a collective that failed because another process went away into one `PeerError` naming the step and
    the last complete checkpoint (with several processes; anything else passes through)."""
    try:
        yield
    except Exception as e:
        if not distributed.is_peer_failure(e):
            raise
        raise distributed.PeerError(
            f"process {jax.process_index()}: another of the {processes} processes was lost (a collective failed: "
            f"{str(e).splitlines()[0][:160]}); {_last_complete(checkpoint_dir)}; rerun all processes to resume"
        ) from None


def _last_complete(checkpoint_dir: str) -> str:
    """'the last complete checkpoint is step N' (finalized directories only: a save cut off stays *-tmp-*)."""
    root = epath.Path(checkpoint_dir)
    done = [int(p.name) for p in root.glob("*") if p.name.isdigit()] if root.exists() else []
    return f"the last complete checkpoint is step {max(done)}" if done else "no checkpoint was completed"



def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *, devices=None) -> dict[str, Any]:
    """Run (or resume) training in `workdir` on `devices` (default: all); returns the final metrics and, under
    ``compile_counts``, how many times each jitted step compiled (``preempted: True`` instead when a SIGTERM
    stopped it after saving a checkpoint).

    Before anything is built: the config is checked (ConfigError), the work dir locked for this run
    (`WorkdirLockedError` naming the holder when another run has it; released on any exit) and compared with
    the run already in it (ConfigError naming the fields when the model / data shapes differ; nothing in the
    dir is changed). Each start is appended to `<workdir>/runs.jsonl`; `config.json` is written once the
    checkpoint (if any) restored. Raises TrainingDivergedError after `optim.max_consecutive_skips` non-finite
    steps in a row."""
    stages = validate_config(config)
    distributed.initialize(config.get("distributed"))             # several processes: join them (before devices)
    if jax.process_count() > 1:                                   # one config for all: compared before any compile
        problems = distributed.differences(distributed.agree("run", run_fingerprint(config)))
        if problems:
            raise ConfigError("the processes of this run were started with different settings (nothing was "
                              "compiled or written; start every process with the same config and code):\n  "
                              + "\n  ".join(problems))
    root = epath.Path(workdir)
    fresh = not root.exists() or not any(root.iterdir())          # this start creates the work dir's contents
    root.mkdir(parents=True, exist_ok=True)                       # local, or any etils.epath file system (gs://)
    try:
        with lock_workdir(workdir):
            check_run_dir(config, workdir)
            if distributed.is_primary():
                record_run_start(config, workdir)
            return _train(config, workdir, stages, devices)
    except ConfigError:
        if fresh and distributed.is_primary() and not (root / "checkpoints").exists():
            for name in ("runs.jsonl", "config.json", "run.lock"):   # refused before training: leave no run behind
                if (root / name).exists():
                    (root / name).unlink()
            if not any(root.iterdir()):
                root.rmdir()
        raise



def _train(c: ml_collections.ConfigDict, workdir: str, stages, devices) -> dict[str, Any]:
    t_start = time.perf_counter()
    primary, processes = distributed.is_primary(), jax.process_count()

    def say(msg: str, every_process: bool = False) -> None:          # one writer: process 0 (and startup lines)
        if primary or every_process:
            tag = f"[p{jax.process_index()}] " if processes > 1 else ""
            print(f"{tag}[{time.perf_counter() - t_start:7.1f}s] {msg}", flush=True)

    # ---- mesh, model, optimizers, state
    if processes > 1:
        say(distributed.describe(), every_process=True)
    mesh = sharding.make_mesh(dict(c.mesh), devices)
    say(f"mesh {dict(mesh.shape)} on {mesh.size} {jax.devices()[0].platform} device(s); building model")
    for warning in st.check_mesh_fits(c, mesh):
        say(f"warning: {warning}")
    model, tokenizer = build_model(c, mesh)
    try:
        graphdef, params, frozen = split_for_training(model, c, mesh)   # frozen: the LoRA base, or None
    except ValueError as e:                                                  # lora.targets matches nothing
        raise ConfigError(f"config.{e}") from None
    compute_dtype, _ = model_dtypes(c)
    sft_steps, rl_steps = phase_steps(c)
    lora_cfg = lora.LoRAConfig.from_config(c)
    lora_merge = bool(lora_cfg.rank) and c.lora.sft_to_rl == "merge" and sft_steps > 0 and rl_steps > 0
    total, kl_on = sft_steps + rl_steps, uses_kl(c) and rl_steps > 0
    sft_tx, rl_tx = make_optimizers(c)
    state = st.init_train_state(params, sft_tx or rl_tx, mesh, ref_dtype=compute_dtype,
                                keep_ref=kl_on and not sft_steps, seed=c.seed)
    if frozen is not None and state.ref_params is not None:   # LoRA reference: the base, adapters disabled
        state = state.replace(ref_params=lora.disabled(state.ref_params))
    fns = StepFunctions(graphdef, mesh, st.state_shardings(state, mesh), sft_tx=sft_tx, rl_tx=rl_tx, frozen=frozen)
    if frozen is not None:
        quant = c.lora.get("base_quant", "none")
        say(f"LoRA rank {lora_cfg.rank} on {len(lora.adapted(model))} linear layers ({c.lora.targets}): "
            f"{lora.num_params(params):,} trainable of {lora.num_params(frozen):,} base parameters; frozen base "
            + (f"quantised to {quant} (QLoRA)" if quant != "none" else f"in {c.model.dtype}"))
    say(f"model: {sum(x.size for x in jax.tree.leaves(params)):,} parameters ({c.model.param_dtype} master, "
        f"{c.model.dtype} compute, remat {c.model.remat}); reference model "
        f"{'kept (' + c.model.dtype + ')' if kl_on else 'skipped (beta = 0)'}")
    model_config = model.config
    del model, params                                                     # the state owns the parameters now

    # ---- data
    train_rows, eval_rows = build_rows(c, "train"), build_rows(c, "eval")
    local_prompts = c.data.batch_size // processes                  # this process's share of every batch
    data_iter = iter(make_rl_dataset(
        train_rows, tokenizer=tokenizer, batch_size=local_prompts, prompt_buckets=(c.data.prompt_bucket,),
        seed=c.seed, question_template=c.data.question_template, pad_to_max_bucket=True,
        skip_bad_rows=c.data.skip_bad_rows, shard_index=jax.process_index(), shard_count=processes,
        **image_kwargs(c)))
    sizing = image_sizing(c)
    sft_trace = annotator_trace(c.sft.annotator_miss_rate, c.sft.annotator_min_count, c.seed)
    sft_len = c.data.prompt_bucket + max(s.max_new_tokens for s in stages)
    say(f"data: {len(train_rows)} train rows, {len(eval_rows) if eval_rows is not None else 'no'} eval rows, "
        f"{c.data.batch_size} prompts per step" + (f" ({local_prompts} per process)" if processes > 1 else ""))

    # ---- checkpoint / resume
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), max_to_keep=c.checkpoint.max_to_keep,
                        async_save=c.checkpoint.async_save)
    state, meta = restore_state(ckpt, state, data_iter, with_ref_after=sft_steps if kl_on and sft_steps else None,
                                ref_dtype=compute_dtype, warn=say)
    start = state.step
    elapsed_before = float(meta.get("elapsed_s", 0.0))                 # wall time of the earlier segments
    elapsed = lambda: elapsed_before + time.perf_counter() - t_start  # noqa: E731
    if start:
        say(f"resumed from step {start} ({ckpt.directory})")
    sft_adapters_dir = os.path.join(workdir, "sft_adapters")
    if lora_merge and start >= sft_steps:           # RL on the merged SFT model: merge the saved SFT adapters again
        sft_adapters = lora.adapters_from_peft(graphdef, state.params, fns.frozen, sft_adapters_dir)
        _, fns.frozen = lora.fold_adapters(graphdef, sft_adapters, fns.frozen, seed=c.seed + 1)
    if primary:
        truncate_metrics(workdir, start)              # steps after the checkpoint are redone: drop their lines
        write_config(c, workdir)
    beta_of = beta_schedule(c)
    policy = lambda: fns.model(state.params)  # noqa: E731  (the model on the current parameters)
    evaluate_all = lambda stage: evaluate_tasks(policy(), tokenizer, eval_rows, c,  # noqa: E731
                                                eval_max_new_tokens(c, stage), mesh)

    def save(s: st.TrainState) -> None:
        rl = max(s.step - sft_steps, 0)
        ckpt.save(s.step, checkpoint_tree(s), {"step": s.step, "beta": float(beta_of(rl)),
                                               "stage": stage_at(stages, rl)[0], "elapsed_s": elapsed(),
                                               "phase": "sft" if s.step < sft_steps else "rl"},
                  data_iterator=data_iter)            # raises NonFiniteStateError (saving nothing) on NaN / inf

    # ---- the loop
    writer = MetricsWriter(workdir, enabled=primary)
    before_rl, last, step_times = read_before_rl(workdir), {}, []
    end = total if c.max_steps < 0 else min(total, start + c.max_steps)
    every = log_every(c)
    rl_ratio = rl_step_cost_ratio(c.data.batch_size, stages[0].num_samples, c.data.prompt_bucket,
                                  stages[0].max_new_tokens, kl=kl_on, old_pass=updates_per_rl_step(c) > 1)
    watch = StepWatch(c.optim.max_consecutive_skips, c.optim.spike_factor, c.optim.grad_clip)
    say(f"training steps {start} -> {end} of {total} ({sft_steps} SFT + {rl_steps} RL); a line every {every} "
        "step(s)")
    if start == 0 and sft_steps == 0 and rl_steps:
        say("evaluating the starting model on the held-out splits")
        before_rl = evaluate_all(stages[0])
        log_before_rl(writer, 0, before_rl, say)
    def peer_lost(why: str) -> None:                  # from the watch thread: one line, then out (JAX would abort)
        print(f"error: process {jax.process_index()}: {why}; lost at step {state.step + 1}; "
              f"{_last_complete(ckpt.directory)}; rerun all processes to resume", file=sys.stderr, flush=True)
        os._exit(EXIT_PEER)

    with PreemptionGuard((signal.SIGTERM, signal.SIGINT)) as guard, _peers_watched(ckpt.directory, processes), \
            distributed.PeerWatch(peer_lost, stale_s=float(c.get("distributed", {}).get("peer_timeout_s", 30))):
        stop = False
        while state.step < end and not stop:
            if state.step < sft_steps:
                share = (jax.process_index(), processes)       # this process's slice of the global batch
                examples = sft_examples_for_step(train_rows, state.step, local_prompts, c.seed, *share)
                spare = sft_examples_for_step(train_rows, state.step + 1, local_prompts, c.seed, *share) \
                    if c.data.skip_bad_rows else ()              # replacements for bad rows, deterministic
                state, last = sft_step(state, fns, tokenizer, model_config, examples, c=c,
                                       seq_len=sft_len, response_fn=sft_trace, spare=spare,
                                       patches_per_example=sft_patch_bucket(sizing, train_rows, state.step,
                                                                            c.data.batch_size, c.seed)
                                       if processes > 1 else None)   # one process: the batch's own bucket
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
            try:
                watch(step, last, say)                    # skipped (non-finite) updates, spikes
            except TrainingDivergedError:
                ckpt.close()
                writer.close()
                raise
            if step % every == 0 or step in (end, sft_steps):
                say(f"{line} | {eta_text(step, end, sft_steps, step_times, rl_ratio)}")
            if sample is not None and step == max(start, sft_steps) + 1:
                say(f"sample completion: {sample!r}")
            if step == sft_steps and rl_steps:                # SFT -> RL: the SFT model becomes the reference
                if lora_merge:                                # kept to rebuild the merged base on resume
                    lora.save_peft(policy(), sft_adapters_dir, lora_cfg)
                state = start_rl(state, fns, kl_on=kl_on, ref_dtype=compute_dtype,
                                 lora_merge_seed=c.seed + 1 if lora_merge else None)
                say("SFT done; evaluating on the held-out splits before RL")
                before_rl = evaluate_all(stages[0])
                log_before_rl(writer, step, before_rl, say)
                step_times.clear()                             # the RL phase's ETA comes from RL steps only
                watch.reset()
            elif step > sft_steps and c.eval.every_steps and step % c.eval.every_steps == 0 and step < end:
                ev = evaluate(policy(), tokenizer, eval_rows, c, eval_max_new_tokens(c, stage), mesh)
                writer.write(step, ev)
                say("eval " + metrics_text(ev))
            stop = distributed.any_process(guard.requested)   # a SIGTERM on any process: all save this step
            if (stop or step % c.checkpoint.every_steps == 0 or step in (end, sft_steps)
                    or (step > sft_steps and is_stage_boundary(stages, step - sft_steps))):
                save(state)
    if stop:
        ckpt.close()
        writer.close()
        status = EXIT_INTERRUPTED if guard.signal_name == "SIGINT" else EXIT_PREEMPTED
        say(f"{guard.signal_name or 'a signal on another process'}: saved checkpoint at step {state.step}; exiting "
            f"with status {status}; rerun the same command to resume", every_process=True)
        return dict(last, preempted=True, exit_status=status)

    # ---- final evaluation, summary, export
    say("final evaluation on the held-out splits")
    after = evaluate_all(stage_at(stages, max(end - 1 - sft_steps, 0))[1])
    ev = next(iter(after.values()))
    writer.write(end, ev)
    for t, m in after.items():
        say(f"final eval, {t}: " + metrics_text(m))
    if end == total and primary:
        summary = write_summary(workdir, c, before_rl, after, elapsed())
        for t, m in summary["tasks"].items():
            if m["accuracy_gain"] is not None:
                say(f"{t}: held-out accuracy {m['before_rl']['eval_accuracy']:.3f} before RL -> "
                    f"{m['after_rl']['eval_accuracy']:.3f} after RL ({m['accuracy_gain']:+.3f})")
        say(f"wrote {os.path.join(workdir, 'summary.json')} and {plot_curves(workdir)}")
    ckpt.close()
    writer.close()
    if c.export_hf and end == total:
        if lora_cfg.rank:                    # the adapters in PEFT format, and the merged model in hf/
            lora.save_peft(policy(), os.path.join(workdir, "hf_adapter"), lora_cfg)
            say(f"exported PEFT adapters {os.path.join(workdir, 'hf_adapter')}")
        export_hf(lora.merge_lora(policy()), tokenizer, os.path.join(workdir, "hf"), compute_dtype)   # all gather
        say(f"exported Hugging Face directory {os.path.join(workdir, 'hf')}")
    reward_runner.close_default_runner()
    counts = fns.compile_counts()
    say("compilations per step function: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    return dict(last, **ev, compile_counts=counts)
