"""grain input pipeline: dataset rows -> fixed-shape Qwen2-VL prompt batches for the RL sampler.

Graph built by :func:`make_rl_dataset`::

    MapDataset.source(rows)                  # rows whose prompt fits max(prompt_buckets)
      .shuffle(seed)                         # a fresh permutation per epoch (seed + epoch)
      .repeat(num_epochs)                    # None: forever
      [this process's rows of each global batch]   # shard_count n > 1 (see Sharding)
      .map(_PrepareExample)                  # decode + resize to image_size + patchify (threads)
      .to_iter_dataset(ReadOptions)          # drops rows skipped by a bad image (None)
      .batch(batch_size, drop_remainder=True)
      .map(_Collate)                         # chat template + tokenize + left-pad -> RLBatch
      [.mp_prefetch(worker_count)]           # only if worker_count > 0

Iterate with ``it = iter(ds)``; ``it.get_state()`` / ``it.set_state(state)`` save and restore
the position exactly (grain's checkpointable iterator; the state is a small JSON-able dict).

Shapes. Every image is resized to exactly ``image_size = (H, W)`` (multiples of 28), and every row
carries ``images_per_prompt = k`` images (``example["images"]``, or the single ``example["image"]``;
the chat template gets one placeholder per image, in the order given), so ``pixel_values`` is always
``[B * k * P, 1176]`` with ``P = (H/14) * (W/14)`` and every row has ``k * P / 4`` ``<|image_pad|>``
tokens. A row with another number of images raises :class:`DataError` naming it (or is skipped). The prompt length ``L`` is the smallest bucket of
``prompt_buckets`` that fits the batch's longest prompt: the number of distinct batch shapes
(and so of jit compilations downstream) equals the number of buckets actually used. Pass
``pad_to_max_bucket=True`` for a single shape ``L = max(prompt_buckets)``.

Order. Deterministic for a given ``seed`` and ``worker_count`` (``read_threads`` does not
matter; with workers each one batches a strided slice of the shuffled rows, so changing
``worker_count`` changes which rows share a batch); different seeds give different orders; each epoch is a different permutation. With
``num_epochs=None`` a batch may straddle an epoch boundary; with a finite ``num_epochs`` the
last incomplete batch is dropped.

Sharding (multi-host). With ``shard_index=i, shard_count=n`` every process shuffles all rows with the same
seed and cuts the stream into global batches of ``n * batch_size``; process ``i`` reads and builds only the
``i``-th ``batch_size`` rows of each (``_ShareOfBatches``). The shares are disjoint, together they cover
every row once per epoch, the global batches are exactly those one process with ``n * batch_size`` would
build (so an n-process run equals a 1-process run), and all processes yield the same number of batches
(they step in lockstep). ``batch_size`` is the process's *local* number of prompts; each process's iterator
state is its own (checkpoint every process's). Every process checks every row's prompt length (text only),
so the rows kept with ``skip_bad_rows`` are the same everywhere and a bad row stops every process.

Bad rows. Rows are validated cheaply when the source is loaded (``mr1jax.data.rows``). Here,
before the pipeline is built, every prompt is rendered and tokenized once (text only, image pads
included) and a row longer than ``max(prompt_buckets)`` raises :class:`DataError` naming file and
row, its token count and the bucket (or is skipped with ``skip_bad_rows``): prompts are never cut,
so an image span is never split and the image features always match the image tokens. An image that fails to decode when its row is read raises
:class:`DataError` naming file and row; with ``skip_bad_rows`` the row is dropped with a warning
(the batch is filled from the following rows, so shapes stay static).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import grain
import numpy as np

from mr1jax.data.chat import IMAGE_PAD_TOKEN, build_messages
from mr1jax.data.examples import IN_MEMORY, example_images, num_images, where
from mr1jax.data.batching import (Collate, PrepareExample, RLBatch, ShareOfBatches, WithBucket,
                                  as_list, native_fields, render_question)
from mr1jax.data.rows import DataError
from mr1jax.data.sizing import ImageSizing
from mr1jax.data.vision import DEFAULT_MAX_PIXELS, DEFAULT_MIN_PIXELS, preprocess_images

__all__ = ["RLBatch", "example_images", "make_rl_dataset", "patches_per_image", "prepare_source", "render_question"]

logger = logging.getLogger(__name__)

_FACTOR = 28  # patch_size * merge_size
_PATCH = 14



def _check_image_size(image_size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(image_size, (int, np.integer)) and not isinstance(image_size, bool):
        image_size = (int(image_size), int(image_size))
    ok = (
        isinstance(image_size, (tuple, list))
        and len(image_size) == 2
        and all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v > 0 and v % _FACTOR == 0
                for v in image_size)
    )
    if not ok:
        raise ValueError(f"image_size must be (height, width), positive multiples of {_FACTOR}, got {image_size!r}")
    return int(image_size[0]), int(image_size[1])


def patches_per_image(image_size: int | Sequence[int]) -> int:
    """``P``: rows of ``pixel_values`` per image of ``image_size`` (``(H/14) * (W/14)``)."""
    h, w = _check_image_size(image_size)
    return (h // _PATCH) * (w // _PATCH)



def _prompt_length_error(example: Mapping[str, Any], length: int, max_bucket: int) -> DataError:
    file, row = where(example)
    return DataError(file, row, "question",
                     f"prompt has {length} tokens (with its image tokens), more than the largest prompt bucket "
                     f"{max_bucket}; prompts are never cut (an image span would be split): raise the bucket "
                     "(data.prompt_bucket) or skip such rows (data.skip_bad_rows)")



def _image_count_error(example: Mapping[str, Any], count: int, images_per_prompt: int, native: bool = False
                       ) -> DataError:
    file, row = where(example)
    if native:
        return DataError(file, row, "image", f"row has {count} image(s), more than images_per_prompt = "
                         f"{images_per_prompt}")
    return DataError(file, row, "image", f"row has {count} image(s); every prompt of a batch must carry "
                     f"images_per_prompt = {images_per_prompt} (static shapes)")



class _Rows(Sequence):
    """Source restricted to ``indices``; fills in ``file``/``row`` for plain in-memory sources."""

    def __init__(self, source: Sequence[Mapping[str, Any]], indices: np.ndarray):
        self._source = source
        self._indices = np.asarray(indices, dtype=np.int64)

    def __len__(self) -> int:
        return len(self._indices)

    def __getitem__(self, index):  # type: ignore[override]
        i = int(self._indices[index])
        example = dict(self._source[i])
        example.setdefault("file", IN_MEMORY)
        example.setdefault("row", i + 1)
        example.setdefault("id", f"{i}")
        return example

    def text_fields(self, index: int) -> Mapping[str, Any]:
        return _text_fields(self._source, int(self._indices[index]))


def _text_fields(source: Sequence[Mapping[str, Any]], i: int) -> Mapping[str, Any]:
    getter = getattr(source, "text_fields", None)  # RowSource: skips the (Parquet) image read
    example = getter(i) if getter is not None else source[i]
    if getter is None:
        example = {"file": IN_MEMORY, "row": i + 1, **example}
    return example


def _prompt_text(tokenizer: Any, question: str, *, system_prompt: str | None, question_template: str,
                 image_tokens: int | Sequence[int], num_images: int = 1) -> str:
    """The rendered prompt with each image's placeholder expanded to its token count (one count for every
    image, or one per image)."""
    conversation = build_messages(render_question(question, question_template), num_images, system_prompt)
    text = tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
    if text.count(IMAGE_PAD_TOKEN) != num_images:
        raise ValueError(f"chat template rendered {text.count(IMAGE_PAD_TOKEN)} {IMAGE_PAD_TOKEN!r} "
                         f"placeholders for {num_images} image(s)")
    if isinstance(image_tokens, (int, np.integer)):
        return text.replace(IMAGE_PAD_TOKEN, IMAGE_PAD_TOKEN * int(image_tokens))
    parts = text.split(IMAGE_PAD_TOKEN)
    return parts[0] + "".join(IMAGE_PAD_TOKEN * int(n) + rest for n, rest in zip(image_tokens, parts[1:]))


def prepare_source(
    source: Sequence[Mapping[str, Any]],
    *,
    tokenizer: Any,
    image_size: int | Sequence[int],
    prompt_buckets: Sequence[int],
    system_prompt: str | None = None,
    question_template: str = "{question}",
    skip_bad_rows: bool = False,
    chunk_size: int = 512,
    images_per_prompt: int = 1,
    sizing: ImageSizing | None = None,
) -> tuple[_Rows, np.ndarray, list[DataError]]:
    """Check every row's question/answer and prompt length (text only, no image decoding).

    With native resolution (`sizing.native`) every image's header is read (its size, not its pixels) to count
    its tokens as the processor will; rows may then carry 0 up to ``images_per_prompt`` images, and
    ``rows.patches`` holds each kept row's patch count (what the batches' patch buckets are chosen from).

    Returns:
      ``(rows, lengths, skipped)``: the rows that fit ``max(prompt_buckets)``, the prompt
      length (tokens, image pads included) of each kept row, and the errors of the rows
      dropped (only with ``skip_bad_rows``).

    Raises:
      DataError: a row with a missing/non-string question or answer, another number of images than
        ``images_per_prompt``, or a prompt longer than ``max(prompt_buckets)`` (unless ``skip_bad_rows``).
    """
    native = sizing is not None and sizing.native
    image_tokens = None if native else patches_per_image(image_size) // 4
    max_bucket = max(int(b) for b in prompt_buckets)
    kept: list[int] = []
    lengths: list[int] = []
    patches: list[int] = []
    skipped: list[DataError] = []

    def bad(err: DataError) -> None:
        if not skip_bad_rows:
            raise err
        skipped.append(err)

    for start in range(0, len(source), chunk_size):
        idx, texts, examples, row_patches = [], [], [], []
        for i in range(start, min(start + chunk_size, len(source))):
            example = native_fields(source, i) if native else _text_fields(source, i)
            file, row = where(example)
            for key in ("question", "answer"):
                if not isinstance(example.get(key), str) or not example[key].strip():
                    bad(DataError(file, row, key, f"missing or empty {key}"))
                    break
            else:
                count = num_images(example)
                if (count > images_per_prompt) if native else (count != images_per_prompt):
                    bad(_image_count_error(example, count, images_per_prompt, native))
                    continue
                tokens = image_tokens
                if native:
                    try:
                        grids = [sizing.grid_of(image) for image in example_images(example)]
                    except (ValueError, OSError, TypeError) as e:
                        bad(DataError(file, row, "image", f"cannot read the image size: {e}"))
                        continue
                    tokens = [h * w // 4 for h, w in grids]
                    row_patches.append(sum(h * w for h, w in grids))
                idx.append(i)
                examples.append(example)
                texts.append(_prompt_text(tokenizer, example["question"], system_prompt=system_prompt,
                                          question_template=question_template, image_tokens=tokens,
                                          num_images=count))
        if not texts:
            continue
        encoded = tokenizer(texts, add_special_tokens=False)["input_ids"]
        for j, (i, example, ids) in enumerate(zip(idx, examples, encoded)):
            if len(ids) > max_bucket:
                bad(_prompt_length_error(example, len(ids), max_bucket))
            else:
                kept.append(i)
                lengths.append(len(ids))
                if native:
                    patches.append(row_patches[j])
    rows = _Rows(source, np.asarray(kept, dtype=np.int64))
    rows.patches = np.asarray(patches, dtype=np.int64) if native else None
    return rows, np.asarray(lengths, dtype=np.int32), skipped



def _ensure_absl_flags_parsed() -> None:
    """grain's worker processes read absl flags; a program that never parsed them (not run via
    ``absl.app.run``) would fail with ``UnparsedFlagAccessError``, so use the defaults."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        logger.info("absl flags not parsed: using their defaults for grain workers")
        flags.FLAGS.mark_as_parsed()


