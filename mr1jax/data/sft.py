"""Supervised (cold-start) batches: image + question -> assistant response, loss on the response only.

Vision-R1's first stage fine-tunes on chain-of-thought responses in the `<think>...</think><answer>...</answer>`
layout. A batch here is the chat prompt (system + user turn with the image, generation prompt) followed by
the response and `<|im_end|>`, left-padded to one fixed length so every batch has the same shapes.

Batches are a pure function of (rows, seed, step): batch k of epoch e takes a seeded permutation of the rows,
so resuming at any step reproduces the same data order without iterator state.
"""

from __future__ import annotations

import hashlib
import logging
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from mr1jax.data.chat import IMAGE_PAD_TOKEN, _expand_image_pads, build_messages
from mr1jax.data.examples import example_images
from mr1jax.data.rows import DataError
from mr1jax.data.sizing import ImageSizing, pad_pixel_values
from mr1jax.data.vision import num_image_tokens

logger = logging.getLogger(__name__)


def reasoning_trace(example: dict[str, Any]) -> str:
    """A minimal response for rows that only carry a short answer: a one-line `<think>`, then the answer.
    Real cold-start data provides its own chain-of-thought responses (pass `response_fn`)."""
    return f"<think>I look at the image.</think><answer>{example['answer']}</answer>"


def annotator_trace(miss_rate: float, min_count: int, seed: int) -> Callable[[dict[str, Any]], str]:
    """`reasoning_trace` as written by a simulated imperfect annotator (cold-start data is model-generated in
    Vision-R1, so it carries systematic errors): for an integer answer >= `min_count` it overlooks one item
    (reports answer - 1) with probability `miss_rate`, decided per example by a hash of (seed, id), so every
    epoch shows the same label. miss_rate 0 gives the exact traces.

    With miss_rate > 0.5 an imitating model learns to undercount scenes of `min_count` or more items; the
    accuracy reward of RL then has something to correct that more supervised steps on the same data do not.
    """
    def trace(example: dict[str, Any]) -> str:
        answer = str(example["answer"]).strip()
        if miss_rate > 0 and answer.isdigit() and int(answer) >= min_count:
            key = f"{seed}:{example.get('id', example.get('question'))}".encode()
            if int.from_bytes(hashlib.sha256(key).digest()[:8], "big") / 2.0 ** 64 < miss_rate:
                answer = str(int(answer) - 1)
        return reasoning_trace({**example, "answer": answer})

    return trace


def _sft_example(tokenizer: Any, e: dict[str, Any], *, sizing: ImageSizing, seq_len: int, response_fn,
                 question_template, eos: int) -> tuple[np.ndarray, np.ndarray, list[int], list[int]]:
    """(pixel values, grid [k, 3], prompt ids, response ids) of one example with k = `sizing.images_per_prompt`
    images (native resolution: 0 up to k, each at its own grid); DataError naming its file and line when it has
    another number of images, an image does not decode or it does not fit `seq_len`."""
    where = (e.get("file", "<in-memory rows>"), e.get("row"))
    images = example_images(e)
    k = sizing.images_per_prompt
    if (len(images) > k) if sizing.native else (len(images) != k):
        raise DataError(*where, "image", f"row has {len(images)} image(s); every SFT example must carry "
                        + (f"at most images_per_prompt = {k}" if sizing.native else
                           f"images_per_prompt = {k} (static shapes)"))
    try:
        pixel_values, grid = sizing.preprocess(images)
    except (ValueError, OSError, TypeError) as err:
        raise DataError(*where, "image", str(err).removeprefix("image 0").lstrip(": ")) from err
    question = question_template.replace("{question}", e["question"])
    text = tokenizer.apply_chat_template(build_messages(question, len(images)), tokenize=False,
                                         add_generation_prompt=True)
    text = _expand_image_pads(text, [int(n) for n in num_image_tokens(grid)], IMAGE_PAD_TOKEN)  # in order
    prompt = tokenizer(text, add_special_tokens=False)["input_ids"]
    response = tokenizer(response_fn(e), add_special_tokens=False)["input_ids"] + [eos]
    if len(prompt) + len(response) > seq_len:
        raise DataError(*where, None, f"SFT example {e.get('id', '?')}: prompt + response is "
                        f"{len(prompt) + len(response)} tokens, more than data.prompt_bucket + "
                        f"rollout.max_new_tokens = {seq_len}")
    return pixel_values, grid, prompt, response


