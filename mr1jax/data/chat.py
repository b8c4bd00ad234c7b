r"""Chat formatting: conversations -> left-padded, bucketed prompt token ids (host-side numpy).

Pipeline for one prompt row ``r``::

    messages ──apply_chat_template──▶ text with one <|image_pad|> per image
             ──expand image i to image_token_counts[r][i] pads──▶ text
             ──tokenize (no extra special tokens)──▶ ids [n_r]
             ──left-pad to the smallest bucket >= max_r n_r──▶ input_ids [B, L]

With the packaged tokenizer (or Qwen2-VL's), ``build_messages("How many red
objects are there?")`` renders as (``\n`` = newline; note the trailing one)::

    <|im_start|>system\nYou are a helpful assistant.<|im_end|>\n
    <|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>How many red objects are there?<|im_end|>\n
    <|im_start|>assistant\n

Image token counts are computed elsewhere (``t * h * w // 4`` per image from the
image grid, i.e. after the 2x2 spatial merge) and passed in as plain ints.
Videos are not expanded here: a ``<|video_pad|>`` in a prompt stays a single token.
"""

from __future__ import annotations

import dataclasses
import operator
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from mr1jax.data.tokenizer import token_id

IMAGE_PAD_TOKEN = "<|image_pad|>"
VISION_START_TOKEN = "<|vision_start|>"
VISION_END_TOKEN = "<|vision_end|>"

Message = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class PromptBatch:
    """A left-padded batch of prompts.

    Attributes:
      input_ids: ``[B, L] int32`` token ids; row ``r`` holds its ``lengths[r]``
        tokens in the last ``lengths[r]`` columns, preceded by ``pad_token_id``.
        ``L`` is the bucket chosen by ``format_prompts``.
      attention_mask: ``[B, L] int32``, 1 on real tokens, 0 on left padding.
      lengths: ``[B] int32``, number of real tokens per row (``attention_mask.sum(-1)``).
    """

    input_ids: np.ndarray
    attention_mask: np.ndarray
    lengths: np.ndarray

    @property
    def batch_size(self) -> int:
        """``B``."""
        return int(self.input_ids.shape[0])

    @property
    def seq_len(self) -> int:
        """``L``, the bucket length."""
        return int(self.input_ids.shape[1])


def build_messages(question: str, num_images: int = 1, system: str | None = None) -> list[Message]:
    """Build a single-turn conversation in the Hugging Face chat format.

    Args:
      question: the user's text.
      num_images: number of ``{"type": "image"}`` items, placed before the text
        (Qwen2-VL's convention). ``0`` gives a text-only user turn.
      system: optional system prompt. ``None`` adds no system message, so the chat
        template inserts its default ("You are a helpful assistant.").

    Returns:
      ``[{"role": "system", "content": system}]`` (only if ``system`` is given) followed by
      ``{"role": "user", "content": [{"type": "image"}] * num_images + [{"type": "text", "text": question}]}``.

    Raises:
      ValueError: ``num_images`` is negative.
    """
    num_images = operator.index(num_images)
    if num_images < 0:
        raise ValueError(f"num_images must be >= 0, got {num_images}")
    messages: list[Message] = []
    if system is not None:
        messages.append({"role": "system", "content": system})
    content: list[dict[str, Any]] = [{"type": "image"} for _ in range(num_images)]
    content.append({"type": "text", "text": question})
    messages.append({"role": "user", "content": content})
    return messages


def _check_buckets(buckets: Sequence[int]) -> list[int]:
    out = []
    for b in buckets:
        if isinstance(b, bool) or not isinstance(b, (int, np.integer)) or b <= 0:
            raise ValueError(f"buckets must be positive integers, got {list(buckets)}")
        out.append(int(b))
    if not out:
        raise ValueError("buckets must not be empty")
    return sorted(set(out))


def _check_count(row: int, image: int, count: Any) -> int:
    if isinstance(count, bool) or not isinstance(count, (int, np.integer)) or count <= 0:
        raise ValueError(f"row {row}, image {image}: image token count must be a positive integer, got {count!r}")
    return int(count)


def _expand_image_pads(text: str, counts: Sequence[int], image_pad_token: str) -> str:
    """Replace the i-th ``image_pad_token`` in ``text`` by ``counts[i]`` copies of it."""
    pieces = text.split(image_pad_token)
    assert len(pieces) == len(counts) + 1
    out = [pieces[0]]
    for count, piece in zip(counts, pieces[1:]):
        out.append(image_pad_token * count)
        out.append(piece)
    return "".join(out)


