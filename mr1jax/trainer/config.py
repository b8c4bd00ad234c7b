"""Training config: field checks (`validate_config`) and what the trainer derives from a config.

Every allowed-value table is the owning module's own: loss aggregations (`mr1jax.rl.losses`), KL
estimators and beta schedules (`mr1jax.rl.kl`), advantage scales (`mr1jax.rl.advantages`), reward kinds
(`mr1jax.rl.rewards`), synthetic tasks (`mr1jax.data.tasks`), model dtypes (`mr1jax.trainer.build`), remat policies
(`mr1jax.models.qwen2_vl.model`); the run
modes are this module's (`MODES`).
"""

from __future__ import annotations

import difflib
import json
import os
from typing import Any

import jax.numpy as jnp
import ml_collections
import optax

from mr1jax.parallel.distributed import MODES as DISTRIBUTED_MODES
from mr1jax.parallel.distributed import requested as distributed_requested
from mr1jax.models.lora import BASE_QUANT, PRESETS, SFT_TO_RL, target_regex
from mr1jax.data.tasks import TASKS
from mr1jax.data.sizing import ImageSizing
from mr1jax.data.vision import DEFAULT_MAX_PIXELS, DEFAULT_MIN_PIXELS
from mr1jax.models.families import FAMILIES
from mr1jax.models.qwen2_vl.model import REMAT_POLICIES
from mr1jax.rl import ADVANTAGE_SCALES, KL_ESTIMATORS, LOSS_AGGREGATIONS, SCHEDULE_NAMES, make_schedule
from mr1jax.rl.ptst import Stage, parse_stages
from mr1jax.rl.rewards import REWARD_KINDS

#: ``config.mode``: GRPO only, SFT only, or cold-start SFT then GRPO.
MODES: tuple[str, ...] = ("grpo", "sft", "sft_then_grpo")


#: ``config.model.dtype`` / ``config.model.param_dtype`` values.
MODEL_DTYPES: tuple[str, ...] = ("float32", "bfloat16")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def model_dtypes(c: ml_collections.ConfigDict) -> tuple[Any, Any]:
    """(compute dtype, parameter storage dtype) from ``config.model.dtype`` / ``config.model.param_dtype``."""
    return DTYPES[c.model.dtype], DTYPES[c.model.get("param_dtype", "float32")]


class ConfigError(ValueError):
    """A training config field holds a value mr1jax cannot use."""


CHOICES = {
    "model.dtype": tuple(MODEL_DTYPES),
    "model.param_dtype": tuple(MODEL_DTYPES),
    "model.remat": tuple(REMAT_POLICIES),
    "model.family": tuple(FAMILIES),
    "rl.beta_schedule": tuple(SCHEDULE_NAMES),
    "rl.agg": tuple(LOSS_AGGREGATIONS),
    "rl.kl_estimator": tuple(KL_ESTIMATORS),
    "rl.advantage_scale": tuple(ADVANTAGE_SCALES),
    "rl.reward": tuple(REWARD_KINDS),
    "data.task": tuple(TASKS),
    "mode": MODES,
    "distributed.mode": DISTRIBUTED_MODES,
    "lora.sft_to_rl": tuple(SFT_TO_RL),
    "lora.base_quant": tuple(BASE_QUANT),
}
POSITIVE = ("total_steps", "data.batch_size", "data.prompt_bucket", "data.images_per_prompt",
            "rollout.num_samples",
            "rollout.max_new_tokens", "rl.updates_per_batch", "rl.minibatches", "rl.micro_batches", "sft.micro_batches", "checkpoint.every_steps",
            "checkpoint.max_to_keep", "optim.max_consecutive_skips")
