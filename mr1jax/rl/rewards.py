"""Host-side rewards for GRPO on reasoning completions: answer parsing and the reward definitions.

Completions are expected in the R1 layout ``<think> ... </think> <answer> ... </answer>``.

Rewards (all return a Python ``float``; every one has the ``fn(completion, ground_truth)`` signature that
`RewardRunner` and `score_batch` in `mr1jax.rl.reward_runner` call; the runner imports this module, never
the other way round):

- `format_reward`: 1.0 iff the whole completion (surrounding whitespace allowed) is
  ``<think>.*?</think>\\s*<answer>.*?</answer>`` (dot matches newline) with exactly one of each of the
  four tags and a non-empty answer. This is the OThink-MR1 format reward, tightened against two reward
  hacks seen in peers: an empty ``<answer></answer>`` and repeated/nested blocks.
- `accuracy_reward`: 1.0 iff the content of the single ``<answer>`` block (`extract_answer`) equals the
  ground truth. Text outside the tags never counts; a missing, empty or ambiguous answer never scores.
  Modes: ``"number"`` (relative tolerance 1e-6, ``"3."``, ``"3.0"``, ``"1,000"``, ``"1e3"``, ``"1/2"``;
  no number words, no nan/inf), ``"choice"`` (letters A-E: ``"B"``, ``"(B)"``, ``"B."``, ``"B) text"``,
  ``"Answer: B"``, ``"The answer is (B)."``), ``"math"`` (math_verify ``parse``/``verify``, OR a normalized
  exact string match), ``"exact"`` (case- and whitespace-insensitive string match) and ``"auto"``, which
  picks by the shape of the ground truth: a choice letter -> choice; a plain number -> number when the
  answer is a plain number too, else math (so ``"60°"`` or ``"\\frac{6}{2}"`` can still match); anything
  else -> math.
- `othink_reward` = accuracy + alpha * format (OThink-MR1, alpha = 1).
- `hard_format_result_reward` = 1 iff format AND accuracy (Vision-R1's HFRRF), else 0.
- `REWARD_KINDS` / `combine_rewards`: the trainer's ``config.rl.reward`` names (``othink``, ``hard``,
  ``accuracy``, ``format``) -> how accuracy and format combine; the two rewards above are defined by it,
  so a trainer that scores accuracy in `score_batch`'s workers combines exactly as they do.

Normalisation decisions (documented because they change rewards):

- Full-width ASCII forms (``"３"``, ``"（Ｂ）"``), the ideographic space and the minus sign U+2212 are folded
  to ASCII before any comparison, so ``"３"`` scores against ``3``. No other Unicode normalisation is
  done (NFKC would turn ``"x²"`` into ``"x2"``); other scripts' digits are not numbers here.
- Light wrappers around a whole answer are removed before number/choice/math-string comparison:
  ``$...$``, ``$$...$$``, ``\\(...\\)``, ``\\[...\\]``, ``\\boxed{...}``, ``\\text{...}``, ``\\mathrm{...}``,
  ``**...**`` and a trailing period.
- A ground truth that itself carries ``<answer>`` tags (R1-V's CLEVR files store ``"<answer> 3 </answer>"``)
  is reduced to the tag content.
- Choice letters are upper case, except that a bare lower-case letter (``"b"``, ``"(b)"``) is accepted.
  An answer naming two parenthesised letters (``"(B) or (C)"``) or ``"B or C"`` is not a choice.
- In auto/math mode math_verify decides, with its own quirks: e.g. it reads ``"1 2 3 4"`` as 10.

**No regex ever runs over a whole completion.** Tags are located with ``str.count``/``str.find`` (linear
time, no backtracking), so a 1 MB completion is scored in milliseconds. Completions longer than
`MAX_COMPLETION_CHARS` are not inspected at all (they score 0). The regexes for numbers and choices run
only on the extracted answer, capped at `MAX_ANSWER_CHARS`; math_verify only sees answers and ground
truths up to `MAX_MATH_CHARS` (longer ones are compared as normalized strings only).

These functions are not time-bounded (math_verify runs with its signal timeouts off, see
`mr1jax.rl.reward_runner`): bound them with `RewardRunner` / `score_batch`.
"""

from __future__ import annotations

import logging
import math
import re
from typing import Any, Callable, Literal

import numpy as np

