"""Building what a training config names: the model (+ tokenizer) on a mesh, the policy split for training
(LoRA adapters vs frozen base), a LoRA run's adapters restored, and the rows of a split."""

from __future__ import annotations

from typing import Any

import os
from typing import Callable

import jax
import ml_collections
from flax import nnx

from mr1jax.parallel import sharding
from mr1jax.data.rows import RowSource
from mr1jax.data.tasks import TASKS
from mr1jax.data.tokenizer import load_tokenizer, model_token_ids
from mr1jax.models import Qwen2VL, config_class, load_pretrained, model_class
from mr1jax.models.lora import (LoRAConfig, LoRAParam, adapters_from_peft, apply_lora, fold_adapters, load_peft,
                               quantize_base, shard_adapters)
from mr1jax.models.qwen2_vl.model import set_attention_chunk
from mr1jax.data.tasks.sizes import mixed_sizes
from mr1jax.trainer.config import model_dtypes, phase_steps, task_image_size

def build_model(c: ml_collections.ConfigDict, mesh) -> tuple[Qwen2VL, Any]:
    """The policy on `mesh` (parameters in ``model.param_dtype``, or the compute dtype for a LoRA run's frozen
    base, compute in ``model.dtype``, remat as
    ``model.remat``, attention blocks of ``model.attention_chunk`` queries) and its tokenizer: from
    ``model.hf_path`` (its config.json's model_type picks Qwen2-VL or Qwen2.5-VL), or the tiny random model of
    ``model.tiny`` in the family ``model.family`` (qwen2_vl | qwen2_5_vl)."""
    dtype, param_dtype = model_dtypes(c)
    if c.get("lora") is not None and c.lora.get("rank", 0):
        param_dtype = dtype      # LoRA: the frozen base is stored in the compute dtype (adapters: model.param_dtype)
    remat = c.model.get("remat", "none")
    if c.model.hf_path:
        model = load_pretrained(c.model.hf_path, dtype=dtype, param_dtype=param_dtype, mesh=mesh, remat=remat)
        tokenizer = load_tokenizer(c.model.tokenizer_path or c.model.hf_path)
        return set_attention_chunk(model, c.model.get("attention_chunk", 0)), tokenizer
    tokenizer = load_tokenizer(c.model.tokenizer_path or None)
    cfg = tiny_model_config(c, tokenizer)
    model = model_class(cfg)(cfg, rngs=nnx.Rngs(c.seed), dtype=dtype, param_dtype=param_dtype, remat=remat)
    set_attention_chunk(model, c.model.get("attention_chunk", 0))
    return sharding.shard_model(model, mesh), tokenizer


def tiny_model_config(c: ml_collections.ConfigDict, tokenizer):
    """The tiny random model's config: family ``model.family``, sizes ``model.tiny``, the tokenizer's ids."""
    return config_class(c.model.get("family", "qwen2_vl")).tiny(
        vocab_size=len(tokenizer), hidden_size=c.model.tiny.hidden_size, num_layers=c.model.tiny.num_layers,
        vision_depth=c.model.tiny.vision_depth, **model_token_ids(tokenizer))


def build_rows(c: ml_collections.ConfigDict, split: str):
    """Rows of a split: the user's files, a prepared TFDS dataset (``data.tfds``: its train split, and for eval
    its test / validation split), or the synthetic task; None for eval when the user's data has no eval rows."""
    if c.data.get("tfds"):
        from mr1jax.data.tfds_source import TfdsSource, eval_split  # tensorflow_datasets only when used

        data_dir = c.data.get("tfds_data_dir") or None
        split = "train" if split == "train" else eval_split(c.data.tfds, data_dir)
        return None if split is None else TfdsSource(c.data.tfds, split, data_dir=data_dir,
                                                     skip_bad_rows=c.data.skip_bad_rows)
    files = c.data.train_files if split == "train" else c.data.eval_files
    if split == "eval" and c.data.train_files and not files:
        return None
    if files:
        return RowSource([f.strip() for f in files.split(",") if f.strip()], c.data.fields,
                         skip_bad_rows=c.data.skip_bad_rows)
    num = c.data.num_train if split == "train" else c.data.num_eval
    return task_rows(c, c.data.task, num, "train" if split == "train" else "test")