POSITIVE_REAL = ("optim.learning_rate", "sft.learning_rate", "rl.reward_timeout_s")
FRACTIONS = ("rl.warmup_fraction", "sft.warmup_fraction", "sft.annotator_miss_rate")
#: Fields a rerun in an existing work dir must keep: they fix the checkpoint's arrays and the data shapes.
RUN_DIR_FIELDS = ("mode", "sft.steps", "model.hf_path", "model.family", "model.tiny", "model.param_dtype",
                  "model.dtype", "data.task", "data.train_files", "data.tfds", "data.image_size", "data.prompt_bucket",
                  "data.batch_size", "data.images_per_prompt", "lora", "data.min_pixels", "data.max_pixels")


def _get(c: ml_collections.ConfigDict, dotted: str) -> Any:
    for part in dotted.split("."):
        c = c[part]
    return c


def _flat_fields(c: Any, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in (c.items() if hasattr(c, "items") else []):
        if isinstance(v, (ml_collections.ConfigDict, dict)):
            out.update(_flat_fields(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


#: Fields that legitimately differ between the processes of one run.
PER_PROCESS_FIELDS = ("distributed.process_id",)


def package_version() -> str:
    """mr1jax's version and, in a git checkout, its commit (what each process of a run is running)."""
    import importlib.metadata
    import subprocess

    try:
        version = importlib.metadata.version("mr1jax")
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    try:
        commit = subprocess.run(["git", "-C", root, "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return f"{version} {commit}".strip()


def run_fingerprint(c: ml_collections.ConfigDict) -> dict[str, str]:
    """What every process of one run must share: each resolved config field (as text; the process id aside),
    the package version / commit, and each data file's size (a different or stale file on one host)."""
    out = {f"config.{k}": repr(v) for k, v in _flat_fields(c).items() if k not in PER_PROCESS_FIELDS}
    out["mr1jax version"] = package_version()
    for field in ("train_files", "eval_files"):
        for f in [x.strip() for x in str(c.data.get(field, "") or "").split(",") if x.strip()]:
            out[f"data file {f}"] = f"{os.path.getsize(f)} bytes" if os.path.exists(f) else "missing"
    return out


def reference_config() -> ml_collections.ConfigDict | None:
    """The embedded default config (`configs/grpo.py`), which every shipped config extends: its fields are the
    valid ones. None when `configs` is not importable."""
    try:
        from configs.grpo import get_config
    except ImportError:
        return None
    return get_config()


def unknown_fields(c: ml_collections.ConfigDict, reference: ml_collections.ConfigDict | None = None) -> list[str]:
    """'config.x: unknown field (did you mean config.y?)' for every field of `c` the reference does not have."""
    reference = reference_config() if reference is None else reference
    if reference is None:
        return []
    valid = _flat_fields(reference)
    groups = {k.rsplit(".", 1)[0] for k in valid if "." in k}
    out = []
    for k in _flat_fields(c):
        if k in valid or any(k.startswith(g + ".") for g in ("model.tiny", "mesh")):  # free-form groups
            continue
        close = difflib.get_close_matches(k, list(valid) + sorted(groups), n=1, cutoff=0.6)
        out.append(f"config.{k}: unknown field" + (f" (did you mean config.{close[0]}?)" if close else ""))
    return out


def unknown_override(c: ml_collections.ConfigDict, key: str) -> str | None:
    """For a command-line override `--config.<key>=...`: an error naming the field and the closest valid one when
    `c` has no such field, else None (ml_collections would stop with a traceback while parsing flags)."""
    node = c
    for part in key.split("."):
        if not isinstance(node, ml_collections.ConfigDict) or part not in node:
            valid = list(_flat_fields(c))
            close = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
            return f"--config.{key}: unknown config field" + (f" (did you mean config.{close[0]}?)" if close else "")
        node = node[part]
    return None


def log_every(c: ml_collections.ConfigDict) -> int:
    """Steps between console lines: `config.log_every`, or (0) about 75 lines over the run."""
    return c.log_every or max(1, sum(phase_steps(c)) // 75)


_FIELD_DEFAULTS = {"model.family": "qwen2_vl", "data.images_per_prompt": 1}


def run_dir_conflicts(c: ml_collections.ConfigDict, saved: dict[str, Any]) -> list[str]:
    """'config.f: this run X, the dir's run Y' for each `RUN_DIR_FIELDS` field that differs between `c` and the
    config.json of the run already in a work dir (`saved`)."""
    mine = json.loads(c.to_json_best_effort())
    out = []
    for field in RUN_DIR_FIELDS:
        a, b = mine, saved
        for part in field.split("."):
            a = a.get(part) if isinstance(a, dict) else None
            b = b.get(part) if isinstance(b, dict) else None
        if field == "lora" and b is None:           # a run dir from before config.lora: full fine-tuning
            if (a or {}).get("rank", 0):
                out.append(f"config.lora.rank: this run {a['rank']!r}, the dir's run 0 (full fine-tuning)")
            continue
        if field in _FIELD_DEFAULTS:  # runs from before the field existed had its default
            a, b = (_FIELD_DEFAULTS[field] if v is None else v for v in (a, b))
        if isinstance(a, dict) or isinstance(b, dict):
            fa, fb = _flat_fields(a or {}), _flat_fields(b or {})
            out += [f"config.{field}.{k}: this run {fa.get(k)!r}, the dir's run {fb.get(k)!r}"
                    for k in sorted(set(fa) | set(fb)) if fa.get(k) != fb.get(k)]
        elif a != b and not (a in ("", None) and b in ("", None)):  # None: a field newer than the dir's run
            out.append(f"config.{field}: this run {a!r}, the dir's run {b!r}")
    return out


def validate_config(c: ml_collections.ConfigDict, reference: ml_collections.ConfigDict | None = None) -> list[Stage]:
    """Check every field before anything is built or compiled; returns the rollout stages.

    reference: the config whose fields are the valid ones (default: `configs/grpo.py`'s); an unknown field is
    named with the closest valid one."""
    unknown = unknown_fields(c, reference)
    if unknown:
        raise ConfigError("; ".join(unknown))
    for field, allowed in CHOICES.items():
        if _get(c, field) not in allowed:
            raise ConfigError(f"config.{field} = {_get(c, field)!r}; allowed values: {', '.join(allowed)}")
    for field in POSITIVE:
        value = _get(c, field)
        if not isinstance(value, int) or value < 1:
            raise ConfigError(f"config.{field} must be a positive integer, got {value!r}")
    for field in POSITIVE_REAL:
        value = _get(c, field)
        if not isinstance(value, (int, float)) or not value > 0:
            raise ConfigError(f"config.{field} must be > 0, got {value!r}")
    for field in FRACTIONS:
        value = _get(c, field)
        if not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
            raise ConfigError(f"config.{field} is a fraction and must be in [0, 1], got {value!r}")
    if not isinstance(c.log_every, int) or c.log_every < 0:
        raise ConfigError(f"config.log_every must be an integer >= 0 (0 = about 75 lines per run), got "
                          f"{c.log_every!r}")
    if not c.optim.spike_factor >= 0:
        raise ConfigError(f"config.optim.spike_factor must be >= 0 (0 = off), got {c.optim.spike_factor!r}")
    if "distributed" in c:
        try:
            distributed_requested(c.distributed)
        except ValueError as e:
            raise ConfigError(str(e)) from None
    if c.mode != "grpo" and c.sft.steps < 1:
        raise ConfigError(f"config.mode = {c.mode!r} needs config.sft.steps >= 1, got {c.sft.steps}")
    if not isinstance(c.data.image_size, int) or c.data.image_size < 0 or c.data.image_size % 28:
        raise ConfigError(f"config.data.image_size = {c.data.image_size} must be a multiple of 28 (fixed size) or 0 "
                          "(native resolution: data.min_pixels / data.max_pixels)")
    try:
        image_sizing(c)
    except ValueError as e:
        raise ConfigError(f"config.data: {e} (data.image_size = 0: data.min_pixels, data.max_pixels, "
                          "data.patch_buckets)") from None
    if c.data.batch_size % (c.rl.minibatches * c.rl.micro_batches):
        raise ConfigError(f"config.rl.minibatches x config.rl.micro_batches = {c.rl.minibatches} x "
                          f"{c.rl.micro_batches} must divide config.data.batch_size = {c.data.batch_size} "
                          "(both split whole prompt groups)")
    if c.data.batch_size % c.sft.micro_batches:
        raise ConfigError(f"config.sft.micro_batches = {c.sft.micro_batches} must divide config.data.batch_size = "
                          f"{c.data.batch_size}")
    for field in ("model.logit_chunk", "model.attention_chunk", "eval.max_new_tokens"):
        if not isinstance(_get(c, field), int) or _get(c, field) < 0:
            raise ConfigError(f"config.{field} must be an integer >= 0 (0 = off / the default), got {_get(c, field)!r}")
    if c.rl.k3_clamp < 0:
        raise ConfigError(f"config.rl.k3_clamp must be >= 0 (0 = no clamp), got {c.rl.k3_clamp}")
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
    if c.data.get("tfds"):
        _check_tfds(c)
    if not user_data(c) and c.data.num_train < c.data.batch_size:
        raise ConfigError(f"config.data.num_train = {c.data.num_train} is smaller than one batch "
                          f"({c.data.batch_size})")
    if "lora" in c:
        check_lora(c.lora)
    try:
        stages = parse_stages(c.rl.ptst_stages) if c.rl.ptst_stages else []
    except ValueError as e:
        raise ConfigError(str(e)) from None
    stages = stages or [Stage(c.rollout.max_new_tokens, c.rollout.num_samples, c.total_steps)]
    if c.mode != "sft":                  # GRPO's advantages compare the G samples of a prompt: one is nothing
        for i, s in enumerate(stages):
            if s.num_samples < 2:
                where = (f"config.rl.ptst_stages stage {i + 1} ({c.rl.ptst_stages!r})" if c.rl.ptst_stages
                         else "config.rollout.num_samples")
                raise ConfigError(f"{where}: GRPO needs G >= 2 samples per prompt, got {s.num_samples} (with one "
                                  "sample every advantage is 0 and nothing is learned)")
    return stages


def _check_tfds(c: ml_collections.ConfigDict) -> None:
    """config.data.tfds names a prepared (or mr1jax-generated) array_record TFDS dataset with a train split."""
    from mr1jax.data.tfds_source import TfdsError, open_builder

    if not isinstance(c.data.tfds, str) or not isinstance(c.data.get("tfds_data_dir", ""), str):
        raise ConfigError(f"config.data.tfds / config.data.tfds_data_dir must be strings, got {c.data.tfds!r}, "
                          f"{c.data.get('tfds_data_dir')!r}")
    if c.data.train_files:
        raise ConfigError(f"config.data.tfds = {c.data.tfds!r} and config.data.train_files = {c.data.train_files!r}: "
                          "set one of them")
    try:
        splits = open_builder(c.data.tfds, c.data.get("tfds_data_dir") or None).info.splits
    except TfdsError as e:
        raise ConfigError(f"config.data.tfds = {c.data.tfds!r}: {e}") from None
    if "train" not in splits:
        raise ConfigError(f"config.data.tfds = {c.data.tfds!r}: no 'train' split (it has {', '.join(sorted(splits))})")


def user_data(c: ml_collections.ConfigDict) -> bool:
    """True when training on the user's data (files or a TFDS dataset), False on a synthetic task."""
    return bool(c.data.train_files or c.data.get("tfds"))
def check_lora(lc: ml_collections.ConfigDict) -> None:
    """ConfigError naming the first bad ``config.lora`` field."""
    import re

    if not isinstance(lc.rank, int) or isinstance(lc.rank, bool) or lc.rank < 0:
        raise ConfigError(f"config.lora.rank must be an integer >= 0 (0 = full fine-tuning), got {lc.rank!r}")
    if not lc.rank:
        return
    if not isinstance(lc.alpha, (int, float)) or not lc.alpha > 0:
        raise ConfigError(f"config.lora.alpha must be > 0, got {lc.alpha!r}")
    if lc.dropout != 0:
        raise ConfigError(f"config.lora.dropout = {lc.dropout!r}: adapter dropout is not implemented; use 0")
    if not isinstance(lc.targets, str) or not lc.targets:
        raise ConfigError(f"config.lora.targets must be a preset ({', '.join(PRESETS)}, joined by '+') or a regex "
                          f"over linear-layer paths, got {lc.targets!r}")
    try:
        re.compile(target_regex(lc.targets))
    except re.error as e:
        raise ConfigError(f"config.lora.targets = {lc.targets!r} is neither a preset ({', '.join(PRESETS)}) nor a "
                          f"valid regex: {e}") from None


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


def images_per_prompt(c: ml_collections.ConfigDict) -> int:
    """``data.images_per_prompt`` (1 for configs written before the field existed)."""
    return int(c.data.get("images_per_prompt", 1))


def image_sizing(c: ml_collections.ConfigDict) -> ImageSizing:
    """How the run sizes images: ``data.image_size`` > 0 fixed squares, 0 native resolution between
    ``data.min_pixels`` and ``data.max_pixels`` (the Qwen processor's defaults when absent), prompts padded to
    ``data.patch_buckets`` (comma-separated per-prompt patch counts; "" derives them from max_pixels)."""
    d = c.data
    buckets = d.get("patch_buckets", "") or ""
    try:
        sizes = tuple(int(x) for x in str(buckets).replace(" ", "").split(",") if x)
    except ValueError:
        raise ValueError(f"data.patch_buckets = {buckets!r} must be comma-separated integers") from None
    return ImageSizing(int(d.image_size), int(d.get("min_pixels", DEFAULT_MIN_PIXELS)),
                       int(d.get("max_pixels", DEFAULT_MAX_PIXELS)), sizes, images_per_prompt(c))


def image_kwargs(c: ml_collections.ConfigDict) -> dict[str, Any]:
    """The image arguments of `mr1jax.data.pipeline.make_rl_dataset` for this run."""
    s = image_sizing(c)
    return dict(image_size=s.fixed, min_pixels=s.min_pixels, max_pixels=s.max_pixels, patch_buckets=s.buckets,
                images_per_prompt=s.images_per_prompt)


def task_image_size(c: ml_collections.ConfigDict) -> int:
    """Side of the synthetic tasks' square scenes: data.image_size, or with native resolution data.scene_size."""
    return int(c.data.image_size or c.data.get("scene_size", 112))


def make_optimizer(lr, c: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """One optimizer structure for both phases (so checkpoints of either phase have the same tree)."""
    return optax.chain(optax.clip_by_global_norm(c.optim.grad_clip), optax.adamw(lr, weight_decay=c.optim.weight_decay))


def uses_kl(c: ml_collections.ConfigDict) -> bool:
    """False when beta is 0 for the whole run: the reference model is then skipped."""
    if c.rl.beta_schedule == "constant":
        return c.rl.beta > 0
    return c.rl.beta_max > 0


def main_task_name(c: ml_collections.ConfigDict) -> str:
    """The key of the training task's metrics: the synthetic task's name, or "eval" for the user's files."""
    return "eval" if user_data(c) else c.data.task


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


def updates_per_rl_step(c: ml_collections.ConfigDict) -> int:
    """Optimizer steps per RL step: mu passes x mini-batches."""
    return c.rl.updates_per_batch * c.rl.minibatches