__all__ = [
    "MAX_ANSWER_CHARS",
    "MAX_COMPLETION_CHARS",
    "MAX_MATH_CHARS",
    "REWARD_KINDS",
    "AccuracyMode",
    "accuracy_reward",
    "answers_match",
    "combine_rewards",
    "extract_answer",
    "format_reward",
    "hard_format_result_reward",
    "othink_reward",
    "parse_choice",
    "parse_number",
]

logger = logging.getLogger(__name__)

AccuracyMode = Literal["auto", "number", "choice", "math", "exact"]
_MODES = ("auto", "number", "choice", "math", "exact")

#: Completions longer than this many characters are not inspected (format 0, no answer).
MAX_COMPLETION_CHARS = 4_000_000
#: Extracted answers longer than this are compared as normalized strings only (no number/choice regexes).
MAX_ANSWER_CHARS = 10_000
#: Answers / ground truths longer than this are not handed to math_verify.
MAX_MATH_CHARS = 2_000

_THINK_OPEN, _THINK_CLOSE = "<think>", "</think>"
_ANSWER_OPEN, _ANSWER_CLOSE = "<answer>", "</answer>"
_TAGS = (_THINK_OPEN, _THINK_CLOSE, _ANSWER_OPEN, _ANSWER_CLOSE)


# ---------------------------------------------------------------------------------------------------------
# Tags: format and answer extraction (linear time, no regex over the completion)
# ---------------------------------------------------------------------------------------------------------


def format_reward(completion: str, ground_truth: object = None) -> float:
    """1.0 iff ``completion`` is exactly one ``<think>…</think>`` block then one non-empty ``<answer>…</answer>``.

    Equivalent to ``re.fullmatch(r"\\s*<think>.*?</think>\\s*<answer>.*?</answer>\\s*", completion, re.DOTALL)``
    plus: each of the four tags occurs exactly once (so no nested, repeated or stray tags anywhere) and the
    answer is non-empty after stripping. The think block may be empty (as in the paper's regex).

    Args:
      completion: the decoded completion text.
      ground_truth: ignored; accepted so the function has the ``fn(completion, ground_truth)`` reward signature.

    Returns:
      1.0 or 0.0. Non-strings and completions over `MAX_COMPLETION_CHARS` score 0.0.
    """
    del ground_truth
    if not isinstance(completion, str) or len(completion) > MAX_COMPLETION_CHARS:
        return 0.0
    s = completion.strip()
    if not (s.startswith(_THINK_OPEN) and s.endswith(_ANSWER_CLOSE)):
        return 0.0
    if any(s.count(tag) != 1 for tag in _TAGS):
        return 0.0
    think_close = s.find(_THINK_CLOSE)
    answer_open = s.find(_ANSWER_OPEN)
    if think_close > answer_open:  # counts are 1 and s starts/ends with the outer tags, so this is the order check
        return 0.0
    if s[think_close + len(_THINK_CLOSE) : answer_open].strip():
        return 0.0  # only whitespace may separate </think> and <answer>
    if not s[answer_open + len(_ANSWER_OPEN) : len(s) - len(_ANSWER_CLOSE)].strip():
        return 0.0
    return 1.0


def extract_answer(completion: str) -> str | None:
    """The stripped content of the single ``<answer>…</answer>`` block of ``completion``.

    Returns None when there is no complete block (including a truncated ``<answer>`` without its closing
    tag), when it is empty or whitespace only, when it is ambiguous (more than one ``<answer>`` or
    ``</answer>`` tag), when the block contains think tags, or when the input is not a string or is longer
    than `MAX_COMPLETION_CHARS`. Text outside the block is never returned.
    """
    if not isinstance(completion, str) or len(completion) > MAX_COMPLETION_CHARS:
        return None
    if completion.count(_ANSWER_OPEN) != 1 or completion.count(_ANSWER_CLOSE) != 1:
        return None
    start = completion.find(_ANSWER_OPEN) + len(_ANSWER_OPEN)
    end = completion.find(_ANSWER_CLOSE)
    if end < start:
        return None
    content = completion[start:end].strip()
    if not content or _THINK_OPEN in content or _THINK_CLOSE in content:
        return None
    return content


# ---------------------------------------------------------------------------------------------------------
# Normalisation helpers
# ---------------------------------------------------------------------------------------------------------

