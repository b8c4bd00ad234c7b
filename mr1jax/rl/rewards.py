"""Host-side rewards for GRPO on reasoning completions, and a crash/timeout-proof batch runner.

Completions are expected in the R1 layout ``<think> ... </think> <answer> ... </answer>``.

Rewards (all return a Python ``float``; every one has the ``fn(completion, ground_truth)`` signature that
`RewardRunner` and `score_batch` call):

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

**math_verify and timeouts.** math_verify bounds its own work with ``signal.alarm``, which raises outside
the main thread. This module always calls it with ``parsing_timeout=None`` and ``timeout_seconds=None``,
so the reward functions work from any thread but are not time-bounded by themselves: sympy can hang on
adversarial input (``"9^{9^{9^{9}}}"``). Bound them with `RewardRunner` / `score_batch`, which run the
reward function in worker processes (multiprocessing ``forkserver`` context on Linux, ``spawn``
elsewhere; never ``fork``, the trainer process holds JAX threads), give every sample its own deadline, and
kill and replace a worker that overruns it. A sample whose reward raises, returns a non-finite or
non-numeric value, kills its worker, or overruns the deadline gets 0.0 and is counted in the stats; the
runner never raises for a per-sample failure. It does raise for systemic failures: a reward function that
cannot be pickled (use a module-level function or `functools.partial` of one) or loaded in the workers, or
workers that repeatedly fail to start.

Worker start-up: workers import the trainer's ``__main__`` module (standard multiprocessing behaviour:
keep an ``if __name__ == "__main__":`` guard; a script read from stdin cannot start workers) and the reward
function's module, and warm up math_verify, before they take work; that time is bounded by
``startup_timeout_s``, not by the per-sample timeout. With ``forkserver`` the runner adds ``__main__``,
this module and math_verify to the process-wide forkserver preload list (if the forkserver has not started
yet), so they are imported once in the forkserver and each worker, including the replacement of a killed
one, starts by a fork in milliseconds. Note that importing this module imports ``mr1jax.rl``'s package
``__init__`` (JAX, ~1 s), once per forkserver or per ``spawn`` worker. The pool is created lazily on first
use, reused across calls, and shut down by `close()` (or the context manager; `score_batch`'s shared runner
closes at interpreter exit).
"""

from __future__ import annotations

import atexit
import collections
import functools
import logging
import math
import multiprocessing
import multiprocessing.connection
import os
import pickle
import re
import signal
import threading
import time
from typing import Any, Callable, Literal, Sequence

import numpy as np

