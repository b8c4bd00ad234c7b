"""Tests for mr1jax.data.chat (chat template rendering, image-pad expansion, bucketed left padding)."""

from __future__ import annotations

import numpy as np
import pytest

from mr1jax.data.chat import PromptBatch, build_messages, format_prompts
from mr1jax.data.tokenizer import load_tokenizer, special_token_ids

QUESTION = "How many red objects are there?"
DEFAULT_SYSTEM = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


@pytest.fixture(scope="module")
def ids(tok):
    return special_token_ids(tok)


def render(tok, messages, **kwargs):
    kwargs.setdefault("add_generation_prompt", True)
    return tok.apply_chat_template(messages, tokenize=False, **kwargs)


def encode(tok, text):
    return tok.encode(text, add_special_tokens=False)


def runs_of(row, token_id):
    """(start, length) of each maximal run of ``token_id`` in ``row``."""
    runs, start = [], None
    for i, t in enumerate(list(row) + [None]):
        if t == token_id and start is None:
            start = i
        elif t != token_id and start is not None:
            runs.append((start, i - start))
            start = None
    return runs


# --------------------------------------------------------------------------- #
# build_messages / chat template                                              #
# --------------------------------------------------------------------------- #


def test_build_messages_structure():
    assert build_messages(QUESTION) == [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}
    ]
    msgs = build_messages("q", num_images=2, system="Be brief.")
    assert msgs == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "q"}]},
    ]
    assert build_messages("q", num_images=0) == [{"role": "user", "content": [{"type": "text", "text": "q"}]}]
    with pytest.raises(ValueError, match="-1"):
        build_messages("q", num_images=-1)


def test_template_one_image_exact(tok):
    assert render(tok, build_messages(QUESTION)) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>How many red objects are there?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_template_without_generation_prompt(tok):
    text = render(tok, build_messages(QUESTION), add_generation_prompt=False)
    assert text == DEFAULT_SYSTEM + f"<|im_start|>user\n{IMAGE}{QUESTION}<|im_end|>\n"