def sft_batch(tokenizer: Any, examples: Sequence[dict[str, Any]], *, image_size: int = 0, seq_len: int,
              response_fn: Callable[[dict[str, Any]], str] = reasoning_trace,
              question_template: str = "{question}", skip_bad_rows: bool = False,
              spare: Iterable[dict[str, Any]] = (), images_per_prompt: int = 1, sizing: ImageSizing | None = None,
              patches_per_example: int | None = None) -> dict[str, np.ndarray]:
    """One batch; every example carries `images_per_prompt` = k images (``images``, or the one ``image``).

    sizing: how images are sized (default: `image_size` x `image_size`, k per example). Native resolution
    (``sizing.native``): each image at its own grid, 0 up to k per example, every example's patches padded to
    `patches_per_example` (None: the smallest patch bucket holding this batch's largest example).

    Returns:
      input_ids, attention_mask, loss_mask: [B, seq_len] int32 (loss_mask = 1 on response tokens and the
      closing <|im_end|>); pixel_values [B * k * P, 1176] float32; image_grid_thw [B * k, 3]; native resolution:
      pixel_values [B * P, 1176] (the per-example padded layout) and patches_per_example = P.
    Raises DataError naming the example's file and line when its image does not decode or its prompt +
    response does not fit `seq_len`; with `skip_bad_rows` such an example is logged and replaced by the next
    good one of `spare` (DataError when `spare` runs out), so the batch keeps its size.
    """
    sizing = sizing or ImageSizing(image_size, images_per_prompt=images_per_prompt)
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    spare = iter(spare)
    rows, pixels, grids = [], [], []
    for e in examples:
        while True:
            try:
                pv, g, prompt, response = _sft_example(tokenizer, e, sizing=sizing, seq_len=seq_len,
                                                       response_fn=response_fn, question_template=question_template,
                                                       eos=eos)
                break
            except DataError as err:
                if not skip_bad_rows:
                    raise
                logger.warning("skipping bad row: %s", err)
                e = next(spare, None)
                if e is None:
                    raise DataError(err.file, err.row, err.field, f"{err.reason} (skip_bad_rows: no good row left "
                                    "to replace it in this batch)") from err
        rows.append((prompt, response))
        pixels.append(pv)
        grids.append(g)
    pixel_values, grid = np.concatenate(pixels), np.concatenate(grids)
    extra = {}
    if sizing.native:
        per = patches_per_example or sizing.patch_buckets()(max(len(p) for p in pixels))
        pixel_values = pad_pixel_values(pixel_values, grid, [len(g) for g in grids], per)
        extra["patches_per_example"] = per
    b = len(rows)
    input_ids = np.full((b, seq_len), tokenizer.pad_token_id, np.int32)
    attention_mask = np.zeros((b, seq_len), np.int32)
    loss_mask = np.zeros((b, seq_len), np.int32)
    for i, (prompt, response) in enumerate(rows):
        seq = prompt + response
        input_ids[i, seq_len - len(seq):] = seq
        attention_mask[i, seq_len - len(seq):] = 1
        loss_mask[i, seq_len - len(response):] = 1
    return dict(input_ids=input_ids, attention_mask=attention_mask, loss_mask=loss_mask,
                pixel_values=pixel_values, image_grid_thw=grid, **extra)


def sft_examples_for_step(rows: Sequence[dict[str, Any]], step: int, batch_size: int, seed: int,
                          shard_index: int = 0, shard_count: int = 1) -> list[dict]:
    """The examples of batch `step`: consecutive slices of a per-epoch seeded permutation (drop remainder).

    With `shard_count` > 1 (several processes) `batch_size` is this process's share: the global batch of
    ``batch_size * shard_count`` examples is the one a single process would take, and this process gets its
    ``shard_index``-th slice (the same split as `mr1jax.data.pipeline.make_rl_dataset`)."""
    if not 0 <= shard_index < shard_count:
        raise ValueError(f"shard_index must be in [0, shard_count = {shard_count}), got {shard_index}")
    global_batch = batch_size * shard_count
    per_epoch = len(rows) // global_batch
    if per_epoch == 0:
        raise ValueError(f"{len(rows)} SFT rows do not fill one batch of {global_batch}")
    epoch, k = divmod(step, per_epoch)
    order = np.random.default_rng([seed, epoch]).permutation(len(rows))
    start = k * global_batch + shard_index * batch_size
    return [rows[int(i)] for i in order[start:start + batch_size]]


def sft_update_batch(model_config: Any, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The arrays `mr1jax.rl.update.sft_update` takes, from an `sft_batch`: its tokens and masks, pixel values,
    and the host-side M-RoPE position ids [3, B, S] and vision patch positions (`prepare_inputs`)."""
    from mr1jax.models.qwen2_vl.model import prepare_inputs

    per = batch.get("patches_per_example")
    extra = prepare_inputs(model_config, batch["input_ids"], batch["attention_mask"], batch["image_grid_thw"],
                           patches_per_row=per)
    out = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], loss_mask=batch["loss_mask"],
               position_ids=extra.position_ids.astype(np.int32), pixel_values=batch["pixel_values"],
               patch_pos=extra.patch_pos.astype(np.int32))
    if per is not None:                                  # native resolution: per-example patch segments
        out["patch_segments"] = extra.patch_segments.astype(np.int32)
    return out
