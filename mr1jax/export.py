"""Convert a training checkpoint into a Hugging Face directory that `transformers` loads.

    python -m mr1jax.export --workdir=DIR [--step=N] [--out=DIR/hf-N] [--dtype=bfloat16]

For a LoRA run (``config.lora.rank > 0``) the checkpoint holds only adapters: they are written in PEFT format to
``<out>-adapter`` (`adapter_config.json` + `adapter_model.safetensors`, for ``peft.PeftModel.from_pretrained`` on
the base model; for an RL checkpoint of a ``lora.sft_to_rl = "merge"`` run the base is the SFT-merged model) and
merged into the base for the full HF directory `<out>`.

The model structure comes from the run's own `DIR/config.json` (the training config), so a checkpoint
restores onto exactly the model it was trained with.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")  # "PyTorch was not found": torch is not used

import jax.numpy as jnp
import ml_collections
from flax import nnx

from mr1jax.models import lora
from mr1jax.models.qwen2_vl.hf import save_pretrained
from mr1jax.trainer.checkpoint import CheckpointCorruptError, Checkpointer, CheckpointMismatchError


#: Where a LoRA run's PEFT adapters go inside the export directory (the merged model is the directory itself).
ADAPTER_SUBDIR = "adapter"


class ExportError(ValueError):
    """The work dir holds no run or no checkpoint to export."""


def export_checkpoint(workdir: str, step: int | None = None, out: str | None = None,
                      dtype: str | None = None) -> str:
    """Write checkpoint `step` (default: latest) of the run in `workdir` as a HF directory; returns its path."""
    from mr1jax.parallel import sharding
    from mr1jax.trainer.build import build_model, restore_run_adapters

    path = os.path.join(workdir, "config.json")
    if not os.path.isfile(path):
        raise ExportError(f"{path} not found: {workdir!r} is not an mr1jax training run directory")
    if not os.path.isdir(os.path.join(workdir, "checkpoints")):
        raise ExportError(f"no checkpoint in {os.path.join(workdir, 'checkpoints')}: nothing to export")
    with open(path) as f:
        config = ml_collections.ConfigDict(json.load(f))
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), async_save=False)
    step = ckpt.latest_step() if step is None else step
    if step is None:
        ckpt.close()
        raise ExportError(f"no checkpoint in {ckpt.directory}: nothing to export")
    model, tokenizer = build_model(config, sharding.make_mesh({"data": 1, "fsdp": -1, "tensor": 1}))
    lora_rank = config.get("lora", {}).get("rank", 0)
    out = out or os.path.join(workdir, f"hf-{step}")
    try:
        if lora_rank:        # LoRA run: the checkpoint holds adapters; PEFT adapters in OUT/adapter, merged model in OUT
            model = restore_run_adapters(model, config, workdir, step, lambda a: ckpt.restore_params(step, a))
            lora.save_peft(model, os.path.join(out, ADAPTER_SUBDIR), lora.LoRAConfig.from_config(config))
            lora.merge_lora(model)
        else:
            nnx.update(model, ckpt.restore_params(step, nnx.state(model, nnx.Param)))
    finally:
        ckpt.close()
    save_pretrained(model, out, save_dtype=jnp.dtype(dtype) if dtype else None)
    tokenizer.save_pretrained(out)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--step", type=int, default=None)
    parser.add_argument("--out", default=None)
    parser.add_argument("--dtype", default=None, choices=[None, "float32", "bfloat16"])
    args = parser.parse_args(argv)
    try:
        out = export_checkpoint(args.workdir, args.step, args.out, args.dtype)
    except (ExportError, FileNotFoundError, CheckpointMismatchError, CheckpointCorruptError) as e:
        print(f"{parser.prog}: error: {e}".replace("\n", " "), file=sys.stderr, flush=True)
        sys.exit(2)
    print(out)


if __name__ == "__main__":
    main()
