"""Building what a training config names: the model (+ tokenizer) on a mesh, and the rows of a split."""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import ml_collections
from flax import nnx

from mr1jax import sharding
from mr1jax.data.rows import RowSource
from mr1jax.data.tasks import TASKS
from mr1jax.data.tokenizer import load_tokenizer, model_token_ids
from mr1jax.models import Qwen2VL, config_class, load_pretrained, model_class
from mr1jax.models.qwen2_vl.model import set_attention_chunk

#: ``config.model.dtype`` / ``config.model.param_dtype`` values.
MODEL_DTYPES: tuple[str, ...] = ("float32", "bfloat16")
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def model_dtypes(c: ml_collections.ConfigDict) -> tuple[Any, Any]:
    """(compute dtype, parameter storage dtype) from ``config.model.dtype`` / ``config.model.param_dtype``."""
    return _DTYPES[c.model.dtype], _DTYPES[c.model.get("param_dtype", "float32")]


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
    return TASKS[c.data.task](num, seed=c.seed, split="train" if split == "train" else "test",
                              image_size=c.data.image_size)

