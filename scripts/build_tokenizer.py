#!/usr/bin/env python
"""Build the small byte-level BPE tokenizer shipped in ``mr1jax/assets/tokenizer/``.

The packaged tokenizer is a stand-in for Qwen2-VL's 151k-token tokenizer, for
tests and tiny debug models that must run without network access. It:

* is a byte-level BPE (any UTF-8 text round-trips exactly) using Qwen2's
  pre-tokenization regex (digits split one by one), trained here on a
  deterministic generated English / maths / counting-question corpus;
* has ``REGULAR_VOCAB_SIZE`` regular tokens (ids ``0 .. REGULAR_VOCAB_SIZE-1``),
  followed -- like Qwen2-VL, whose specials start at 151643 right after the
  BPE vocabulary -- by Qwen2-VL's special tokens with the same strings and in
  the same relative order (``<|endoftext|>`` first = pad, ``<|im_end|>`` = eos),
  then the ordinary (non-special) added tokens ``<think>``, ``</think>``,
  ``<answer>``, ``</answer>``, which therefore survive
  ``decode(..., skip_special_tokens=True)``;
* carries a chat template that renders exactly like Qwen2-VL-Instruct's (see
  ``CHAT_TEMPLATE``).

The output is deterministic: building twice gives byte-identical files.

Usage::

    python scripts/build_tokenizer.py [--out mr1jax/assets/tokenizer]
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO_ROOT / "mr1jax" / "assets" / "tokenizer"

# Trainer target, including the 256-symbol byte alphabet. The corpus is rich
# enough that training reaches it exactly (asserted in ``build_tokenizer``).
REGULAR_VOCAB_SIZE = 1536

# Qwen2-VL's special tokens, same strings, same relative order as in
# Qwen/Qwen2-VL-*-Instruct (ids 151643..151656 there).
SPECIAL_TOKENS: tuple[str, ...] = (
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
)
# Reasoning-format tags: single tokens, but NOT special (kept by skip_special_tokens).
TAG_TOKENS: tuple[str, ...] = ("<think>", "</think>", "<answer>", "</answer>")

PAD_TOKEN = "<|endoftext|>"
EOS_TOKEN = "<|im_end|>"

# Qwen2's pre-tokenizer split pattern (single digits, contractions, words with
# one leading non-letter, punctuation runs, newline runs, whitespace).
QWEN2_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# Chat template, written for this project to render exactly like
# Qwen2-VL-Instruct's template:
#   * every message is ``<|im_start|>{role}\n{content}<|im_end|>\n``;
#   * if the FIRST message is not a system message, the default system turn
#     ``<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n`` is
#     prepended (a caller-supplied system message suppresses it);
#   * content is a string, or a list of items: ``{"type": "image"}`` (or any
#     item with an ``image`` / ``image_url`` key) renders as
#     ``<|vision_start|><|image_pad|><|vision_end|>``, ``{"type": "video"}`` as
#     ``<|vision_start|><|video_pad|><|vision_end|>``, and text items as their
#     text, concatenated with no separator;
#   * ``add_vision_id=True`` prefixes each image with ``Picture {n}: `` and each
#     video with ``Video {n}: `` (n counts across the whole conversation);
#   * ``add_generation_prompt=True`` appends ``<|im_start|>assistant\n``.
# Whitespace outside ``{{ }}`` is stripped by the ``{%- -%}`` markers, so the
# layout below is for readability only.
CHAT_TEMPLATE = """\
{%- set image_count = namespace(value=0) -%}
{%- set video_count = namespace(value=0) -%}
{%- for message in messages -%}
    {%- if loop.first and message['role'] != 'system' -%}
        {{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' -}}
    {%- endif -%}
    {{- '<|im_start|>' + message['role'] + '\\n' -}}
    {%- if message['content'] is string -%}
        {{- message['content'] -}}
    {%- else -%}
        {%- for item in message['content'] -%}
            {%- if item['type'] == 'image' or 'image' in item or 'image_url' in item -%}
                {%- set image_count.value = image_count.value + 1 -%}
                {%- if add_vision_id -%}
                    {{- 'Picture ' + image_count.value|string + ': ' -}}
                {%- endif -%}
                {{- '<|vision_start|><|image_pad|><|vision_end|>' -}}
            {%- elif item['type'] == 'video' or 'video' in item -%}
                {%- set video_count.value = video_count.value + 1 -%}
                {%- if add_vision_id -%}
                    {{- 'Video ' + video_count.value|string + ': ' -}}
                {%- endif -%}
                {{- '<|vision_start|><|video_pad|><|vision_end|>' -}}
            {%- elif 'text' in item -%}
                {{- item['text'] -}}
            {%- endif -%}
        {%- endfor -%}
    {%- endif -%}
    {{- '<|im_end|>\\n' -}}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{- '<|im_start|>assistant\\n' -}}
{%- endif -%}
"""


# --------------------------------------------------------------------------- #
# Corpus                                                                      #
# --------------------------------------------------------------------------- #

COLORS = ["red", "blue", "green", "yellow", "purple", "cyan", "brown", "gray", "black", "white", "orange", "pink"]
SHAPES = ["cube", "sphere", "cylinder", "cone", "pyramid", "block", "ball", "square", "circle", "triangle",
          "rectangle", "hexagon", "pentagon", "polygon", "torus", "prism"]
SIZES = ["small", "large", "big", "tiny", "huge", "medium"]
MATERIALS = ["metal", "rubber", "shiny", "matte", "metallic", "plastic", "wooden", "glass"]
RELATIONS = ["left of", "right of", "behind", "in front of", "above", "below", "next to", "on top of",
             "under", "near", "beside", "between"]
NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
                "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen",
                "nineteen", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety",
                "hundred", "thousand", "million", "half", "quarter", "third", "double", "triple"]
MATH_WORDS = ["add", "subtract", "multiply", "divide", "sum", "difference", "product", "quotient", "total",
              "equation", "solve", "value", "variable", "angle", "degrees", "radius", "diameter", "area",
              "perimeter", "volume", "length", "width", "height", "side", "sides", "triangle", "parallel",
              "perpendicular", "equal", "equals", "greater", "less", "than", "ratio", "percent", "fraction",
              "integer", "number", "numbers", "remainder", "average", "mean", "median", "probability",
              "function", "graph", "slope", "intercept", "point", "points", "line", "lines", "segment",
              "chord", "tangent", "arc", "circumference", "square", "root", "power", "exponent", "factor",
              "prime", "even", "odd", "minimum", "maximum", "calculate", "compute", "formula", "theorem",
              "therefore", "because", "since", "hence", "result", "step", "steps", "first", "second",
              "third", "next", "finally", "answer", "think", "reasoning", "question", "image", "figure",
              "diagram", "shown", "given", "find", "measure", "units", "centimeters", "meters", "inches"]
COMMON_WORDS = ["the", "a", "an", "is", "are", "was", "were", "be", "been", "there", "here", "this", "that",
                "these", "those", "what", "which", "who", "how", "many", "much", "why", "where", "when",
                "and", "or", "not", "no", "yes", "of", "in", "on", "at", "to", "from", "with", "without",
                "for", "by", "as", "if", "then", "else", "so", "all", "any", "each", "every", "some", "other",
                "same", "different", "more", "most", "fewer", "objects", "object", "things", "thing", "items",
                "color", "colour", "shape", "size", "material", "made", "have", "has", "had", "do", "does",
                "did", "can", "could", "should", "would", "will", "must", "let", "us", "we", "you", "I", "it",
                "they", "them", "their", "its", "our", "look", "see", "count", "counting", "remove",
                "removed", "added", "left", "right", "after", "before", "both", "either", "neither", "only",
                "also", "other", "another", "about", "approximately", "exactly", "correct", "incorrect",
                "option", "options", "choice", "choose", "select", "following", "best", "describe", "describes",
                "please", "provide", "final", "inside", "output", "format", "tags", "process", "scene",
                "picture", "photo", "visible", "hidden", "total", "remaining", "left", "balls", "cubes",
                "spheres", "cylinders", "people", "person", "man", "woman", "dog", "cat", "car", "cars",
                "tree", "trees", "house", "table", "chair", "book", "apple", "apples", "bird", "birds",
                "water", "sky", "road", "time", "day", "year", "years", "old", "new", "good", "great",
                "helpful", "assistant", "user", "system", "problem", "problems", "example", "check",
                "verify", "wait", "hmm", "okay", "now", "again", "carefully", "note", "notice", "observe",
                "consider", "assume", "suppose", "known", "unknown", "information", "data", "model",
                "language", "vision", "reason", "logic", "true", "false", "correctly", "simple", "complex"]
PUNCT = [".", ",", "?", "!", ":", ";", "(", ")", "[", "]", "{", "}", "'", '"', "-", "+", "*", "/", "=",
         "<", ">", "%", "$", "#", "@", "&", "^", "_", "~", "`", "|", "\\"]
UNICODE_SNIPPETS = ["°", "π", "√", "×", "÷", "≤", "≥", "≠", "±", "∠", "△", "²", "³", "½", "é", "ü", "ñ",
                    "café", "naïve", "θ", "α", "β", "λ", "∞", "→", "—", "“", "”", "’"]


def _number(rng: random.Random) -> str:
    kind = rng.randrange(6)
    if kind == 0:
        return str(rng.randrange(10))
    if kind == 1:
        return str(rng.randrange(100))
    if kind == 2:
        return str(rng.randrange(10_000))
    if kind == 3:
        return f"{rng.randrange(100)}.{rng.randrange(100):02d}"
    if kind == 4:
        return f"{rng.randrange(1, 20)}/{rng.randrange(2, 20)}"
    return str(-rng.randrange(1, 100))


def _object(rng: random.Random) -> str:
    parts = []
    if rng.random() < 0.5:
        parts.append(rng.choice(SIZES))
    if rng.random() < 0.7:
        parts.append(rng.choice(COLORS))
    if rng.random() < 0.4:
        parts.append(rng.choice(MATERIALS))
    shape = rng.choice(SHAPES)
    parts.append(shape + ("s" if rng.random() < 0.3 else ""))
    return " ".join(parts)


def _question(rng: random.Random) -> str:
    t = rng.randrange(9)
    if t == 0:
        return f"How many {rng.choice(COLORS)} objects are there?"
    if t == 1:
        return f"How many {_object(rng)}s are there?"
    if t == 2:
        return f"What color is the {_object(rng)} {rng.choice(RELATIONS)} the {_object(rng)}?"
    if t == 3:
        return (f"Subtract all {_object(rng)}s. Subtract all {rng.choice(COLORS)} objects. "
                f"How many objects are left?")
    if t == 4:
        return f"Is the {_object(rng)} {rng.choice(RELATIONS)} the {_object(rng)}? Answer yes or no."
    if t == 5:
        a, b = rng.randrange(1, 100), rng.randrange(1, 100)
        op = rng.choice(["+", "-", "*", "/"])
        return f"What is {a} {op} {b}?"
    if t == 6:
        return (f"In the figure, angle ABC = {rng.randrange(10, 170)}° and AB = {rng.randrange(1, 30)} cm. "
                f"Find the length of BC.")
    if t == 7:
        x = rng.randrange(1, 20)
        return f"Solve for x: {rng.randrange(2, 9)}x + {x} = {rng.randrange(20, 200)}."
    return (f"Which of the following describes the {_object(rng)}?\n"
            f"(A) {rng.choice(COLORS)}\n(B) {rng.choice(COLORS)}\n(C) {rng.choice(COLORS)}\n(D) {rng.choice(COLORS)}")


def _reasoning(rng: random.Random) -> str:
    n = rng.randrange(0, 12)
    steps = [
        f"First, I count the {rng.choice(COLORS)} objects: there are {n} of them.",
        f"Next, I look at the {_object(rng)} {rng.choice(RELATIONS)} the {_object(rng)}.",
        f"Therefore the total is {n} + {rng.randrange(10)} = {n + rng.randrange(10)}.",
        f"Let x be the unknown value. Then {rng.randrange(2, 9)}x = {rng.randrange(10, 90)}, so x = {_number(rng)}.",
        f"The area is {rng.randrange(1, 20)} × {rng.randrange(1, 20)} = {rng.randrange(1, 400)} square units.",
        "Wait, let me check that again carefully.",
        "Hmm, so the answer should be correct.",
    ]
    rng.shuffle(steps)
    body = "\n".join(steps[: rng.randrange(2, len(steps) + 1)])
    answer = rng.choice([str(n), rng.choice(COLORS), rng.choice(["yes", "no"]), rng.choice("ABCD"), _number(rng)])
    return f"<think>\n{body}\n</think>\n<answer>{answer}</answer>"


def _word_salad(rng: random.Random) -> str:
    pools = [COMMON_WORDS, MATH_WORDS, COLORS, SHAPES, SIZES, MATERIALS, NUMBER_WORDS]
    words = []
    for _ in range(rng.randrange(5, 20)):
        r = rng.random()
        if r < 0.08:
            words.append(_number(rng))
        elif r < 0.14:
            words.append(rng.choice(PUNCT))
        elif r < 0.16:
            words.append(rng.choice(UNICODE_SNIPPETS))
        else:
            w = rng.choice(rng.choice(pools))
            if rng.random() < 0.15:
                w = w.capitalize()
            words.append(w)
    sep = rng.choice([" ", " ", " ", "\n", ", "])
    return sep.join(words) + rng.choice([".", "?", "!", "\n", "\n\n", ""])


def generate_corpus(num_lines: int = 6000, seed: int = 0) -> list[str]:
    """Deterministic training corpus: counting / maths questions, reasoning traces, word salad.

    Every vocabulary word also appears verbatim (bare, space-prefixed, capitalised)
    so common words become single tokens.
    """
    rng = random.Random(seed)
    lines: list[str] = []
    vocab = sorted(set(COMMON_WORDS + MATH_WORDS + COLORS + SHAPES + SIZES + MATERIALS + NUMBER_WORDS))
    for w in vocab:
        lines.extend([w, f" {w}", w.capitalize(), f"{w}s"])
    lines.append("".join(PUNCT) + " 0123456789 \n\t\r\n" + " ".join(UNICODE_SNIPPETS))
    lines.append("You are a helpful assistant.")
    # Chat-template role headers follow a special token, i.e. start a fresh pre-token.
    for role in ("system", "user", "assistant"):
        lines.extend([f"{role}\n"] * 50)
    for _ in range(num_lines):
        r = rng.random()
        if r < 0.35:
            lines.append(_question(rng))
        elif r < 0.6:
            lines.append(_reasoning(rng))
        elif r < 0.75:
            lines.append(_question(rng) + "\n" + _reasoning(rng))
        else:
            lines.append(_word_salad(rng))
    return lines


# --------------------------------------------------------------------------- #
# Build                                                                       #
# --------------------------------------------------------------------------- #


def build_backend_tokenizer(vocab_size: int = REGULAR_VOCAB_SIZE) -> Tokenizer:
    """Train the ``tokenizers.Tokenizer`` (BPE + specials + tags). Deterministic."""
    tok = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.normalizer = None  # no NFC: keeps encode->decode an exact identity on any string
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_SPLIT_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        show_progress=False,
        special_tokens=[],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(generate_corpus(), trainer=trainer)
    regular = tok.get_vocab_size(with_added_tokens=True)
    if regular != vocab_size:
        raise RuntimeError(f"BPE training reached {regular} tokens, expected {vocab_size}; enlarge the corpus")

    tok.add_special_tokens(
        [AddedToken(t, special=True, normalized=False, lstrip=False, rstrip=False, single_word=False)
         for t in SPECIAL_TOKENS]
    )
    tok.add_tokens(
        [AddedToken(t, special=False, normalized=False, lstrip=False, rstrip=False, single_word=False)
         for t in TAG_TOKENS]
    )
    return tok


def build_tokenizer(out_dir: str | Path = DEFAULT_OUT) -> Path:
    """Build the tokenizer and save it as a ``transformers`` tokenizer directory.

    Writes ``tokenizer.json`` and ``tokenizer_config.json`` (with the chat
    template inline) to ``out_dir``; returns ``out_dir`` as a ``Path``.
    """
    from transformers import PreTrainedTokenizerFast

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    hf = PreTrainedTokenizerFast(
        tokenizer_object=build_backend_tokenizer(),
        pad_token=PAD_TOKEN,
        eos_token=EOS_TOKEN,
        bos_token=None,
        unk_token=None,
        extra_special_tokens=[t for t in SPECIAL_TOKENS if t not in (PAD_TOKEN, EOS_TOKEN)],
        padding_side="left",
        clean_up_tokenization_spaces=False,
        split_special_tokens=False,
        model_max_length=32768,
        chat_template=CHAT_TEMPLATE,
    )
    hf.save_pretrained(str(out), save_jinja_files=False)
    _canonicalise_json(out)
    return out


def _canonicalise_json(out: Path) -> None:
    """Re-dump every JSON file compactly with sorted keys (determinism, small size)."""
    for path in sorted(out.glob("*.json")):
        data = json.loads(path.read_text(encoding="utf-8"))
        if path.name == "tokenizer.json":
            # keys of tokenizer.json must keep their order for readability; vocab is id-ordered
            text = json.dumps(data, ensure_ascii=False, separators=(",", ":"))
        else:
            if path.name == "tokenizer_config.json":
                # transformers 5 writes its internal "TokenizersBackend"; the public alias
                # PreTrainedTokenizerFast loads to the same class and is understood more widely.
                data["tokenizer_class"] = "PreTrainedTokenizerFast"
            text = json.dumps(data, ensure_ascii=False, indent=2, sort_keys=True)
        path.write_text(text + "\n", encoding="utf-8")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(DEFAULT_OUT), help="output directory (default: packaged asset dir)")
    args = parser.parse_args(argv)
    out = build_tokenizer(args.out)
    sizes = {p.name: p.stat().st_size for p in sorted(out.iterdir()) if p.is_file()}
    print(f"wrote {out}: " + ", ".join(f"{k} ({v} B)" for k, v in sizes.items()))


if __name__ == "__main__":
    main()