def make_rl_dataset(
    source: Sequence[Mapping[str, Any]],
    *,
    tokenizer: Any,
    batch_size: int,
    image_size: int | Sequence[int] | None,
    prompt_buckets: Sequence[int],
    seed: int,
    shuffle: bool = True,
    num_epochs: int | None = None,
    worker_count: int = 0,
    system_prompt: str | None = None,
    question_template: str = "{question}",
    skip_bad_rows: bool | None = None,
    pad_to_max_bucket: bool = False,
    read_threads: int = 4,
    prefetch_buffer_size: int | None = None,
    shard_index: int = 0,
    shard_count: int = 1,
    images_per_prompt: int = 1,
    min_pixels: int = DEFAULT_MIN_PIXELS,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    patch_buckets: Sequence[int] = (),
) -> grain.IterDataset:
    """Build the RL prompt pipeline (see the module docstring for the graph and guarantees).

    Args:
      source: a ``mr1jax.data.rows.RowSource`` or any random-access sequence of dicts with
        ``image`` (anything ``preprocess_images`` takes), ``question`` and ``answer`` strings,
        and optionally ``id``, ``file``, ``row``.
      tokenizer: tokenizer with Qwen2-VL's chat template (``mr1jax.data.tokenizer.load_tokenizer``).
      batch_size: rows per batch ``B``; incomplete batches are dropped.
      image_size: ``(H, W)`` (or one int for square), multiples of 28; every image is resized
        to it (aspect ratio not kept). 0 or None: native resolution - each image resized by `smart_resize`
        between `min_pixels` and `max_pixels` (its own grid, as the Qwen processors do), rows carrying 0 up to
        `images_per_prompt` images, and each batch's prompts padded to a patch bucket (`RLBatch.patches_per_prompt`).
      prompt_buckets: allowed prompt lengths ``L``.
      seed: shuffle seed, in ``[0, 2**32)``.
      shuffle: shuffle rows (per epoch); ``False`` keeps the source order.
      num_epochs: passes over the data; ``None`` repeats forever.
      worker_count: grain worker processes (``mp_prefetch``); 0 = in-process. Workers are
        spawned: the launching script needs an ``if __name__ == "__main__":`` guard. Unparsed
        absl flags are marked parsed (defaults), as grain's workers read them.
      system_prompt: system message; ``None`` keeps the chat template's default.
      question_template: user text, with ``{question}`` replaced by the row's question.
      skip_bad_rows: drop rows whose prompt is too long or whose image fails to decode,
        instead of raising ``DataError``. ``None``: the source's ``skip_bad_rows`` (else False).
      pad_to_max_bucket: pad every batch to ``max(prompt_buckets)`` (one static shape).
      read_threads: threads decoding/preprocessing images.
      prefetch_buffer_size: examples read ahead (default ``2 * batch_size``).
      shard_index, shard_count: this process's share of a multi-process run (`jax.process_index()`,
        `jax.process_count()`). Rows are shuffled with the same seed on every process and cut into global
        batches of ``batch_size * shard_count``; process ``i`` reads and builds only the ``i``-th
        ``batch_size`` rows of each, so the processes' shares are disjoint, cover every row once per
        epoch, give the same global batches as one process would, and every process yields the same
        number of batches. ``batch_size`` is the per-process number of prompts.
      images_per_prompt: images every row carries (``example["images"]``; 1 also takes ``example["image"]``),
        each resized to ``image_size``; a row with another count raises ``DataError`` (or is skipped). Native
        resolution: the most images a row may carry.
      min_pixels, max_pixels: native resolution's limits on each image's resized area.
      patch_buckets: native resolution's per-prompt patch buckets (multiples of 4; () = derived from max_pixels
        and images_per_prompt, `mr1jax.data.sizing.PatchBuckets.for_limits`). Every process of a run derives a
        batch's bucket from the whole global batch (each row's size is read from its header up front), so all
        pad their shares to the same shape.

    Returns:
      A ``grain.IterDataset`` of :class:`RLBatch`; ``iter()`` gives a checkpointable iterator
      (``get_state`` / ``set_state``).

    Raises:
      DataError: a row whose prompt is longer than ``max(prompt_buckets)`` (eagerly, here), or
        whose image cannot be decoded (when that row is read).
      ValueError: bad arguments, or no row left.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size <= 0:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    native = not image_size
    sizing = ImageSizing(0, int(min_pixels), int(max_pixels), tuple(int(b) for b in patch_buckets),
                         int(images_per_prompt)) if native else None
    image_hw = None if native else _check_image_size(image_size)
    buckets = sorted({int(b) for b in prompt_buckets})
    if not buckets or buckets[0] <= 0:
        raise ValueError(f"prompt_buckets must be positive integers, got {list(prompt_buckets)}")
    if not 0 <= int(seed) < 2**32:
        raise ValueError(f"seed must be in [0, 2**32), got {seed}")
    if num_epochs is not None and num_epochs <= 0:
        raise ValueError(f"num_epochs must be positive or None, got {num_epochs}")
    if "{question}" not in question_template:
        raise ValueError(f"question_template must contain '{{question}}', got {question_template!r}")
    if skip_bad_rows is None:
        skip_bad_rows = bool(getattr(source, "skip_bad_rows", False))
    if isinstance(shard_count, bool) or not isinstance(shard_count, (int, np.integer)) or shard_count < 1 \
            or not 0 <= shard_index < shard_count:
        raise ValueError(f"shard_index must be in [0, shard_count), shard_count >= 1; got {shard_index}, {shard_count}")
    sharded = shard_count > 1
    rows, _, skipped = prepare_source(              # every process checks every row: the same rows are kept
        source, tokenizer=tokenizer, image_size=image_hw, prompt_buckets=buckets,
        system_prompt=system_prompt, question_template=question_template, skip_bad_rows=skip_bad_rows,
        images_per_prompt=int(images_per_prompt), sizing=sizing,
    )
    if skipped:
        logger.warning("skipping %d row(s) whose prompt does not fit; first: %s", len(skipped), skipped[0])
    if len(rows) == 0:
        raise ValueError(f"no usable rows: {len(source)} row(s) in the source, {len(skipped)} skipped")
    if num_epochs is not None and len(rows) * num_epochs < batch_size:
        raise ValueError(f"{len(rows)} row(s) x {num_epochs} epoch(s) cannot fill one batch of {batch_size}")

    ds = grain.MapDataset.source(rows)
    if shuffle:
        ds = ds.shuffle(seed=int(seed))
    ds = ds.repeat(num_epochs)
    patch_bucket_of = None
    if native:                                    # rows + their global batch's patch bucket
        patch_bucket_of = sizing.patch_buckets()
        patches = grain.MapDataset.source([int(n) for n in rows.patches])
        patches = (patches.shuffle(seed=int(seed)) if shuffle else patches).repeat(num_epochs)  # same order as ds
        per_global = int(batch_size) * shard_count
        ds = grain.MapDataset.range((len(ds) // per_global) * int(batch_size)).map(
            WithBucket(ds, patches, int(batch_size), int(shard_index), shard_count, patch_bucket_of))
        ds = ds.map(PrepareExample(sizing.preprocess, skip_bad_rows))
    else:
        if sharded:                               # this process's rows of each global batch
            per_global = int(batch_size) * shard_count
            ds = grain.MapDataset.range((len(ds) // per_global) * int(batch_size)).map(
                ShareOfBatches(ds, int(batch_size), int(shard_index), shard_count))
        ds = ds.map(PrepareExample(functools.partial(preprocess_images, fixed_size=image_hw), skip_bad_rows))
    read_options = grain.ReadOptions(
        num_threads=max(1, int(read_threads)),
        prefetch_buffer_size=int(prefetch_buffer_size) if prefetch_buffer_size is not None else 2 * batch_size,
    )
    it_ds = ds.to_iter_dataset(read_options)  # drops the None of skipped rows
    it_ds = it_ds.batch(int(batch_size), drop_remainder=True, batch_fn=as_list)
    it_ds = it_ds.map(Collate(tokenizer, [buckets[-1]] if pad_to_max_bucket else buckets,
                               system_prompt, question_template, patch_bucket_of))
    if worker_count > 0:
        _ensure_absl_flags_parsed()
        it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=int(worker_count)))
    return it_ds