def test_template_custom_system_replaces_default(tok):
    text = render(tok, build_messages("Count.", num_images=2, system="Think step by step."))
    assert text == (
        "<|im_start|>system\nThink step by step.<|im_end|>\n"
        f"<|im_start|>user\n{IMAGE}{IMAGE}Count.<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert "helpful assistant" not in text


def test_template_text_only_and_string_content(tok):
    assert render(tok, build_messages("What is 2 + 3?", num_images=0)) == (
        DEFAULT_SYSTEM + "<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n<|im_start|>assistant\n"
    )
    assert render(tok, [{"role": "user", "content": "plain string"}]) == (
        DEFAULT_SYSTEM + "<|im_start|>user\nplain string<|im_end|>\n<|im_start|>assistant\n"
    )


def test_template_multi_turn_and_interleaved(tok):
    messages = [
        {"role": "system", "content": [{"type": "text", "text": "Sys."}]},
        {"role": "user", "content": [{"type": "text", "text": "Look: "}, {"type": "image"}, {"type": "text", "text": " and "}, {"type": "image", "image": "x.png"}]},
        {"role": "assistant", "content": "<think>hmm</think><answer>2</answer>"},
        {"role": "user", "content": "Sure?"},
    ]
    assert render(tok, messages) == (
        "<|im_start|>system\nSys.<|im_end|>\n"
        f"<|im_start|>user\nLook: {IMAGE} and {IMAGE}<|im_end|>\n"
        "<|im_start|>assistant\n<think>hmm</think><answer>2</answer><|im_end|>\n"
        "<|im_start|>user\nSure?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_template_default_system_only_when_first_is_not_system(tok):
    # Qwen2-VL's template checks only the first message.
    messages = [{"role": "user", "content": "a"}, {"role": "system", "content": "late"}]
    assert render(tok, messages, add_generation_prompt=False) == (
        DEFAULT_SYSTEM + "<|im_start|>user\na<|im_end|>\n<|im_start|>system\nlate<|im_end|>\n"
    )


def test_template_add_vision_id(tok):
    text = render(tok, build_messages("q", num_images=2), add_vision_id=True)
    assert f"<|im_start|>user\nPicture 1: {IMAGE}Picture 2: {IMAGE}q<|im_end|>\n" in text


# --------------------------------------------------------------------------- #
# format_prompts                                                              #
# --------------------------------------------------------------------------- #


def test_single_image_expansion_exact(tok, ids):
    batch = format_prompts(tok, [build_messages(QUESTION)], [[7]], buckets=[128])
    assert isinstance(batch, PromptBatch)
    prefix = DEFAULT_SYSTEM + "<|im_start|>user\n<|vision_start|>"
    suffix = f"<|vision_end|>{QUESTION}<|im_end|>\n<|im_start|>assistant\n"
    expected = encode(tok, prefix) + [ids["image_pad"]] * 7 + encode(tok, suffix)
    n = len(expected)
    assert batch.lengths.tolist() == [n]
    assert batch.input_ids.shape == (1, 128)
    assert batch.input_ids[0, -n:].tolist() == expected
    row = batch.input_ids[0]
    [(start, length)] = runs_of(row, ids["image_pad"])
    assert length == 7
    assert row[start - 1] == ids["vision_start"] and row[start + length] == ids["vision_end"]
    assert tok.decode(row[-n:]) == render(tok, build_messages(QUESTION)).replace("<|image_pad|>", "<|image_pad|>" * 7)


def test_multi_image_and_text_only_rows(tok, ids):
    convs = [
        build_messages("two images", num_images=2),
        build_messages("no image", num_images=0),
        build_messages("three", num_images=3),
    ]
    counts = [[4, 9], [], [1, 16, 2]]
    batch = format_prompts(tok, convs, counts, buckets=[256])
    assert batch.input_ids.shape == (3, 256)
    for r, row_counts in enumerate(counts):
        row = batch.input_ids[r]
        runs = runs_of(row, ids["image_pad"])
        assert [length for _, length in runs] == row_counts  # right count, right order
        for start, length in runs:
            assert row[start - 1] == ids["vision_start"]
            assert row[start + length] == ids["vision_end"]
        assert np.count_nonzero(row == ids["vision_start"]) == len(row_counts)
    # text-only row is exactly the rendered text
    n = batch.lengths[1]
    assert batch.input_ids[1, -n:].tolist() == encode(tok, render(tok, convs[1]))


def test_left_padding_and_mask(tok, ids):
    convs = [build_messages("short", num_images=0), build_messages("a much longer question " * 5, num_images=1)]
    batch = format_prompts(tok, convs, [[], [10]], buckets=[512])
    assert batch.input_ids.dtype == np.int32
    assert batch.attention_mask.dtype == np.int32
    assert batch.lengths.dtype == np.int32
    assert batch.lengths.shape == (2,)
    assert batch.batch_size == 2 and batch.seq_len == 512
    assert batch.lengths[0] < batch.lengths[1]
    np.testing.assert_array_equal(batch.attention_mask.sum(-1), batch.lengths)
    for r in range(2):
        n = int(batch.lengths[r])
        # padding on the left, real tokens flush right
        assert (batch.attention_mask[r, : 512 - n] == 0).all()
        assert (batch.attention_mask[r, 512 - n :] == 1).all()
        assert (batch.input_ids[r, : 512 - n] == tok.pad_token_id).all()
        assert batch.input_ids[r, 512 - n] == ids["im_start"]
        assert batch.input_ids[r, -1] == encode(tok, "\n")[0]
        # each row equals its stand-alone formatting
        alone = format_prompts(tok, [convs[r]], [[[], [10]][r]], buckets=[n])
        assert alone.input_ids.shape == (1, n)
        assert alone.attention_mask.all()
        np.testing.assert_array_equal(alone.input_ids[0], batch.input_ids[r, 512 - n :])


def test_bucket_choice(tok):
    convs = [build_messages(QUESTION), build_messages("hi", num_images=0)]
    counts = [[20], []]
    n = int(format_prompts(tok, convs, counts, buckets=[4096]).lengths.max())
    assert 40 < n < 100
    # smallest fitting bucket, whatever order the buckets are given in
    assert format_prompts(tok, convs, counts, buckets=[4096, 16, n + 1, 2 * n]).seq_len == n + 1
    # an exact fit is used
    assert format_prompts(tok, convs, counts, buckets=[n - 1, n, n + 1]).seq_len == n
    # the bucket depends on the longest row only
    assert format_prompts(tok, convs, [[21], []], buckets=[n, n + 1]).seq_len == n + 1


def test_error_placeholder_count_mismatch(tok):
    convs = [build_messages("a"), build_messages("b", num_images=3)]
    with pytest.raises(ValueError, match=r"row 1: .* 3 image placeholder.* but 2 image token count"):
        format_prompts(tok, convs, [[5], [5, 5]], buckets=[512])
    with pytest.raises(ValueError, match=r"row 0: .* 1 image placeholder.* but 0 image token count"):
        format_prompts(tok, convs, [[], [5, 5, 5]], buckets=[512])
    # a literal placeholder typed into the text counts as an image
    with pytest.raises(ValueError, match=r"row 0: .* 2 image placeholder.* but 1 image token count"):
        format_prompts(tok, [build_messages("see <|image_pad|>")], [[5]], buckets=[512])


def test_error_bad_counts(tok):
    with pytest.raises(ValueError, match=r"row 0, image 1: .* got 0"):
        format_prompts(tok, [build_messages("a", num_images=2)], [[3, 0]], buckets=[512])
    with pytest.raises(ValueError, match=r"row 0, image 0: .* got -4"):
        format_prompts(tok, [build_messages("a")], [[-4]], buckets=[512])
    with pytest.raises(ValueError, match=r"2 conversations but 1 image_token_counts"):
        format_prompts(tok, [build_messages("a"), build_messages("b")], [[3]], buckets=[512])
    with pytest.raises(ValueError, match="empty"):
        format_prompts(tok, [], [], buckets=[512])


def test_error_bad_buckets_and_pad_token(tok):
    conv = [build_messages("a", num_images=0)]
    with pytest.raises(ValueError, match="empty"):
        format_prompts(tok, conv, [[]], buckets=[])
    with pytest.raises(ValueError, match=r"\[64, 0\]"):
        format_prompts(tok, conv, [[]], buckets=[64, 0])
    with pytest.raises(ValueError, match="<\\|not_a_token\\|>"):
        format_prompts(tok, conv, [[]], buckets=[64], image_pad_token="<|not_a_token|>")


def test_error_too_long(tok):
    convs = [build_messages("short", num_images=0), build_messages("long", num_images=1)]
    n_long = int(format_prompts(tok, convs, [[], [100]], buckets=[4096]).lengths[1])
    with pytest.raises(ValueError, match=rf"row 1 has {n_long} tokens, more than the largest bucket 64\b"):
        format_prompts(tok, convs, [[], [100]], buckets=[32, 64])


def test_truncate_refuses_to_cut_image_tokens(tok):
    convs = [build_messages("long", num_images=1)]
    n = int(format_prompts(tok, convs, [[100]], buckets=[4096]).lengths[0])
    # the image block sits near the start; cutting 20 tokens reaches into it
    with pytest.raises(ValueError, match=rf"row 0 has {n} tokens, more than the largest bucket {n - 20}.*first 20 tokens would remove \d+ image token"):
        format_prompts(tok, convs, [[100]], buckets=[n - 20], truncate=True)


def test_truncate_cuts_text_from_the_left(tok, ids):
    long_text = " ".join(f"word{i}" for i in range(60))
    convs = [
        [{"role": "user", "content": [{"type": "text", "text": long_text}, {"type": "image"}, {"type": "text", "text": "?"}]}],
        build_messages("short", num_images=0),
    ]
    counts = [[6], []]
    full = format_prompts(tok, convs, counts, buckets=[4096])
    n0, n1 = (int(x) for x in full.lengths)
    bucket = n0 - 30
    assert n1 < bucket
    batch = format_prompts(tok, convs, counts, buckets=[16, bucket], truncate=True)
    assert batch.seq_len == bucket
    assert batch.lengths.tolist() == [bucket, n1]
    np.testing.assert_array_equal(batch.input_ids[0], full.input_ids[0, -bucket:])  # kept the last tokens
    assert batch.attention_mask[0].all()
    assert [length for _, length in runs_of(batch.input_ids[0], ids["image_pad"])] == [6]
    np.testing.assert_array_equal(batch.input_ids[1, -n1:], full.input_ids[1, -n1:])
    assert (batch.attention_mask[1, : bucket - n1] == 0).all()
