"""Tests for the packaged tokenizer (mr1jax/assets/tokenizer) and mr1jax.data.tokenizer."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from mr1jax.data.tokenizer import PACKAGED_TOKENIZER_DIR, load_tokenizer, special_token_ids

REPO_ROOT = Path(__file__).resolve().parents[1]

QWEN2_VL_SPECIALS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
]
TAGS = ["<think>", "</think>", "<answer>", "</answer>"]
REGULAR_VOCAB = 1536


def _load_build_script():
    spec = importlib.util.spec_from_file_location("build_tokenizer", REPO_ROOT / "scripts" / "build_tokenizer.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


ROUND_TRIP = [
    "How many red objects are there?",
    "Subtract all small cubes. How many objects are left?",
    "Solve for x: 3x + 5 = 20.\nx = 5",
    "  leading and trailing spaces  ",
    "tabs\tand\r\nwindows newlines\n\n\nand blank lines\n",
    "café naïve — “quotes” ’ π ≈ 3.14159, √2, 90°, x² ≤ y³",
    "日本語のテキスト 中文 한국어 Ελληνικά русский עברית العربية",
    "emoji 😀🤖👍🏽 and ZWJ 👩‍👩‍👧",
    "decomposed e\u0301 vs composed é",  # no NFC normalisation: both survive
    "<think>\nFirst count the cubes: 2 + 3 = 5.\n</think>\n<answer>5</answer>",
    "symbols !@#$%^&*()_+-=[]{}|;':\",./<>?`~\\",
    "1234567890 -42 3.5e-7 1/3",
    "",
    "x",
    "\x00\x01 control chars \x7f",
]


@pytest.mark.parametrize("text", ROUND_TRIP)
def test_round_trip(tok, text):
    ids = tok.encode(text, add_special_tokens=False)
    assert tok.decode(ids) == text
    assert tok.decode(ids, skip_special_tokens=True) == text


def test_encode_adds_no_bos_eos(tok):
    assert tok.encode("hello", add_special_tokens=True) == tok.encode("hello", add_special_tokens=False)


def test_special_tokens_are_single_distinct_ids(tok):
    ids = []
    for token in QWEN2_VL_SPECIALS:
        encoded = tok.encode(token, add_special_tokens=False)
        assert len(encoded) == 1, (token, encoded)
        assert tok.convert_ids_to_tokens(encoded[0]) == token
        ids.append(encoded[0])
    assert len(set(ids)) == len(ids)
    # Like Qwen2-VL: specials come right after the BPE vocabulary, in Qwen2-VL's order.
    assert ids == list(range(REGULAR_VOCAB, REGULAR_VOCAB + len(QWEN2_VL_SPECIALS)))
    assert set(QWEN2_VL_SPECIALS) <= set(tok.all_special_tokens)


def test_named_special_tokens(tok):
    assert tok.pad_token == "<|endoftext|>"
    assert tok.eos_token == "<|im_end|>"
    assert tok.bos_token is None
    ids = special_token_ids(tok)
    assert ids["pad"] == tok.convert_tokens_to_ids("<|endoftext|>")
    assert ids["eos"] == ids["im_end"] == tok.convert_tokens_to_ids("<|im_end|>")
    for name, token in [
        ("im_start", "<|im_start|>"),
        ("vision_start", "<|vision_start|>"),
        ("vision_end", "<|vision_end|>"),
        ("image_pad", "<|image_pad|>"),
        ("video_pad", "<|video_pad|>"),
    ]:
        assert ids[name] == tok.convert_tokens_to_ids(token)
    assert {"pad", "eos", "image_pad", "vision_start", "vision_end"} <= set(ids)
    distinct = {k: v for k, v in ids.items() if k != "im_end"}
    assert len(set(distinct.values())) == len(distinct)


def test_special_tokens_in_text_are_matched(tok):
    text = "<|im_start|>user\n<|vision_start|><|image_pad|><|image_pad|><|vision_end|>hi<|im_end|>\n"
    ids = tok.encode(text, add_special_tokens=False)
    pieces = tok.convert_ids_to_tokens(ids)
    assert pieces[0] == "<|im_start|>"
    assert pieces.count("<|image_pad|>") == 2
    i = pieces.index("<|vision_start|>")
    assert pieces[i : i + 4] == ["<|vision_start|>", "<|image_pad|>", "<|image_pad|>", "<|vision_end|>"]
    assert tok.decode(ids) == text
    assert tok.decode(ids, skip_special_tokens=True) == "user\nhi\n"


@pytest.mark.parametrize("tag", TAGS)
def test_tags_are_single_non_special_tokens(tok, tag):
    ids = tok.encode(tag, add_special_tokens=False)
    assert len(ids) == 1
    assert ids[0] >= REGULAR_VOCAB + len(QWEN2_VL_SPECIALS)
    assert tag not in tok.all_special_tokens
    assert tok.decode(ids, skip_special_tokens=True) == tag
    # also a single token when glued to surrounding text
    ids = tok.encode(f"so{tag}42", add_special_tokens=False)
    assert tok.convert_ids_to_tokens(ids).count(tag) == 1


def test_skip_special_tokens_keeps_tags(tok):
    text = "<|im_start|>assistant\n<think>2+2</think><answer>4</answer><|im_end|><|endoftext|>"
    ids = tok.encode(text, add_special_tokens=False)
    assert tok.decode(ids, skip_special_tokens=True) == "assistant\n<think>2+2</think><answer>4</answer>"


def test_vocab_size_and_training(tok):
    assert tok.vocab_size == REGULAR_VOCAB
    assert 1000 <= tok.vocab_size <= 2000
    assert len(tok) == REGULAR_VOCAB + len(QWEN2_VL_SPECIALS) + len(TAGS)
    # The corpus made common task words single tokens.
    pieces = tok.tokenize("How many red objects are there?")
    assert pieces == ["How", "Ġmany", "Ġred", "Ġobjects", "Ġare", "Ġthere", "?"]
    # Digits are split one by one (Qwen2 pre-tokenization).
    assert tok.tokenize("2024") == ["2", "0", "2", "4"]


def test_chat_template_is_packaged(tok):
    config = json.loads((PACKAGED_TOKENIZER_DIR / "tokenizer_config.json").read_text())
    assert config["chat_template"] == tok.chat_template
    assert "<|vision_start|><|image_pad|><|vision_end|>" in tok.chat_template


def test_asset_is_small():
    files = [p for p in PACKAGED_TOKENIZER_DIR.iterdir() if p.is_file()]
    names = {p.name for p in files}
    assert {"tokenizer.json", "tokenizer_config.json"} <= names
    assert sum(p.stat().st_size for p in files) < 1_000_000


def test_load_tokenizer_explicit_path(tok):
    other = load_tokenizer(PACKAGED_TOKENIZER_DIR)
    text = "<think>x</think> How many?"
    assert other.encode(text) == tok.encode(text)


def test_load_tokenizer_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a directory"):
        load_tokenizer(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="does not hold a tokenizer"):
        load_tokenizer(tmp_path)


def test_special_token_ids_missing_token():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({"a": 0, "<pad>": 1, "</s>": 2}, unk_token="a"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    plain = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="</s>")
    with pytest.raises(ValueError, match=r"<\|im_start\|>"):
        special_token_ids(plain)


def test_build_is_deterministic_and_matches_asset(tmp_path):
    build = _load_build_script()
    a = build.build_tokenizer(tmp_path / "a")
    b = build.build_tokenizer(tmp_path / "b")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
        # The committed asset is exactly what the script builds.
        assert json.loads((a / name).read_text()) == json.loads((PACKAGED_TOKENIZER_DIR / name).read_text()), name
    assert sorted(p.name for p in a.iterdir()) == sorted(p.name for p in PACKAGED_TOKENIZER_DIR.iterdir())


def test_model_token_ids_build_a_valid_config():
    from mr1jax.data.tokenizer import model_token_ids
    from mr1jax.models.qwen2_vl import Qwen2VLConfig

    tok = load_tokenizer()
    ids = special_token_ids(tok)
    cfg = Qwen2VLConfig.tiny(vocab_size=len(tok), **model_token_ids(tok))
    assert cfg.image_token_id == ids["image_pad"] == tok.convert_tokens_to_ids("<|image_pad|>")
    assert cfg.eos_token_ids == (ids["eos"], ids["pad"]) and cfg.pad_token_id == cfg.bos_token_id == ids["pad"]
    assert (cfg.vision_start_token_id, cfg.vision_end_token_id) == (ids["vision_start"], ids["vision_end"])
