"""Synthetic visual tasks generated in-process from a seed (no downloads)."""

from mr1jax.data.tasks.counting import counting_examples

TASKS = {"counting": counting_examples}

__all__ = ["TASKS", "counting_examples"]