def task_rows(c: ml_collections.ConfigDict, task: str, num: int, split: str) -> list[dict]:
    """`num` rows of synthetic task `task` (split "train" / "test"): square scenes of `task_image_size`, placed on
    canvases of varied sizes and aspect ratios when ``data.mixed_sizes`` (for native resolution)."""
    rows = TASKS[task](num, seed=c.seed, split=split, image_size=task_image_size(c))
    return mixed_sizes(rows, c.seed + (split == "test")) if c.data.get("mixed_sizes", False) else rows


def split_for_training(model: nnx.Module, c, mesh, *, seed: int | None = None):
    """(graphdef, trainable params, frozen base or None) of the policy a training config asks for.

    ``lora.rank == 0``: full fine-tuning, ``nnx.split(model)`` and no frozen part. Otherwise adapters are
    attached (``lora.*``), placed on `mesh`, and the model split into the adapters (what is trained,
    checkpointed and optimised) and the frozen base (passed to the jitted steps as a non-donated argument).
    ``lora.init_from``: a PEFT adapter directory whose values replace the fresh adapters (continued training;
    its layers must be among the targets and have the configured rank)."""
    cfg = LoRAConfig.from_config(c)
    if cfg.rank == 0:
        graphdef, params = nnx.split(model)
        return graphdef, params, None
    apply_lora(model, cfg, seed=c.seed if seed is None else seed, dtype=model_dtypes(c)[1])   # fp32 master adapters
    if c.lora.get("init_from", ""):          # continue from PEFT adapters (their rank / alpha for those layers)
        try:
            got = load_peft(model, c.lora.init_from, dtype=model_dtypes(c)[1])
        except (OSError, ValueError) as e:
            raise ValueError(f"lora.init_from = {c.lora.init_from!r}: {e}") from None
        if got.rank != cfg.rank:
            raise ValueError(f"lora.init_from = {c.lora.init_from!r} holds rank-{got.rank} adapters; set "
                             f"lora.rank = {got.rank} (it is {cfg.rank})")
    quantize_base(model, c.lora.get("base_quant", "none"))
    sharding_of = sharding.param_shardings(nnx.state(model, nnx.Param), mesh)      # quantised kernels + scales
    nnx.update(model, jax.tree.map(lambda x, s: jax.device_put(x, s), nnx.state(model, nnx.Param), sharding_of))
    shard_adapters(model, mesh)
    graphdef, adapters, base = nnx.split(model, LoRAParam, ...)
    return graphdef, adapters, base


def restore_run_adapters(model: nnx.Module, c, workdir: str, step: int, restore: Callable[[nnx.State], nnx.State]
                         ) -> nnx.Module:
    """Attach to the base `model` (built from run config `c`) the adapters of checkpoint `step` of the LoRA run
    in `workdir` (in place; returns the model). `restore(abstract adapters) -> adapters` reads the checkpoint's
    ``params`` subtree. For an RL checkpoint of a ``lora.sft_to_rl = "merge"`` run, the SFT adapters saved at
    the boundary (``<workdir>/sft_adapters``) are first folded into the base, as in training."""
    cfg = LoRAConfig.from_config(c)
    apply_lora(model, cfg, seed=c.seed, dtype=model_dtypes(c)[1])
    quantize_base(model, c.lora.get("base_quant", "none"))
    graphdef, adapters, base = nnx.split(model, LoRAParam, ...)
    sft_steps, rl_steps = phase_steps(c)
    if c.lora.sft_to_rl == "merge" and sft_steps and rl_steps and step > sft_steps:
        sft = adapters_from_peft(graphdef, adapters, base, os.path.join(workdir, "sft_adapters"))
        _, base = fold_adapters(graphdef, sft, base, seed=c.seed + 1)
    return nnx.merge(graphdef, restore(adapters), base)


def restore_params(model, workdir: str, step: int, config=None):
    """Load the parameters of checkpoint `step` of the run in `workdir` into `model` (in place); returns the model.

    Only the `params` subtree of the saved state is read (no optimizer state or reference copy), straight
    onto the shardings of `model`'s parameters. A LoRA run (`config.lora.rank > 0`) saved only adapters: they
    are attached to `model` (the base) and the returned model carries them (the sampler applies them).
    """
    from mr1jax.trainer.checkpoint import Checkpointer     # orbax only when a checkpoint is read

    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), async_save=False)
    try:
        if config is not None and config.get("lora", {}).get("rank", 0):
            return restore_run_adapters(model, config, workdir, step, lambda a: ckpt.restore_params(step, a))
        params = ckpt.restore_params(step, nnx.state(model, nnx.Param))
    finally:
        ckpt.close()
    nnx.update(model, params)
    return model
