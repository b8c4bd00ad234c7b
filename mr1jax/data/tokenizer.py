"""Tokenizer loading.

``load_tokenizer()`` with no argument returns the small byte-level BPE tokenizer
packaged in ``mr1jax/assets/tokenizer/`` (built by ``scripts/build_tokenizer.py``;
1,536 regular tokens + Qwen2-VL's special tokens + ``<think>``/``<answer>`` tags,
Qwen2-VL-Instruct chat template). Pass a path to load a real Qwen2-VL tokenizer
directory instead; both expose the same special-token strings, so the rest of
the pipeline does not care which one it gets.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

PACKAGED_TOKENIZER_DIR: Path = Path(__file__).resolve().parent.parent / "assets" / "tokenizer"
"""Directory of the tokenizer shipped with the package."""

# Files of which at least one must be present for a directory to hold a tokenizer.
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")

# name -> token string, as in Qwen2-VL.
SPECIAL_TOKEN_STRINGS: dict[str, str] = {
    "im_start": "<|im_start|>",
    "im_end": "<|im_end|>",
    "vision_start": "<|vision_start|>",
    "vision_end": "<|vision_end|>",
    "image_pad": "<|image_pad|>",
    "video_pad": "<|video_pad|>",
}


def load_tokenizer(path: str | os.PathLike[str] | None = None) -> Any:
    """Load a Hugging Face tokenizer with ``transformers.AutoTokenizer.from_pretrained``.

    Args:
      path: a local tokenizer directory (e.g. a downloaded Qwen2-VL checkpoint).
        ``None`` (default) loads the packaged tokenizer ``PACKAGED_TOKENIZER_DIR``.

    Returns:
      The ``transformers`` tokenizer (a ``PreTrainedTokenizerFast`` for the packaged one).

    Raises:
      FileNotFoundError: ``path`` is not a directory, or holds none of
        ``tokenizer.json`` / ``tokenizer_config.json`` / ``vocab.json`` / ``tokenizer.model``.
      ValueError: the loaded tokenizer has no pad token or no eos token.
    """
    from transformers import AutoTokenizer  # deferred: importing transformers is slow

    directory = PACKAGED_TOKENIZER_DIR if path is None else Path(path)
    if not directory.is_dir():
        what = "packaged tokenizer directory" if path is None else "tokenizer path"
        raise FileNotFoundError(
            f"{what} {str(directory)!r} is not a directory"
            + (" (run scripts/build_tokenizer.py to rebuild it)" if path is None else "")
        )
    if not any((directory / name).is_file() for name in _TOKENIZER_FILES):
        raise FileNotFoundError(
            f"{str(directory)!r} does not hold a tokenizer: none of {', '.join(_TOKENIZER_FILES)} found"
        )
    tokenizer = AutoTokenizer.from_pretrained(str(directory))
    if tokenizer.pad_token_id is None or tokenizer.eos_token_id is None:
        raise ValueError(
            f"tokenizer at {str(directory)!r} must define pad and eos tokens "
            f"(pad={tokenizer.pad_token!r}, eos={tokenizer.eos_token!r})"
        )
    return tokenizer


def token_id(tokenizer: Any, token: str) -> int:
    """Id of ``token``, which must be a single token of ``tokenizer``'s vocabulary.

    Raises:
      ValueError: the token is not in the vocabulary (it would map to unk / None).
    """
    idx = tokenizer.convert_tokens_to_ids(token)
    # Unknown tokens map to None (no unk token, e.g. Qwen2) or to the unk id; the
    # round trip through convert_ids_to_tokens catches both.
    if idx is None or tokenizer.convert_ids_to_tokens(int(idx)) != token:
        raise ValueError(f"token {token!r} is not in the tokenizer vocabulary")
    return int(idx)


def special_token_ids(tokenizer: Any) -> dict[str, int]:
    """Ids of the tokens the pipeline relies on.

    Returns:
      ``{"pad", "eos", "im_start", "im_end", "vision_start", "vision_end",
      "image_pad", "video_pad"} -> int``. For Qwen2-VL and the packaged
      tokenizer ``eos == im_end`` and ``pad`` is ``<|endoftext|>``.

    Raises:
      ValueError: pad/eos are undefined, or one of the Qwen2-VL tokens is missing.
    """
    if tokenizer.pad_token_id is None or tokenizer.eos_token_id is None:
        raise ValueError(
            f"tokenizer must define pad and eos tokens (pad={tokenizer.pad_token!r}, eos={tokenizer.eos_token!r})"
        )
    ids = {"pad": int(tokenizer.pad_token_id), "eos": int(tokenizer.eos_token_id)}
    for name, token in SPECIAL_TOKEN_STRINGS.items():
        ids[name] = token_id(tokenizer, token)
    return ids


def model_token_ids(tokenizer: Any) -> dict[str, Any]:
    """The tokenizer's special ids as `Qwen2VLConfig` keyword arguments (pad doubles as bos; generation stops
    on eos and pad), e.g. ``Qwen2VLConfig.tiny(vocab_size=len(tok), **model_token_ids(tok))``."""
    ids = special_token_ids(tokenizer)
    return dict(pad_token_id=ids["pad"], bos_token_id=ids["pad"], eos_token_ids=(ids["eos"], ids["pad"]),
                image_token_id=ids["image_pad"], video_token_id=ids["video_pad"],
                vision_start_token_id=ids["vision_start"], vision_end_token_id=ids["vision_end"])