__all__ = [
    "MAX_ANSWER_CHARS",
    "MAX_COMPLETION_CHARS",
    "MAX_MATH_CHARS",
    "AccuracyMode",
    "RewardRunner",
    "accuracy_reward",
    "answers_match",
    "close_default_runner",
    "extract_answer",
    "format_reward",
    "hard_format_result_reward",
    "othink_reward",
    "parse_choice",
    "parse_number",
    "score_batch",
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


def _math_verify():
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
    mv = _math_verify()
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
    return bool(_math_verify().verify(gold_parsed, answer_parsed, timeout_seconds=None))


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


def othink_reward(
    completion: str, ground_truth: object, alpha: float = 1.0, *, mode: AccuracyMode = "auto"
) -> float:
    """OThink-MR1's reward: ``accuracy_reward + alpha * format_reward`` (alpha = 1 in the paper; range [0, 1 + alpha])."""
    return accuracy_reward(completion, ground_truth, mode=mode) + alpha * format_reward(completion)


def hard_format_result_reward(completion: str, ground_truth: object, *, mode: AccuracyMode = "auto") -> float:
    """Vision-R1's hard formatting result reward: 1.0 iff the format is correct AND the answer is correct."""
    if format_reward(completion) != 1.0:
        return 0.0
    return accuracy_reward(completion, ground_truth, mode=mode)


# ---------------------------------------------------------------------------------------------------------
# Batch runner: per-sample deadlines in worker processes
# ---------------------------------------------------------------------------------------------------------

RewardFn = Callable[[str, Any], float]


def _error_text(exc: BaseException) -> str:
    try:
        text = f"{type(exc).__name__}: {exc}"
    except Exception:  # a hostile __str__
        text = type(exc).__name__
    return text[:500]


def _set_parent_death_signal() -> None:
    """Linux: have the kernel SIGKILL this worker if its parent (the forkserver / trainer) dies."""
    try:
        import ctypes  # noqa: PLC0415

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except Exception:
        pass


def _warmup() -> None:
    """Import math_verify (sympy) and run one parse/verify so the first sample is not charged for it."""
    try:
        mv = _math_verify()
        mv.verify(mv.parse("$1$", parsing_timeout=None), mv.parse("$1$", parsing_timeout=None), timeout_seconds=None)
    except Exception:  # a missing math_verify shows up as per-sample errors with the message
        pass


def _worker_main(conn: multiprocessing.connection.Connection, warmup: bool, max_memory_mb: int | None) -> None:
    """Worker loop. Messages in: ("load", fn_bytes) | ("task", idx, completion, answer) | ("stop",).

    Messages out: ("ready",) once, ("loaded", error_or_None), ("result", idx, ok, value_or_error).
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the trainer's business; it kills us in close()
    _set_parent_death_signal()
    if warmup:
        _warmup()
    if max_memory_mb:
        try:
            import resource  # noqa: PLC0415

            _, hard = resource.getrlimit(resource.RLIMIT_AS)
            soft = int(max_memory_mb) * 2**20
            if hard != resource.RLIM_INFINITY:
                soft = min(soft, hard)
            resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
        except Exception:
            pass
    conn.send(("ready",))
    fn: RewardFn | None = None
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            return
        kind = msg[0]
        if kind == "stop":
            return
        if kind == "load":
            try:
                fn = pickle.loads(msg[1])
                reply = ("loaded", None)
            except BaseException as exc:  # noqa: BLE001
                fn = None
                reply = ("loaded", _error_text(exc))
            try:
                conn.send(reply)
            except (EOFError, OSError):
                return
        elif kind == "task":
            _, idx, completion, answer = msg
            try:
                if fn is None:
                    raise RuntimeError("no reward function loaded")
                raw = fn(completion, answer)
                if isinstance(raw, (bool, np.bool_)):
                    raw = float(raw)
                if not isinstance(raw, (int, float, np.integer, np.floating)) and not (
                    isinstance(raw, np.ndarray) and raw.size == 1
                ):
                    raise TypeError(f"reward must be a number, got {type(raw).__name__}")
                value = float(raw)
                if not math.isfinite(value):
                    raise ValueError(f"non-finite reward {value}")
                out = ("result", idx, True, value)
            except BaseException as exc:  # noqa: BLE001  (SystemExit, MemoryError, …: the sample fails, not us)
                out = ("result", idx, False, _error_text(exc))
            try:
                conn.send(out)
            except (EOFError, OSError):
                return


class _Worker:
    """One worker process and the parent's end of its pipe, with the parent's view of its state."""

    __slots__ = ("proc", "conn", "state", "deadline", "idx", "loaded", "loading")

    def __init__(self, ctx, warmup: bool, max_memory_mb: int | None, startup_timeout_s: float):
        parent_conn, child_conn = ctx.Pipe(duplex=True)
        self.proc = ctx.Process(
            target=_worker_main, args=(child_conn, warmup, max_memory_mb), daemon=True, name="mr1jax-reward"
        )
        self.proc.start()
        child_conn.close()
        self.conn = parent_conn
        self.state = "starting"  # starting -> idle <-> (loading | busy)
        self.deadline = time.monotonic() + startup_timeout_s
        self.idx = -1
        self.loaded: bytes | None = None  # the pickled reward function the worker holds
        self.loading: bytes | None = None  # the one it was last asked to load (acks may arrive a call later)

    def send(self, msg: tuple) -> bool:
        try:
            self.conn.send(msg)
            return True
        except (OSError, ValueError):
            return False

    def kill(self) -> None:
        try:
            if self.proc.is_alive():
                self.proc.kill()
            self.proc.join(timeout=5.0)
        except Exception:
            pass
        try:
            self.conn.close()
        except Exception:
            pass

    def stop(self) -> None:
        if self.send(("stop",)):
            self.proc.join(timeout=1.0)
        self.kill()


_FORKSERVER_PRELOAD = ("__main__", "mr1jax.rl.rewards", "math_verify")


def _add_forkserver_preload(ctx) -> None:
    """Have the forkserver import the main module, this module and math_verify once, so each worker (and
    each replacement of a killed one) forks with them loaded instead of importing them again (~1-2 s each).

    Only effective if this process has not started its forkserver yet; keeps any preload already set.
    Modules that fail to import are skipped by the forkserver.
    """
    try:
        from multiprocessing import forkserver  # noqa: PLC0415

        current = list(getattr(forkserver._forkserver, "_preload_modules", []) or [])
        ctx.set_forkserver_preload(current + [m for m in _FORKSERVER_PRELOAD if m not in current])
    except Exception:
        pass


def _default_start_method() -> str:
    return "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"


class RewardRunner:
    """Evaluates a reward function over a batch in worker processes with a deadline per sample.

    ``runner.score(fn, completions, answers)`` returns ``(rewards, stats)``: ``rewards`` is a float32 array
    ``[N]`` of ``fn(completions[i], answers[i])``, with 0.0 for every sample whose call raised, returned a
    non-finite or non-numeric value, crashed its worker, or ran past ``timeout_s`` (the worker is then
    killed and replaced, so the pool is never poisoned). ``stats``:

    - ``n``: samples; ``n_errors``: failed samples (raised / bad value / worker died);
      ``n_timeouts``: samples that ran past their deadline;
    - ``n_restarts``: workers replaced during the call; ``first_error``: the first error text or None;
    - ``wall_s``: wall-clock seconds of the call.

    ``fn`` must be picklable by reference: a module-level function, or `functools.partial` of one (pass
    options that way or through ``fn_kwargs``). Calls are serialised by a lock, so the runner may be used
    from any thread, including non-main ones. ``workers=0`` runs ``fn`` in the calling thread instead (for
    debugging and unpicklable functions): exceptions still score 0 and are counted, but a slow sample cannot
    be interrupted; it is counted as a timeout and scored 0 after it finishes.

    Args:
      workers: worker processes; default ``min(8, os.cpu_count())``.
      timeout_s: default per-sample deadline in seconds (``score`` may override it per call).
      start_method: ``"forkserver"`` (default where available) or ``"spawn"``. ``"fork"`` is refused: the
        trainer process runs JAX threads.
      startup_timeout_s: how long a worker may take to start (imports, warm-up) or to load ``fn``.
      max_memory_mb: optional per-worker address-space limit (``RLIMIT_AS``, set after start-up); an
        allocation past it raises MemoryError inside the worker, which scores that sample 0.
      warmup: import and exercise math_verify in each worker before it takes work.
    """

    def __init__(
        self,
        workers: int | None = None,
        *,
        timeout_s: float = 2.0,
        start_method: str | None = None,
        startup_timeout_s: float = 120.0,
        max_memory_mb: int | None = None,
        warmup: bool = True,
    ):
        if workers is None:
            workers = min(8, os.cpu_count() or 1)
        if workers < 0:
            raise ValueError(f"workers must be >= 0, got {workers}")
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        start_method = start_method or _default_start_method()
        if start_method == "fork":
            raise ValueError("start_method='fork' is unsafe in a process that runs JAX; use forkserver or spawn")
        self.workers = int(workers)
        self.timeout_s = float(timeout_s)
        self.start_method = start_method
        self.startup_timeout_s = float(startup_timeout_s)
        self.max_memory_mb = max_memory_mb
        self.warmup = warmup
        self._ctx = None
        self._pool: list[_Worker] = []
        self._lock = threading.Lock()
        self._closed = False

    # -- lifecycle -------------------------------------------------------------------------------------

    def __enter__(self) -> "RewardRunner":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Stop every worker process. Idempotent; the runner cannot be used afterwards."""
        with self._lock:
            self._closed = True
            self._stop_all()

    @property
    def worker_pids(self) -> list[int]:
        """PIDs of the current worker processes (for monitoring and tests)."""
        return [w.proc.pid for w in self._pool if w.proc.pid is not None]

    def _stop_all(self) -> None:
        pool, self._pool = self._pool, []
        for w in pool:
            w.stop()

    def _kill_all(self) -> None:
        pool, self._pool = self._pool, []
        for w in pool:
            w.kill()

    def _new_worker(self) -> _Worker:
        if self._ctx is None:
            self._ctx = multiprocessing.get_context(self.start_method)
            if self.start_method == "forkserver":
                _add_forkserver_preload(self._ctx)
        return _Worker(self._ctx, self.warmup, self.max_memory_mb, self.startup_timeout_s)

    def _replace(self, w: _Worker, stats: dict) -> None:
        w.kill()
        self._pool[self._pool.index(w)] = self._new_worker()
        stats["n_restarts"] += 1

    # -- scoring ---------------------------------------------------------------------------------------

    def score(
        self,
        fn: RewardFn,
        completions: Sequence[str],
        answers: Sequence[Any],
        *,
        timeout_s: float | None = None,
        fn_kwargs: dict[str, Any] | None = None,
    ) -> tuple[np.ndarray, dict[str, Any]]:
        """Rewards ``fn(completions[i], answers[i])`` as float32 ``[N]`` and the stats dict (see the class doc).

        Raises ValueError for mismatched lengths, TypeError for an unpicklable ``fn`` and RuntimeError when
        workers cannot start or cannot load ``fn``; never for a per-sample failure.
        """
        completions = list(completions)
        answers = list(answers)
        if len(completions) != len(answers):
            raise ValueError(f"{len(completions)} completions but {len(answers)} answers")
        timeout_s = self.timeout_s if timeout_s is None else float(timeout_s)
        if fn_kwargs:
            fn = functools.partial(fn, **fn_kwargs)
        n = len(completions)
        rewards = np.zeros(n, dtype=np.float32)
        stats: dict[str, Any] = {
            "n": n, "n_errors": 0, "n_timeouts": 0, "n_restarts": 0, "first_error": None, "wall_s": 0.0,
        }
        t0 = time.monotonic()
        with self._lock:
            if self._closed:
                raise RuntimeError("RewardRunner is closed")
            if n:
                if self.workers == 0:
                    self._score_inline(fn, completions, answers, timeout_s, rewards, stats)
                else:
                    try:
                        fn_bytes = pickle.dumps(fn)
                    except Exception as exc:
                        raise TypeError(
                            "the reward function must be picklable by reference (a module-level function or a "
                            f"functools.partial of one), or use workers=0: {_error_text(exc)}"
                        ) from exc
                    try:
                        self._score_pool(fn_bytes, completions, answers, timeout_s, rewards, stats)
                    except BaseException:
                        self._kill_all()  # in-flight work would confuse the next call
                        raise
        stats["wall_s"] = time.monotonic() - t0
        if stats["n_errors"] or stats["n_timeouts"]:
            logger.warning(
                "rewards: %d/%d samples failed (%d errors, %d timeouts); first error: %s",
                stats["n_errors"] + stats["n_timeouts"], n, stats["n_errors"], stats["n_timeouts"],
                stats["first_error"],
            )
        return rewards, stats

    __call__ = score

    @staticmethod
    def _record_error(stats: dict, text: str) -> None:
        stats["n_errors"] += 1
        if stats["first_error"] is None:
            stats["first_error"] = text

    def _score_inline(self, fn, completions, answers, timeout_s, rewards, stats) -> None:
        for i, (completion, answer) in enumerate(zip(completions, answers)):
            t = time.monotonic()
            try:
                value = float(fn(completion, answer))
                if not math.isfinite(value):
                    raise ValueError(f"non-finite reward {value}")
            except Exception as exc:  # noqa: BLE001
                self._record_error(stats, _error_text(exc))
                continue
            if time.monotonic() - t > timeout_s:
                stats["n_timeouts"] += 1
                continue
            rewards[i] = value

    def _score_pool(self, fn_bytes, completions, answers, timeout_s, rewards, stats) -> None:
        while len(self._pool) < self.workers:
            self._pool.append(self._new_worker())
        pending = collections.deque(range(len(completions)))
        remaining = len(completions)
        failed_starts = 0
        max_failed_starts = 3 * self.workers + 2

        while remaining:
            # Hand out work: load the function where needed, then one sample per idle worker.
            for w in list(self._pool):
                if w.state != "idle":
                    continue
                if w.loaded != fn_bytes:
                    if w.send(("load", fn_bytes)):
                        w.state, w.loading = "loading", fn_bytes
                        w.deadline = time.monotonic() + self.startup_timeout_s
                    else:
                        failed_starts += 1
                        self._replace(w, stats)
                elif pending:
                    i = pending.popleft()
                    if w.send(("task", i, completions[i], answers[i])):
                        w.state, w.idx, w.deadline = "busy", i, time.monotonic() + timeout_s
                    else:  # the worker died while idle: not this sample's fault, retry it elsewhere
                        pending.appendleft(i)
                        failed_starts += 1
                        self._replace(w, stats)
            if failed_starts > max_failed_starts:
                raise RuntimeError(f"reward workers keep failing to start ({failed_starts} failures)")

            active = [w for w in self._pool if w.state != "idle"]
            if not active:
                continue
            wait_for = min(w.deadline for w in active) - time.monotonic()
            handles = [w.conn for w in active] + [w.proc.sentinel for w in active]
            ready = set(multiprocessing.connection.wait(handles, timeout=max(0.0, wait_for)))
            now = time.monotonic()

            for w in active:
                msg = None
                if w.conn in ready or w.proc.sentinel in ready:
                    try:
                        if w.conn.poll():
                            msg = w.conn.recv()
                    except (EOFError, OSError):
                        msg = None
                    if msg is None:  # the process is gone without answering
                        w.proc.join(timeout=1.0)
                        reason = f"worker died (exit code {w.proc.exitcode})"
                        failed_starts += w.state in ("starting", "loading")
                        remaining -= self._on_lost(w, stats, reason, timed_out=False)
                        continue
                elif now >= w.deadline:
                    failed_starts += w.state in ("starting", "loading")
                    remaining -= self._on_lost(w, stats, "timeout", timed_out=True)
                    continue
                else:
                    continue

                kind = msg[0]
                if kind == "ready" and w.state == "starting":
                    w.state = "idle"
                    failed_starts = 0
                elif kind == "loaded" and w.state == "loading":
                    # The ack may belong to a previous call whose batch finished while this worker was
                    # loading; record what was really loaded, so an outdated function is reloaded.
                    if msg[1] is not None and w.loading == fn_bytes:
                        raise RuntimeError(f"reward function could not be loaded in a worker: {msg[1]}")
                    w.state, w.loaded = "idle", (w.loading if msg[1] is None else None)
                    failed_starts = 0
                elif kind == "result" and w.state == "busy" and msg[1] == w.idx:
                    _, idx, ok, payload = msg
                    if ok:
                        rewards[idx] = payload
                    else:
                        self._record_error(stats, payload)
                    remaining -= 1
                    w.state, w.idx = "idle", -1
                else:  # protocol confusion should be impossible; recover by replacing the worker
                    remaining -= self._on_lost(w, stats, f"unexpected worker message {kind!r}", timed_out=False)

            if failed_starts > max_failed_starts:
                raise RuntimeError(f"reward workers keep failing to start ({failed_starts} failures)")

    def _on_lost(self, w: _Worker, stats: dict, reason: str, *, timed_out: bool) -> int:
        """A worker timed out, died or misbehaved: score its sample 0 (counted) and replace it.

        Returns the number of samples finished by this (1 if the worker was busy, else 0).
        """
        lost = 0
        if w.state == "busy":
            if timed_out:
                stats["n_timeouts"] += 1
            else:
                self._record_error(stats, reason)
            lost = 1
        elif w.state in ("starting", "loading"):
            logger.warning("reward worker failed to %s: %s", "start" if w.state == "starting" else "load", reason)
        self._replace(w, stats)
        return lost


_DEFAULT_RUNNER: RewardRunner | None = None
_DEFAULT_RUNNER_LOCK = threading.Lock()


def score_batch(
    fn: RewardFn,
    completions: Sequence[str],
    answers: Sequence[Any],
    *,
    timeout_s: float = 2.0,
    workers: int | None = None,
    fn_kwargs: dict[str, Any] | None = None,
) -> tuple[np.ndarray, dict[str, Any]]:
    """`RewardRunner.score` on a shared, lazily created runner (re-created if ``workers`` changes).

    Returns ``(rewards float32 [N], stats)`` with ``stats["n_errors"]`` and ``stats["n_timeouts"]``; failed or
    overrunning samples score 0.0 and never raise. Safe to call from any thread. The shared runner is
    closed at interpreter exit or by `close_default_runner`.
    """
    global _DEFAULT_RUNNER
    wanted = min(8, os.cpu_count() or 1) if workers is None else workers
    with _DEFAULT_RUNNER_LOCK:
        runner = _DEFAULT_RUNNER
        if runner is None or runner.workers != wanted:
            if runner is not None:
                runner.close()
            runner = _DEFAULT_RUNNER = RewardRunner(wanted, timeout_s=timeout_s)
    return runner.score(fn, completions, answers, timeout_s=timeout_s, fn_kwargs=fn_kwargs)


def close_default_runner() -> None:
    """Stop the worker processes of `score_batch`'s shared runner (a later call starts new ones)."""
    global _DEFAULT_RUNNER
    with _DEFAULT_RUNNER_LOCK:
        runner, _DEFAULT_RUNNER = _DEFAULT_RUNNER, None
    if runner is not None:
        runner.close()


atexit.register(close_default_runner)