# Full-width ASCII (U+FF01..U+FF5E) -> ASCII, ideographic space -> space, U+2212 minus -> "-".
_WIDTH_TABLE = {cp: cp - 0xFEE0 for cp in range(0xFF01, 0xFF5F)}
_WIDTH_TABLE.update({0x3000: 0x20, 0x2212: ord("-")})

_WRAPPERS_BRACED = ("\\boxed{", "\\text{", "\\textbf{", "\\mathrm{", "\\mathbf{")
_WRAPPERS_PAIRED = (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]"), ("**", "**"))


def _fold(s: str) -> str:
    """Fold full-width ASCII, the ideographic space and U+2212 to ASCII, then strip."""
    return s.translate(_WIDTH_TABLE).strip()


def _closing_brace(s: str, open_idx: int) -> int:
    """Index of the ``}`` matching the ``{`` at ``open_idx`` (-1 if unbalanced). Linear time."""
    depth = 0
    for i in range(open_idx, len(s)):
        c = s[i]
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return i
    return -1


def _unwrap(s: str) -> str:
    """Remove wrappers that enclose the *whole* answer (``$x$``, ``\\boxed{x}``, ``**x**``, trailing period…)."""
    s = _fold(s)
    for _ in range(8):  # wrappers nest rarely; bound the loop anyway
        before = s
        if s.endswith(".") and not s.endswith(".."):
            s = s[:-1].rstrip()
        for left, right in _WRAPPERS_PAIRED:
            if len(s) > len(left) + len(right) and s.startswith(left) and s.endswith(right):
                s = s[len(left) : len(s) - len(right)].strip()
                break
        for prefix in _WRAPPERS_BRACED:
            if s.startswith(prefix) and _closing_brace(s, len(prefix) - 1) == len(s) - 1:
                s = s[len(prefix) : -1].strip()
                break
        if s == before:
            break
    return s


_WS_RE = re.compile(r"\s+")


def _norm_text(s: str) -> str:
    """Case- and whitespace-insensitive form (width-folded, casefolded, runs of whitespace -> one space)."""
    return _WS_RE.sub(" ", _fold(s)).casefold()


def _ground_truth_text(ground_truth: object) -> str | None:
    """The ground truth as a stripped string (tag content if it carries ``<answer>`` tags); None if unusable."""
    if ground_truth is None or isinstance(ground_truth, bool):
        return None
    if isinstance(ground_truth, (int, float, np.integer, np.floating)):
        value = float(ground_truth)
        if not math.isfinite(value):
            return None
        text = str(ground_truth.item() if isinstance(ground_truth, np.generic) else ground_truth)
    elif isinstance(ground_truth, str):
        text = ground_truth
        if _ANSWER_OPEN in text or _ANSWER_CLOSE in text:
            text = extract_answer(text) or ""
    else:
        return None
    text = text.strip()
    return text or None


# ---------------------------------------------------------------------------------------------------------
# Numbers
# ---------------------------------------------------------------------------------------------------------

_NUM = r"[+-]?(?:[0-9]{1,3}(?:,[0-9]{3})+(?:\.[0-9]*)?|[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]{1,4})?"
_NUMBER_RE = re.compile(_NUM)
_FRACTION_RE = re.compile(r"([+-]?[0-9]+)\s*/\s*([0-9]+)")
_NUMBER_RTOL = 1e-6


def parse_number(text: str) -> float | None:
    """Parse an answer that is *only* a number; None otherwise.

    Accepts integers, decimals (``"3."``, ``".5"``), thousands separators in groups of three (``"1,000"``,
    ``"1{,}000"``), exponents (``"1e3"``), simple fractions (``"1/2"``), full-width digits and the U+2212
    minus, and the wrappers removed by the module's unwrapping (``$3$``, ``\\boxed{3}``, ``"3."``).
    Number words (``"three"``), ``nan``/``inf``, units and other text are rejected.
    """
    if not isinstance(text, str) or len(text) > MAX_ANSWER_CHARS:
        return None
    s = _unwrap(text).replace("{,}", ",")
    if not s:
        return None
    if _NUMBER_RE.fullmatch(s):
        try:
            value = float(s.replace(",", ""))
        except ValueError:
            return None
        return value if math.isfinite(value) else None
    m = _FRACTION_RE.fullmatch(s)
    if m:
        denominator = int(m.group(2))
        if denominator == 0:
            return None
        value = int(m.group(1)) / denominator
        return value if math.isfinite(value) else None
    return None


