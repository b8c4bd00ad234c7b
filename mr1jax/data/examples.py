"""What the data paths read from one example (a row dict): its images in prompt order, how many, and where it
came from (file and line, for error messages)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

#: The ``file`` of rows given in memory (no file to name).
IN_MEMORY = "<in-memory source>"


def where(example: Mapping[str, Any]) -> tuple[str, int | None]:
    """(file, 1-based line or row) of an example, for error messages."""
    return str(example.get("file", IN_MEMORY)), example.get("row")


def example_images(example: Mapping[str, Any]) -> list[Any]:
    """The images of an example, in prompt order: ``example["images"]`` or ``[example["image"]]``."""
    images = example.get("images")
    if images is not None:
        return list(images)
    image = example.get("image")
    return [] if image is None else [image]


def num_images(example: Mapping[str, Any]) -> int:
    """How many images an example carries (``num_images`` when the images were left out of a text-only view)."""
    if "num_images" in example:
        return int(example["num_images"])
    return len(example_images(example)) if ("images" in example or "image" in example) else 1