def format_prompts(
    tokenizer: Any,
    conversations: Sequence[Sequence[Message]],
    image_token_counts: Sequence[Sequence[int]],
    *,
    buckets: Sequence[int],
    image_pad_token: str = IMAGE_PAD_TOKEN,
    truncate: bool = False,
    chat_template_kwargs: Mapping[str, Any] | None = None,
) -> PromptBatch:
    """Render, expand, tokenize and left-pad a batch of prompts for generation.

    Args:
      tokenizer: a ``transformers`` tokenizer with a chat template and a pad token
        (``mr1jax.data.tokenizer.load_tokenizer()``).
      conversations: ``B`` conversations (lists of ``{"role", "content"}`` messages,
        e.g. from ``build_messages``). Each is rendered with
        ``apply_chat_template(..., tokenize=False, add_generation_prompt=True)``.
      image_token_counts: ``B`` lists; ``image_token_counts[r][i]`` is the number of
        vision tokens of the i-th image of row ``r`` (``t*h*w // 4`` of its grid).
        The i-th ``image_pad_token`` of row ``r``'s rendered text is expanded to that
        many copies. Use ``[]`` for text-only rows.
      buckets: allowed padded lengths ``L``; the smallest one that fits the longest
        row is used.
      image_pad_token: the placeholder string the chat template emits once per image.
      truncate: if the longest row exceeds ``max(buckets)``, cut over-long rows from
        the LEFT to ``max(buckets)`` tokens instead of raising -- allowed only when
        the removed tokens contain no image tokens (image pad / vision start / end),
        since a partial image block would desynchronise text and vision features.
      chat_template_kwargs: extra variables for the chat template (e.g.
        ``{"add_vision_id": True}``).

    Returns:
      ``PromptBatch`` with ``input_ids [B, L] int32`` (left-padded with
      ``tokenizer.pad_token_id``), ``attention_mask [B, L] int32`` and ``lengths [B] int32``.

    Raises:
      ValueError: empty batch; ``len(image_token_counts) != B``; bad buckets; no pad
        token; ``image_pad_token`` not a single token; a row whose number of
        placeholders differs from its number of counts (message names the row and
        both numbers); a non-positive count; a row longer than ``max(buckets)``
        (names the row, its length and the largest bucket) when ``truncate`` is
        False, or when truncating it would remove image tokens.
    """
    num_rows = len(conversations)
    if num_rows == 0:
        raise ValueError("conversations is empty: need at least one prompt")
    if len(image_token_counts) != num_rows:
        raise ValueError(
            f"got {num_rows} conversations but {len(image_token_counts)} image_token_counts lists; "
            "pass one (possibly empty) list per conversation"
        )
    sorted_buckets = _check_buckets(buckets)
    pad_id = tokenizer.pad_token_id
    if pad_id is None:
        raise ValueError("tokenizer has no pad token (tokenizer.pad_token_id is None)")
    image_pad_id = token_id(tokenizer, image_pad_token)
    template_kwargs = dict(chat_template_kwargs or {})

    texts: list[str] = []
    expected_pads: list[int] = []
    for r, (conversation, counts) in enumerate(zip(conversations, image_token_counts)):
        text = tokenizer.apply_chat_template(
            list(conversation), tokenize=False, add_generation_prompt=True, **template_kwargs
        )
        if not isinstance(text, str):
            raise TypeError(f"row {r}: apply_chat_template returned {type(text).__name__}, expected str")
        counts = [_check_count(r, i, c) for i, c in enumerate(counts)]
        num_placeholders = text.count(image_pad_token)
        if num_placeholders != len(counts):
            raise ValueError(
                f"row {r}: rendered prompt has {num_placeholders} image placeholder(s) {image_pad_token!r} "
                f"but {len(counts)} image token count(s) were given"
            )
        texts.append(_expand_image_pads(text, counts, image_pad_token))
        expected_pads.append(sum(counts))

    encoded = tokenizer(texts, add_special_tokens=False)["input_ids"]
    rows = [np.asarray(ids, dtype=np.int32) for ids in encoded]
    for r, (ids, expected) in enumerate(zip(rows, expected_pads)):
        got = int(np.count_nonzero(ids == image_pad_id))
        if got != expected:
            raise ValueError(
                f"row {r}: expected {expected} {image_pad_token!r} tokens after tokenization, got {got} "
                f"(is {image_pad_token!r} an added token of this tokenizer?)"
            )

    lengths = np.array([len(ids) for ids in rows], dtype=np.int32)
    longest = int(lengths.max())
    max_bucket = sorted_buckets[-1]
    if longest > max_bucket:
        worst = int(lengths.argmax())
        too_long = [r for r in range(num_rows) if lengths[r] > max_bucket]
        if not truncate:
            raise ValueError(
                f"row {worst} has {longest} tokens, more than the largest bucket {max_bucket} "
                f"({len(too_long)} row(s) too long: {too_long}); add a larger bucket or pass truncate=True"
            )
        guarded = {image_pad_id}
        for tok in (VISION_START_TOKEN, VISION_END_TOKEN):
            try:
                guarded.add(token_id(tokenizer, tok))
            except ValueError:
                pass  # tokenizer without that token: nothing to protect
        guarded_ids = np.array(sorted(guarded), dtype=np.int32)
        for r in too_long:
            cut = int(lengths[r]) - max_bucket
            num_image_removed = int(np.isin(rows[r][:cut], guarded_ids).sum())
            if num_image_removed:
                raise ValueError(
                    f"row {r} has {int(lengths[r])} tokens, more than the largest bucket {max_bucket}, and "
                    f"truncating its first {cut} tokens would remove {num_image_removed} image token(s)"
                )
            rows[r] = rows[r][cut:]
            lengths[r] = max_bucket
        seq_len = max_bucket
    else:
        seq_len = next(b for b in sorted_buckets if b >= longest)

    input_ids = np.full((num_rows, seq_len), pad_id, dtype=np.int32)
    attention_mask = np.zeros((num_rows, seq_len), dtype=np.int32)
    for r, ids in enumerate(rows):
        n = len(ids)
        if n:
            input_ids[r, seq_len - n :] = ids
            attention_mask[r, seq_len - n :] = 1
    return PromptBatch(input_ids=input_ids, attention_mask=attention_mask, lengths=lengths)