def _numbers_close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=_NUMBER_RTOL, abs_tol=0.0)


# ---------------------------------------------------------------------------------------------------------
# Multiple choice
# ---------------------------------------------------------------------------------------------------------

_LETTERS = "A-E"
_BARE_CHOICE_RE = re.compile(rf"\(?([{_LETTERS}])\)?[.:)]?", re.IGNORECASE)
_CHOICE_PREFIX = r"(?i:(?:the\s+)?(?:final\s+|correct\s+|best\s+|right\s+)?(?:answer|option|choice)(?:\s+is)?)\s*:?\s*"
_CHOICE_RE = re.compile(rf"(?:{_CHOICE_PREFIX})?(?:\(([{_LETTERS}])\)|([{_LETTERS}]))\s*([.:)]?)(.*)", re.DOTALL)
_PAREN_LETTER_RE = re.compile(rf"\([{_LETTERS}]\)")


def parse_choice(text: str) -> str | None:
    """The option letter (``"A"``-``"E"``) an answer names, or None.

    Accepted: ``"B"``, ``"(B)"``, ``"B."``, ``"B:"``, ``"B)"``, ``"b"``, ``"B) 45°"``, ``"(B) 45°"``, ``"B. text"``,
    ``"Answer: B"``, ``"The answer is (B)."``, ``"Option C"``, and those inside ``$…$``/``\\boxed{}``/``**…**``.
    Rejected: ``"B or C"``, ``"(B) or (C)"``, ``"AB"``, ``"Because"``, letters past E, empty text.
    """
    if not isinstance(text, str) or len(text) > MAX_ANSWER_CHARS:
        return None
    s = _unwrap(text)
    if not s:
        return None
    m = _BARE_CHOICE_RE.fullmatch(s)
    if m:
        return m.group(1).upper()
    m = _CHOICE_RE.fullmatch(s)
    if not m:
        return None
    paren_letter, bare_letter, punct, rest = m.groups()
    rest = rest.strip()
    if rest:
        if bare_letter and not punct:
            return None  # "B or C", "B text", "Because"
        if _PAREN_LETTER_RE.search(rest):
            return None  # "(B) or (C)": names several options
    return paren_letter or bare_letter


def _is_choice_ground_truth(text: str) -> bool:
    """Auto mode: a ground truth that is just an upper-case option letter (``"B"``, ``"(B)"``, ``"B."``)."""
    m = _BARE_CHOICE_RE.fullmatch(_unwrap(text))
    return m is not None and m.group(1).isupper()


# ---------------------------------------------------------------------------------------------------------
# Symbolic math via math_verify
# ---------------------------------------------------------------------------------------------------------


class _DropTimeoutWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Timeout is disabled")


_MV_QUIETED = False


def load_math_verify():
    """Import math_verify lazily (it pulls in sympy) and silence its "timeout disabled" warning."""
    global _MV_QUIETED
    import math_verify  # noqa: PLC0415  (hard dependency; lazy so the trainer process does not pay for sympy)

    if not _MV_QUIETED:
        for name in ("math_verify.parser", "math_verify.grader"):
            logging.getLogger(name).addFilter(_DropTimeoutWarning())
        _MV_QUIETED = True
    return math_verify


_DELIMITERS = ("$", "\\(", "\\[", "\\boxed")


def _mv_parse(text: str) -> list:
    """math_verify.parse with signal timeouts off; bare LaTeX is wrapped in ``$…$`` first (``2\\sqrt{3}``
    parses as 2 without delimiters), falling back to the raw text if that finds nothing."""
    mv = load_math_verify()
    text = _fold(text)
    if not any(d in text for d in _DELIMITERS):
        parsed = mv.parse(f"${text}$", parsing_timeout=None)
        if parsed:
            return parsed
    return mv.parse(text, parsing_timeout=None)


def _math_equal(answer: str, gold: str) -> bool:
    if _norm_text(_unwrap(answer)) == _norm_text(_unwrap(gold)):
        return True  # the exact-string fallback (also a fast path)
    if len(answer) > MAX_MATH_CHARS or len(gold) > MAX_MATH_CHARS:
        return False
    gold_parsed = _mv_parse(gold)
    answer_parsed = _mv_parse(answer)
    if not gold_parsed or not answer_parsed:
        return False
    return bool(load_math_verify().verify(gold_parsed, answer_parsed, timeout_seconds=None))


