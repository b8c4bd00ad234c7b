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

import collections
import contextlib
import json
import os
import socket
import sys
import tempfile
import time
from typing import Any

os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")  # "PyTorch was not found": torch is not used

import jax
import ml_collections
from etils import epath
import numpy as np
import optax
from flax import nnx

from mr1jax import distributed, lora, sharding
from mr1jax import steps as st
from mr1jax.build import build_model, build_rows, model_dtypes
from mr1jax.checkpoint import Checkpointer, PreemptionGuard, WorkdirLock, WorkdirLockedError, is_url
from mr1jax.config import (ConfigError, beta_schedule, log_every, make_optimizer, phase_steps,  # noqa: F401
                           run_dir_conflicts, uses_kl, validate_config)
from mr1jax.data.pipeline import make_rl_dataset
from mr1jax.data.sft import annotator_trace, sft_examples_for_step
from mr1jax.evaluation import eval_max_new_tokens, evaluate, evaluate_tasks, sample_completions  # noqa: F401
from mr1jax.metrics import (MetricsWriter, log_before_rl, read_before_rl, recent_step_time, truncate_metrics,
                            write_summary)
from mr1jax.models.qwen2_vl.hf import save_pretrained
from mr1jax.plots import plot_curves
from mr1jax.rl import rewards as rw
from mr1jax.rl.ptst import is_stage_boundary, stage_at
from mr1jax.train_steps import StepFunctions, images_per_prompt, rl_step, sft_step, start_rl, updates_per_rl_step

#: Exit statuses of `python -m mr1jax.train` (README, "Two commands"): 0 finished (or stopped at max_steps),
#: 1 an unexpected error, 2 a config / work dir problem found before training (bad field, work dir in use
#: by another run, another model in the dir), 3 training diverged (non-finite updates), 143 (128 + SIGTERM)
#: preempted: a checkpoint was saved and rerunning the same command resumes.
EXIT_CONFIG, EXIT_DIVERGED, EXIT_PREEMPTED = 2, 3, 143


