"""Supervised fine-tuning only (Vision-R1's cold start), on the embedded tiny model and synthetic counting by
default; point it at your data with `--config.data.train_files=...` (the response goes in the answer field,
`<think>...</think><answer>...</answer>`; rows with a bare answer get a one-line think).

    python -m mr1jax.train --config=configs/sft.py --workdir=/tmp/mr1jax_sft

Hardware: any CPU at these sizes.
"""

from configs import grpo


def get_config():
    c = grpo.get_config()
    c.mode = "sft"
    c.sft.steps = 800
    c.sft.learning_rate = 5e-4
    c.sft.annotator_miss_rate = 0.0  # exact traces
    c.eval.every_steps = 0
    return c