# ---------------------------------------------------------------------------------------------------------
# Accuracy and the combined rewards
# ---------------------------------------------------------------------------------------------------------


def answers_match(answer: str, ground_truth: object, *, mode: AccuracyMode = "auto") -> bool:
    """Whether an extracted answer string equals the ground truth under ``mode`` (see the module docstring).

    ``ground_truth`` may be a string (optionally wrapped in ``<answer>`` tags), an int or a float. An empty
    answer or ground truth never matches. Not time-bounded in ``"math"``/``"auto"`` mode: see `RewardRunner`.
    """
    if mode not in _MODES:
        raise ValueError(f"unknown accuracy mode {mode!r}; expected one of {_MODES}")
    if not isinstance(answer, str) or not answer.strip():
        return False
    gold = _ground_truth_text(ground_truth)
    if gold is None:
        return False
    if mode == "exact":
        return _norm_text(answer) == _norm_text(gold)
    if mode == "number":
        a, g = parse_number(answer), parse_number(gold)
        return a is not None and g is not None and _numbers_close(a, g)
    if mode == "choice":
        a, g = parse_choice(answer), parse_choice(gold)
        return a is not None and a == g
    if mode == "math":
        return _math_equal(answer, gold)
    # auto
    if _is_choice_ground_truth(gold):
        a = parse_choice(answer)
        return a is not None and a == parse_choice(gold)
    g = parse_number(gold)
    if g is not None:
        a = parse_number(answer)
        if a is not None:
            return _numbers_close(a, g)
    return _math_equal(answer, gold)


def accuracy_reward(completion: str, ground_truth: object, *, mode: AccuracyMode = "auto") -> float:
    """1.0 iff `extract_answer` (the single ``<answer>`` block) matches ``ground_truth`` under ``mode``; else 0.0.

    Text outside the answer tags is never compared; a missing, empty or ambiguous answer scores 0.0.
    """
    answer = extract_answer(completion)
    if answer is None:
        return 0.0
    return 1.0 if answers_match(answer, ground_truth, mode=mode) else 0.0


def _othink(accuracy, fmt, alpha: float = 1.0):
    return accuracy + alpha * fmt


def _hard(accuracy, fmt, alpha: float = 1.0):
    del alpha
    return accuracy * fmt


def _accuracy_only(accuracy, fmt, alpha: float = 1.0):
    del fmt, alpha
    return accuracy


def _format_only(accuracy, fmt, alpha: float = 1.0):
    del accuracy, alpha
    return fmt


#: Reward kind (``config.rl.reward``) -> ``combine(accuracy, format, alpha)``, on floats or arrays.
REWARD_KINDS: dict[str, Callable[..., Any]] = {
    "othink": _othink,              # accuracy + alpha * format (OThink-MR1)
    "hard": _hard,                  # accuracy AND format (Vision-R1's HFRRF)
    "accuracy": _accuracy_only,
    "format": _format_only,
}


def combine_rewards(kind: str, accuracy, fmt, alpha: float = 1.0):
    """The reward of kind ``kind`` (a `REWARD_KINDS` name) from accuracy and format rewards (floats or arrays)."""
    if kind not in REWARD_KINDS:
        raise ValueError(f"unknown reward kind {kind!r}; expected one of {', '.join(REWARD_KINDS)}")
    return REWARD_KINDS[kind](accuracy, fmt, alpha)


def othink_reward(
    completion: str, ground_truth: object, alpha: float = 1.0, *, mode: AccuracyMode = "auto"
) -> float:
    """OThink-MR1's reward: ``accuracy_reward + alpha * format_reward`` (alpha = 1 in the paper; range [0, 1 + alpha])."""
    return combine_rewards("othink", accuracy_reward(completion, ground_truth, mode=mode), format_reward(completion),
                           alpha)


def hard_format_result_reward(completion: str, ground_truth: object, *, mode: AccuracyMode = "auto") -> float:
    """Vision-R1's hard formatting result reward: 1.0 iff the format is correct AND the answer is correct."""
    fmt = format_reward(completion)
    acc = accuracy_reward(completion, ground_truth, mode=mode) if fmt == 1.0 else 0.0  # no parse when format fails
    return combine_rewards("hard", acc, fmt)