class TrainingDivergedError(RuntimeError):
    """`optim.max_consecutive_skips` steps in a row had a non-finite loss or gradient norm."""


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
    micro-batches that do not split evenly. With several processes, the prompts of a step and the batch devices
    must split evenly over the processes (each owns whole prompt groups on its own devices)."""
    n, batch_devices = jax.process_count(), mesh.shape["data"] * mesh.shape["fsdp"]
    if n > 1 and (c.data.batch_size % n or batch_devices % n):
        raise ConfigError(f"config.data.batch_size = {c.data.batch_size} and the mesh's data x fsdp = {batch_devices} "
                          f"devices must both divide by the {n} processes")
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
                  ref_dtype, warn=print) -> tuple[st.TrainState, dict[str, Any]]:
    """(`state` from the newest good checkpoint (and the data iterator's position), its meta), or (`state`, {})
    without one. A corrupt checkpoint is reported through `warn` and the previous one used
    (`Checkpointer.restore_latest_good`).

    with_ref_after: a checkpoint of step >= this holds the reference (the SFT model); None = never saved (the
    reference is the starting model, rebuilt at start).
    """
    def tree_for(step: int) -> dict[str, Any]:
        tree = checkpoint_tree(state)
        if with_ref_after is not None and step >= with_ref_after and state.ref_params is None:
            tree["ref_params"] = jax.tree.map(lambda x: jax.ShapeDtypeStruct(
                x.shape, ref_dtype if jax.numpy.issubdtype(x.dtype, jax.numpy.floating) else x.dtype,
                sharding=x.sharding), state.params)
        elif with_ref_after is not None and step < with_ref_after:
            tree.pop("ref_params", None)
        return tree

    found = ckpt.restore_latest_good(tree_for, data_iterator=data_iter, warn=warn)
    if found is None:
        return state, {}
    _, restored, meta = found
    return st.TrainState(params=restored["params"], opt_state=restored["opt_state"],
                         ref_params=restored.get("ref_params", state.ref_params if with_ref_after is None else None),
                         rng=restored["rng"], step=int(meta["step"])), meta


def check_run_dir(c: ml_collections.ConfigDict, workdir: str) -> None:
    """ConfigError, before anything in `workdir` is touched, when the run already there has another model or
    data shape (`mr1jax.config.run_dir_conflicts`)."""
    path = epath.Path(workdir) / "config.json"
    if not path.exists():
        return
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path} is unreadable ({e}); it describes the run in {workdir}: repair or remove it") \
            from None
    conflicts = run_dir_conflicts(c, saved)
    if conflicts:
        raise ConfigError(f"{workdir} holds a run with another model / data shape; nothing was changed. Use another "
                          "--workdir, or the dir's settings:\n  " + "\n  ".join(conflicts))


def record_run_start(c: ml_collections.ConfigDict, workdir: str) -> None:
    """Append this start (time, host, pid, command line, config) to `<workdir>/runs.jsonl`."""
    entry = {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "host": socket.gethostname(), "pid": os.getpid(),
             "argv": sys.argv, "config": json.loads(c.to_json_best_effort())}
    path = epath.Path(workdir) / "runs.jsonl"
    before = path.read_text() if path.exists() else ""      # rewritten whole: object stores cannot append
    path.write_text(before + json.dumps(entry) + "\n")


def export_hf(model, tokenizer, path: str, dtype) -> None:
    """`save_pretrained` + the tokenizer into `path` (every process takes part, process 0 writes); an object-store
    path (gs://...) is written locally first and copied up file by file."""
    with tempfile.TemporaryDirectory() if is_url(path) else contextlib.nullcontext(path) as out:
        save_pretrained(model, out, save_dtype=dtype)
        if distributed.is_primary():
            tokenizer.save_pretrained(out)
            if out != path:                                     # copy the local directory up
                epath.Path(path).mkdir(parents=True, exist_ok=True)
                for name in os.listdir(out):
                    epath.Path(out, name).copy(epath.Path(path) / name, overwrite=True)


def write_config(c: ml_collections.ConfigDict, workdir: str) -> None:
    """`<workdir>/config.json` (what export / eval rebuild the model from), replaced atomically."""
    tmp = epath.Path(workdir) / f".config.json.{os.getpid()}"
    tmp.write_text(c.to_json_best_effort(indent=2))
    tmp.replace(epath.Path(workdir) / "config.json")


class StepWatch:
    """Counts consecutive skipped (non-finite) steps and reports spikes: a value above `factor` x the running
    median of its last 50 finite values (and above its floor). Watched: the SFT loss and, in both phases, the
    gradient norm (GRPO's loss is centred on 0, so its spikes show in the gradient norm), with the clipping
    threshold as floor (smaller norms are noise around a tiny median, larger ones are clipped)."""

    def __init__(self, max_skips: int, factor: float, grad_clip: float = 0.0):
        self.max_skips, self.factor, self.skips = max_skips, factor, 0
        self.floor = {"sft_loss": 0.0, "grad_norm": grad_clip}
        self.history: dict[str, collections.deque] = {}

    def reset(self) -> None:                                 # a new phase: other scales
        self.history.clear()

    def __call__(self, step: int, metrics: dict[str, Any], say) -> None:
        if metrics.get("skipped"):
            self.skips += 1
            say(f"warning: step {step}: non-finite loss or gradient norm ({_fmt(metrics)}); update skipped, "
                f"{self.skips} step(s) in a row")
            if self.skips >= self.max_skips:
                raise TrainingDivergedError(
                    f"training diverged: {self.skips} steps in a row (up to step {step}) had a non-finite loss or "
                    f"gradient norm (config.optim.max_consecutive_skips = {self.max_skips}); their updates were "
                    "skipped and every saved checkpoint is finite. Lower the learning rate (config.optim."
                    "learning_rate / config.sft.learning_rate) or config.optim.grad_clip and rerun: it resumes from "
                    "the newest checkpoint")
            return
        self.skips = 0
        for key in ("sft_loss", "grad_norm"):
            v = metrics.get(key)
            if v is None or not np.isfinite(v):
                continue
            hist = self.history.setdefault(key, collections.deque(maxlen=50))
            med = float(np.median(hist)) if len(hist) >= 10 else None
            if self.factor and med and abs(v) > max(self.factor * med, self.floor[key]):
                say(f"warning: step {step}: {key} spike {v:.4g} (> {self.factor:g} x running median {med:.4g})")
            hist.append(abs(v))


def eta_text(step: int, end: int, sft_steps: int, step_times: list[float]) -> str:
    """The remaining time of the current phase at its recent step time. During SFT with RL to follow, only SFT's:
    an RL step (rollouts, reference, update) costs several SFT steps, and its time is known once RL starts."""
    per = recent_step_time(step_times)
    if step < sft_steps < end:
        return f"SFT eta {(sft_steps - step) * per:.0f}s, then {end - sft_steps} RL steps"
    return f"eta {(end - step) * per:.0f}s"


def _fmt(metrics: dict[str, Any]) -> str:
    return ", ".join(f"{k} {metrics[k]:.4g}" for k in ("sft_loss", "loss", "grad_norm") if k in metrics)


# ---------------------------------------------------------------------------------------------- the loop
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
    epath.Path(workdir).mkdir(parents=True, exist_ok=True)       # local, or any etils.epath file system (gs://)
    with _lock_workdir(workdir):
        check_run_dir(config, workdir)
        if distributed.is_primary():
            record_run_start(config, workdir)
        return _train(config, workdir, stages, devices)


@contextlib.contextmanager
def _lock_workdir(workdir: str):
    """`WorkdirLock` held by process 0 for the whole run; every process stops if it cannot be taken."""
    lock, problem = WorkdirLock(workdir), None
    if distributed.is_primary():
        try:
            lock.acquire()
        except WorkdirLockedError as e:
            problem = e
    if distributed.any_process(problem is not None):
        raise problem or WorkdirLockedError(f"{workdir} is in use by another run (process 0 could not lock it)")
    try:
        yield
    finally:
        lock.release()


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
    for warning in check_mesh_fits(c, mesh):
        say(f"warning: {warning}")
    model, tokenizer = build_model(c, mesh)
    try:
        graphdef, params, frozen = lora.split_for_training(model, c, mesh)   # frozen: the LoRA base, or None
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
        say(f"LoRA rank {lora_cfg.rank} on {len(lora.adapted(model))} linear layers ({c.lora.targets}): "
            f"{lora.num_params(params):,} trainable of {lora.num_params(frozen):,} base parameters")
    say(f"model: {sum(x.size for x in jax.tree.leaves(params)):,} parameters ({c.model.param_dtype} master, "
        f"{c.model.dtype} compute, remat {c.model.remat}); reference model "
        f"{'kept (' + c.model.dtype + ')' if kl_on else 'skipped (beta = 0)'}")
    model_config = model.config
    del model, params                                                     # the state owns the parameters now

    # ---- data
    train_rows, eval_rows = build_rows(c, "train"), build_rows(c, "eval")
    local_prompts = c.data.batch_size // processes                  # this process's share of every batch
    data_iter = iter(make_rl_dataset(
        train_rows, tokenizer=tokenizer, batch_size=local_prompts, image_size=c.data.image_size,
        prompt_buckets=(c.data.prompt_bucket,), seed=c.seed, question_template=c.data.question_template,
        pad_to_max_bucket=True, skip_bad_rows=c.data.skip_bad_rows, images_per_prompt=images_per_prompt(c),
        shard_index=jax.process_index(), shard_count=processes))
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
    watch = StepWatch(c.optim.max_consecutive_skips, c.optim.spike_factor, c.optim.grad_clip)
    say(f"training steps {start} -> {end} of {total} ({sft_steps} SFT + {rl_steps} RL); a line every {every} "
        "step(s)")
    if start == 0 and sft_steps == 0 and rl_steps:
        say("evaluating the starting model on the held-out splits")
        before_rl = evaluate_all(stages[0])
        log_before_rl(writer, 0, before_rl, say)
    with PreemptionGuard() as guard:
        stop = False
        while state.step < end and not stop:
            if state.step < sft_steps:
                share = (jax.process_index(), processes)       # this process's slice of the global batch
                examples = sft_examples_for_step(train_rows, state.step, local_prompts, c.seed, *share)
                spare = sft_examples_for_step(train_rows, state.step + 1, local_prompts, c.seed, *share) \
                    if c.data.skip_bad_rows else ()              # replacements for bad rows, deterministic
                state, last = sft_step(state, fns, tokenizer, model_config, examples, c=c,
                                       seq_len=sft_len, response_fn=sft_trace, spare=spare)
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
                say(f"{line} | {eta_text(step, end, sft_steps, step_times)}")
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
                say("eval " + " ".join(f"{k} {v:.3f}" for k, v in ev.items()))
            stop = distributed.any_process(guard.requested)   # a SIGTERM on any process: all save this step
            if (stop or step % c.checkpoint.every_steps == 0 or step in (end, sft_steps)
                    or (step > sft_steps and is_stage_boundary(stages, step - sft_steps))):
                save(state)
    if stop:
        ckpt.close()
        writer.close()
        say(f"{guard.signal_name or 'SIGTERM on another process'}: saved checkpoint at step {state.step}; exiting "
            f"with status {EXIT_PREEMPTED}", every_process=True)
        return dict(last, preempted=True)

    # ---- final evaluation, summary, export
    say("final evaluation on the held-out splits")
    after = evaluate_all(stage_at(stages, max(end - 1 - sft_steps, 0))[1])
    ev = next(iter(after.values()))
    writer.write(end, ev)
    for t, m in after.items():
        say(f"final eval, {t}: " + " ".join(f"{k} {v:.3f}" for k, v in m.items()))
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
    rw.close_default_runner()
    counts = fns.compile_counts()
    say("compilations per step function: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    return dict(last, **ev, compile_counts=counts)


def main(argv: list[str]) -> None:
    del argv
    from absl import flags, logging

    from mr1jax.checkpoint import CheckpointCorruptError, NonFiniteStateError, WorkdirLockedError

    logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO
    try:
        out = train_and_evaluate(flags.FLAGS.config, flags.FLAGS.workdir)
    except (ConfigError, WorkdirLockedError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(EXIT_CONFIG)
    except (TrainingDivergedError, NonFiniteStateError, CheckpointCorruptError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(1 if isinstance(e, CheckpointCorruptError) else EXIT_DIVERGED)
    if out.get("preempted"):
        sys.exit(EXIT_PREEMPTED)


def check_overrides(argv: list[str]) -> str | None:
    """An error line for the first `--config.<field>=...` the config file lacks (with the closest valid name),
    before absl parses the flags (where ml_collections would stop with a traceback); None when all exist or the
    config file cannot be loaded here (config_flags then reports it)."""
    import importlib.util

    from mr1jax.config import unknown_override

    keys = [a[len("--config."):].split("=", 1)[0] for a in argv if a.startswith("--config.")]
    path = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), "configs/grpo.py").split(":")[0]
    if not keys:
        return None
    try:
        spec = importlib.util.spec_from_file_location("_mr1jax_config", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        c = module.get_config()
    except Exception:  # noqa: BLE001
        return None
    return next((e for e in (unknown_override(c, k) for k in keys) if e), None)


if __name__ == "__main__":
    from absl import app, flags
    from ml_collections import config_flags

    if (problem := check_overrides(sys.argv[1:])) is not None:
        print(f"error: {problem}", file=sys.stderr)
        sys.exit(EXIT_CONFIG)

    config_flags.DEFINE_config_file("config", "configs/grpo.py", "training config file", lock_config=True)
    flags.DEFINE_string("workdir", None, "where checkpoints, metrics and exports go (one run per dir; required)")
    flags.mark_flag_as_required("workdir")
    app.run(main)
