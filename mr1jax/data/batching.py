"""The grain maps of the prompt pipeline (`mr1jax.data.pipeline.make_rl_dataset` builds the graph): per element,
this process's share of a global batch, native resolution's patch bucket of that batch, image preprocessing
(fixed size or each image at its own grid); per batch, chat template + tokenize + left-pad into an `RLBatch`."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence
from typing import Any, Callable

import grain
import numpy as np

from mr1jax.data.examples import IN_MEMORY, example_images, where
from mr1jax.data.rows import DataError
from mr1jax.data.chat import build_messages, format_prompts
from mr1jax.data.sizing import pad_pixel_values
from mr1jax.data.vision import num_image_tokens

logger = logging.getLogger("mr1jax.data.pipeline")


def native_fields(source: Sequence[Mapping[str, Any]], i: int) -> Mapping[str, Any]:
    """The whole row (its images are needed for their sizes), with file / row filled in for in-memory rows."""
    example = source[i]
    if getattr(source, "text_fields", None) is None:
        example = {"file": IN_MEMORY, "row": i + 1, **example}
    return example


class WithBucket:
    """Element ``j`` of this process's stream -> (row, patch bucket of its global batch). The global batch of
    ``b * count`` consecutive elements of `ds` is the same on every process, and so is its bucket: the smallest
    of `buckets` that holds the batch's largest prompt (`patches` has every element's patch count, shuffled and
    repeated like `ds`), so all processes pad their shares to one shape without exchanging anything."""

    def __init__(self, ds: grain.MapDataset, patches: grain.MapDataset, b: int, index: int, count: int, buckets):
        self.ds, self.patches, self.b, self.index, self.count, self.buckets = ds, patches, b, index, count, buckets
        self._last = (-1, 0)              # (global batch, its bucket): computed once per batch, not per element

    def __call__(self, j: int):
        batch = j // self.b
        last_batch, bucket = self._last
        if batch != last_batch:
            first = batch * self.b * self.count
            end = min(first + self.b * self.count, len(self.patches))
            bucket = self.buckets(max(int(self.patches[t]) for t in range(first, end)))
            self._last = (batch, bucket)
        return self.ds[global_position(j, self.b, self.index, self.count)], bucket


@dataclasses.dataclass(frozen=True)
class RLBatch:
    """One batch of prompts for the RL sampler (host numpy arrays).

    Attributes:
      input_ids: ``[B, L] int32``, left-padded with the tokenizer's pad id.
      attention_mask: ``[B, L] int32``, 0 on left padding.
      pixel_values: ``[B * k * P, 1176] float32``, image by image in row order (k images per row).
      image_grid_thw: ``[B * k, 3] int64``, every row ``(1, H/14, W/14)``.
      answers: ``[B]`` object array of ground-truth answer strings.
      ids: ``[B]`` object array of example ids.
      questions: ``[B]`` object array of the raw question strings (before templating).
      patches_per_prompt: None (fixed size: the images' patches concatenated), or native resolution's P: the
        batch's patch bucket; ``pixel_values`` is then ``[B * P, 1176]``, each prompt's images' patches (any
        sizes, 0 up to images_per_prompt images) first in its block of P, zeros after, and ``image_grid_thw``
        holds every real image's own grid (`mr1jax.models.qwen2_vl.model.prepare_inputs(...,
        patches_per_row=P)` gives the matching patch positions and segments).
    """

    input_ids: np.ndarray
    attention_mask: np.ndarray
    pixel_values: np.ndarray
    image_grid_thw: np.ndarray
    answers: np.ndarray
    ids: np.ndarray
    questions: np.ndarray
    patches_per_prompt: int | None = None

    @property
    def batch_size(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def seq_len(self) -> int:
        return int(self.input_ids.shape[1])

    def model_inputs(self) -> dict[str, np.ndarray]:
        """The numeric arrays, keyed as the model's arguments."""
        return {
            "input_ids": self.input_ids,
            "attention_mask": self.attention_mask,
            "pixel_values": self.pixel_values,
            "image_grid_thw": self.image_grid_thw,
        }


class PrepareExample:
    """Per-example map (runs in read threads): decode and preprocess the row's images with `preprocess`
    (``images -> (pixel_values, image_grid_thw)``: a fixed size, or `ImageSizing.preprocess` at native
    resolution). An element may come as (row, patch bucket of its global batch) (`WithBucket`); the bucket is
    passed on as ``bucket``. A bad image is a DataError naming the row, or (``skip_bad_rows``) the row is dropped."""

    def __init__(self, preprocess: Callable[[list[Any]], tuple[np.ndarray, np.ndarray]], skip_bad_rows: bool):
        self.preprocess = preprocess
        self.skip_bad_rows = skip_bad_rows

    def __call__(self, element: Mapping[str, Any] | tuple[Mapping[str, Any], int]) -> dict[str, Any] | None:
        example, bucket = element if isinstance(element, tuple) else (element, None)
        try:
            pixel_values, grid = self.preprocess(example_images(example))
        except (ValueError, OSError, TypeError) as e:
            file, row = where(example)
            err = DataError(file, row, "image", str(e).removeprefix("image 0: ").removeprefix("image 0"))
            if self.skip_bad_rows:
                logger.warning("skipping bad row: %s", err)
                return None
            raise err from e
        out = {"pixel_values": pixel_values, "image_grid_thw": grid, "question": example["question"],
               "answer": example["answer"], "id": str(example["id"])}
        if bucket is not None:
            out["bucket"] = bucket
        return out


class ShareOfBatches:
    """Element ``j`` of process ``index``'s share: row ``index * b + j % b`` of global batch ``j // b`` (global
    batches of ``b * count`` consecutive elements of `ds`)."""

    def __init__(self, ds: grain.MapDataset, b: int, index: int, count: int):
        self.ds, self.b, self.index, self.count = ds, b, index, count

    def __call__(self, j: int):
        return self.ds[global_position(j, self.b, self.index, self.count)]


def global_position(j: int, b: int, index: int, count: int) -> int:
    """Element `j` of process `index`'s share -> its position in the global stream: row ``index * b + j % b`` of
    global batch ``j // b`` (global batches of ``b * count`` elements)."""
    return (j // b) * b * count + index * b + j % b


def as_list(elements: Sequence[Any]) -> list[Any]:
    return list(elements)


def object_array(values: Sequence[str]) -> np.ndarray:
    out = np.empty(len(values), dtype=object)
    out[:] = list(values)
    return out


class Collate:
    """Batch map: chat template + tokenize + left-pad (``format_prompts``) and stack images."""

    def __init__(self, tokenizer: Any, buckets: Sequence[int], system_prompt: str | None, question_template: str,
                 patch_buckets=None):
        self.tokenizer = tokenizer
        self.buckets = list(buckets)
        self.system_prompt = system_prompt
        self.question_template = question_template
        self.patch_buckets = patch_buckets          # native resolution: PatchBuckets, else None

    def __call__(self, elements: Sequence[Mapping[str, Any]]) -> RLBatch:
        conversations = [build_messages(render_question(e["question"], self.question_template),
                                        len(e["image_grid_thw"]), self.system_prompt) for e in elements]
        grids = np.concatenate([e["image_grid_thw"] for e in elements])
        counts = [[int(n) for n in num_image_tokens(e["image_grid_thw"])] for e in elements]
        prompts = format_prompts(self.tokenizer, conversations, counts, buckets=self.buckets)
        pixel_values, per_prompt = np.concatenate([e["pixel_values"] for e in elements], axis=0), None
        if self.patch_buckets is not None:          # a skipped bad image can mix batches: take the largest
            per_prompt = self.patch_buckets(max(max(e["bucket"], len(e["pixel_values"])) for e in elements))
            pixel_values = pad_pixel_values(pixel_values, grids, [len(e["image_grid_thw"]) for e in elements],
                                            per_prompt)
        return RLBatch(
            input_ids=prompts.input_ids,
            attention_mask=prompts.attention_mask,
            pixel_values=pixel_values,
            patches_per_prompt=per_prompt,
            image_grid_thw=grids,
            answers=object_array([e["answer"] for e in elements]),
            ids=object_array([e["id"] for e in elements]),
            questions=object_array([e["question"] for e in elements]),
        )


def render_question(question: str, question_template: str) -> str:
    """``question_template`` with ``{question}`` replaced (plain replacement, so other braces --
    e.g. ``\\boxed{}`` -- are left alone)."""
    return question_template.replace("{question}", question)
