"""Rewards (format / accuracy / OThink / Vision-R1 HFRRF) and the crash/timeout-proof batch runner."""

from __future__ import annotations

import functools
import math
import os
import threading
import time

import numpy as np
import pytest

from mr1jax.rl import reward_runner
from mr1jax.rl import rewards as R
from mr1jax.rl.reward_runner import RewardRunner, score_batch
from mr1jax.rl.rewards import (
    accuracy_reward,
    answers_match,
    extract_answer,
    format_reward,
    hard_format_result_reward,
    othink_reward,
    parse_choice,
    parse_number,
)

# ---------------------------------------------------------------------------------------------------------
# The table: (id, completion, ground truth, expected format, expected accuracy); mode "auto".
# othink = accuracy + format, hard = format AND accuracy.
# ---------------------------------------------------------------------------------------------------------

T = "<think>There are two cubes and one sphere.</think>"
TABLE = [
    ("correct", f"{T}\n<answer>3</answer>", "3", 1, 1),
    ("correct_padded", f"\n  {T}\n\n<answer>\n 3 \n</answer>\n  ", "3", 1, 1),
    ("correct_int_gt", f"{T}<answer>3</answer>", 3, 1, 1),
    ("gt_with_tags", f"{T}<answer>3</answer>", "<answer> 3 </answer>", 1, 1),  # R1-V's CLEVR files
    ("wrong", f"{T}<answer>4</answer>", "3", 1, 0),
    ("no_tags", "There are 3 objects.", "3", 0, 0),
    ("answer_outside_tags", "The answer is 3", "3", 0, 0),
    ("answer_in_think_only", "<think>The answer is 3</think>", "3", 0, 0),
    ("answer_after_think_untagged", f"{T} 3", "3", 0, 0),
    ("answer_only", "<answer>3</answer>", "3", 0, 1),
    ("empty_answer", f"{T}<answer></answer>", "3", 0, 0),  # the peers' reward hack
    ("blank_answer", f"{T}<answer> </answer>", "3", 0, 0),
    ("newline_answer", f"{T}<answer>\n\t\n</answer>", "3", 0, 0),
    ("empty_answer_text_after", f"{T}<answer></answer> 3", "3", 0, 0),
    ("empty_answer_gt_empty", f"{T}<answer></answer>", "", 0, 0),
    ("nested_answer", f"{T}<answer><answer>3</answer></answer>", "3", 0, 0),
    ("think_inside_answer", f"{T}<answer><think>hm</think>3</answer>", "3", 0, 0),
    ("nested_think", "<think>a<think>b</think>c</think><answer>3</answer>", "3", 0, 1),
    ("two_answers", f"{T}<answer>2</answer><answer>3</answer>", "3", 0, 0),
    ("two_same_answers", f"{T}<answer>3</answer>\n<answer>3</answer>", "3", 0, 0),
    ("two_think_blocks", f"{T}{T}<answer>3</answer>", "3", 0, 1),
    ("think_after_answer", f"<answer>3</answer>{T}", "3", 0, 1),
    ("text_between_blocks", f"{T} so <answer>3</answer>", "3", 0, 1),
    ("text_after_answer", f"{T}<answer>3</answer> Done.", "3", 0, 1),
    ("truncated", f"{T}<answer>3", "3", 0, 0),
    ("unclosed_think", "<think>x<answer>3</answer>", "3", 0, 1),
    ("uppercase_tags", "<THINK>x</THINK><ANSWER>3</ANSWER>", "3", 0, 0),
    ("empty_think", "<think></think><answer>3</answer>", "3", 1, 1),  # the paper's regex allows it
    ("unicode_think", "<think>数一数：🟥🟦 ≈ 3 — ok</think><answer>3</answer>", "3", 1, 1),
    ("fullwidth_digit", f"{T}<answer>３</answer>", "3", 1, 1),  # full-width folded to ASCII (documented)
    ("unicode_minus", f"{T}<answer>−2</answer>", "-2", 1, 1),
    ("number_word", f"{T}<answer>three</answer>", "3", 1, 0),  # no number words
    ("number_trailing_dot", f"{T}<answer>3.</answer>", "3", 1, 1),
    ("number_float", f"{T}<answer>3.0</answer>", "3", 1, 1),
    ("number_thousands", f"{T}<answer>1,000</answer>", "1000", 1, 1),
    ("number_with_unit", f"{T}<answer>60°</answer>", "60", 1, 1),  # auto: not a plain number -> math_verify
    ("math_pi_half", f"{T}<answer>π/2</answer>", "\\frac{\\pi}{2}", 1, 1),
    ("math_sqrt", f"{T}<answer>$2\\sqrt{{3}}$</answer>", "2\\sqrt{3}", 1, 1),
    ("math_sqrt_not_2", f"{T}<answer>2\\sqrt{{3}}</answer>", "2", 1, 0),
    ("math_boxed_frac", f"{T}<answer>\\boxed{{\\frac{{1}}{{2}}}}</answer>", "0.5", 1, 1),
    ("choice_paren", f"{T}<answer>(B)</answer>", "B", 1, 1),
    ("choice_text", f"{T}<answer>B) 45°</answer>", "B", 1, 1),
    ("choice_answer_is", f"{T}<answer>The answer is B.</answer>", "B", 1, 1),
    ("choice_wrong", f"{T}<answer>C</answer>", "B", 1, 0),
    ("choice_hedge", f"{T}<answer>B or C</answer>", "B", 1, 0),
    ("choice_hedge_paren", f"{T}<answer>(B) or (C)</answer>", "B", 1, 0),
    ("choice_outside_tags", f"{T}B<answer>C</answer>", "B", 0, 0),
]


@pytest.mark.parametrize("cid,completion,gt,fmt,acc", TABLE, ids=[row[0] for row in TABLE])
def test_reward_table(cid, completion, gt, fmt, acc):
    assert format_reward(completion) == fmt
    assert accuracy_reward(completion, gt) == acc
    assert othink_reward(completion, gt) == acc + fmt
    assert othink_reward(completion, gt, alpha=0.5) == acc + 0.5 * fmt
    assert hard_format_result_reward(completion, gt) == float(fmt and acc)
    for value in (format_reward(completion), accuracy_reward(completion, gt)):
        assert isinstance(value, float)


def test_format_reward_matches_the_paper_regex_on_well_formed_inputs():
    import re

    paper = re.compile(r"\s*<think>.*?</think>\s*<answer>.*?</answer>\s*", re.DOTALL)
    for _, completion, _, fmt, _ in TABLE:
        if fmt == 1:  # ours is strictly tighter: every accepted completion is accepted by the paper's regex
            assert paper.fullmatch(completion)
    # ...and the tightening is real: the paper's regex accepts these hacks, we do not.
    for hack in (f"{T}<answer></answer>", f"{T}<answer> </answer>", f"{T}<answer>1</answer><answer>2</answer>"):
        assert paper.fullmatch(hack) and format_reward(hack) == 0.0


def test_extract_answer():
    assert extract_answer(f"{T}<answer>  x + 1 \n</answer>") == "x + 1"
    assert extract_answer("<answer>3</answer>") == "3"
    assert extract_answer("junk <answer>3</answer> junk") == "3"
    for bad in ("no tags", "<answer></answer>", "<answer>  </answer>", "</answer>3<answer>", "<answer>3",
                "<answer>1</answer><answer>2</answer>", "<answer><think>t</think>3</answer>", None, 3):
        assert extract_answer(bad) is None, bad


@pytest.mark.parametrize("text,letter", [
    ("B", "B"), ("(B)", "B"), ("B.", "B"), ("B:", "B"), ("B)", "B"), ("b", "B"), ("(b)", "B"),
    ("B) 45°", "B"), ("(B) 45°", "B"), ("B. The second one", "B"), ("Answer: B", "B"), ("answer: (D)", "D"),
    ("The answer is (B).", "B"), ("The correct option is C", "C"), ("Option E", "E"), ("$B$", "B"),
    ("\\boxed{B}", "B"), ("**B**", "B"), ("（Ｂ）", "B"),
    ("B or C", None), ("(B) or (C)", None), ("AB", None), ("Because", None), ("F", None), ("", None),
    ("A line", None), ("E=mc^2", None), ("The answer is a cat", None), ("Answer: the second", None),
])
def test_parse_choice(text, letter):
    assert parse_choice(text) == letter


@pytest.mark.parametrize("text,value", [
    ("3", 3.0), ("3.0", 3.0), ("3.", 3.0), (".5", 0.5), ("-2", -2.0), ("+2", 2.0), ("−2", -2.0), ("１２", 12.0),
    ("1,000", 1000.0), ("1,234,567.5", 1234567.5), ("1{,}000", 1000.0), ("1e3", 1000.0), ("1/2", 0.5),
    ("$3$", 3.0), ("\\boxed{3}", 3.0),
    ("three", None), ("1,00", None), ("12,34", None), ("3 apples", None), ("nan", None), ("inf", None),
    ("1e999", None), ("3 4", None), ("1 000", None), ("- 2", None), ("1/0", None), ("", None), ("3..", None), ("0x10", None), ("٣", None),
])
def test_parse_number(text, value):
    assert parse_number(text) == value


def test_number_mode_relative_tolerance():
    assert answers_match("0.3333333", "0.333333333", mode="number")  # within 1e-6 relative
    assert answers_match("1000000.5", "1000000", mode="number")  # 5e-7 relative
    assert not answers_match("3.001", "3", mode="number")
    assert not answers_match("1000002", "1000000", mode="number")  # 2e-6 relative
    assert answers_match("0", "0.0", mode="number") and answers_match("-0", "0", mode="number")
    assert not answers_match("1e-9", "0", mode="number")  # relative tolerance: nothing is close to 0
    assert answers_match("2.5", 2.5, mode="number") and answers_match("7", np.int64(7), mode="number")
    assert not answers_match("60°", "60", mode="number")  # strict: units are not numbers
    assert not answers_match("nan", float("nan"), mode="number")


def test_choice_and_exact_modes():
    assert answers_match("Answer: B", "(B)", mode="choice")
    assert answers_match("B) 45°", "B. 45 degrees", mode="choice")
    assert not answers_match("B or C", "B", mode="choice")
    assert not answers_match("3", "C", mode="choice")
    assert answers_match("  Yes  ", "yes", mode="exact")
    assert answers_match("left\n  of the  cube", "Left of the cube", mode="exact")
    assert not answers_match("yes.", "yes", mode="exact")
    # auto: an upper-case letter is a choice, a lower-case one is math (e.g. Euler's e or a variable)
    assert answers_match("(C)", "C") and answers_match("Answer: C", "C") and not answers_match("C or D", "C")
    assert R._is_choice_ground_truth("(C)") and not R._is_choice_ground_truth("c")
    assert answers_match("e", "e") and not answers_match("(B)", "e")


def test_math_mode():
    assert answers_match("π/2", "\\frac{\\pi}{2}", mode="math")
    assert answers_match("$\\dfrac{\\pi}{2}$", "\\pi/2", mode="math")
    assert answers_match("x + 1", "1+x", mode="math")
    assert answers_match("\\frac{\\sqrt{2}}{2}", "\\sqrt{2}/2", mode="math")
    assert not answers_match("\\frac{\\sqrt{3}}{2}", "\\sqrt{2}/2", mode="math")
    assert not answers_match("2\\sqrt{3}", "2", mode="math")
    # fallback: math_verify cannot parse these, the normalized string match decides
    assert answers_match("Left of the  cube", "left of the cube", mode="math")
    assert not answers_match("right of the cube", "left of the cube", mode="math")
    # over-long answers skip math_verify but still get the string comparison
    long = "x" * (R.MAX_MATH_CHARS + 1)
    assert answers_match(long, long, mode="math") and not answers_match(long, long + "y", mode="math")


def test_accuracy_mode_validation_and_bad_ground_truths():
    with pytest.raises(ValueError, match="unknown accuracy mode"):
        accuracy_reward(f"{T}<answer>3</answer>", "3", mode="fuzzy")
    for gt in (None, "", "  ", True, float("inf"), ["3"], "<answer></answer>"):
        assert accuracy_reward(f"{T}<answer>3</answer>", gt) == 0.0, gt
    assert accuracy_reward(f"{T}<answer>3</answer>", "3", mode="exact") == 1.0
    assert hard_format_result_reward(f"{T}<answer>B</answer>", "B", mode="choice") == 1.0


def test_math_verify_works_outside_the_main_thread():
    """The qwen2vl.md trap: math_verify's signal.alarm raises in non-main threads unless disabled."""
    out: dict = {}

    def body():
        try:
            out["v"] = accuracy_reward(f"{T}<answer>π/2</answer>", "\\frac{\\pi}{2}", mode="math")
        except BaseException as exc:  # noqa: BLE001
            out["v"] = exc

    thread = threading.Thread(target=body)
    thread.start()
    thread.join(30)
    assert out["v"] == 1.0


# ---------------------------------------------------------------------------------------------------------
# Huge and adversarial outputs
# ---------------------------------------------------------------------------------------------------------

MB = 1_000_000


def _timed(fn, *args):
    t = time.perf_counter()
    value = fn(*args)
    return value, time.perf_counter() - t


@pytest.mark.parametrize("name,completion,fmt,acc", [
    ("long_think_ok", "<think>" + "reasoning " * (MB // 10) + "</think><answer>3</answer>", 1, 1),
    ("many_think_tags", "<think>" * (MB // 7), 0, 0),
    ("many_answer_tags", "<think>x</think>" + "<answer>" * (MB // 8) + "3</answer>", 0, 0),
    ("alternating_tags", "<think></think><answer>3</answer>" * (MB // 33), 0, 0),
    ("unclosed_think", "<think>" + "a" * MB, 0, 0),
    ("spaces_between", "<think>x</think>" + " " * MB + "<answer>3</answer>", 1, 1),
    ("huge_numeric_answer", "<think>x</think><answer>" + "1" * MB + "</answer>", 1, 0),
    ("huge_thousands_answer", "<think>x</think><answer>" + "1,000" * 2000 + "x</answer>", 1, 0),
    ("huge_paren_answer", "<think>x</think><answer>" + "(" * 9000 + "B</answer>", 1, 0),
    ("over_cap", "<think>" + "a" * (R.MAX_COMPLETION_CHARS + 1) + "</think><answer>3</answer>", 0, 0),
])
def test_huge_outputs_are_fast(name, completion, fmt, acc):
    elapsed = 0.0
    for fn, expected in ((format_reward, fmt), (functools.partial(accuracy_reward, ground_truth="3"), acc),
                         (functools.partial(othink_reward, ground_truth="3"), fmt + acc)):
        value, dt = _timed(fn, completion)
        assert value == expected
        elapsed += dt
    assert elapsed < 1.0, f"{name}: {elapsed:.3f}s"


def test_choice_and_number_parsers_are_fast_on_adversarial_answers():
    for text in ("1,000" * 1999 + "x", "(" * 9999, "The answer is " * 700, "1" * 9000 + "e", "B" * 9999):
        _, dt = _timed(parse_number, text)
        _, dt2 = _timed(parse_choice, text)
        assert dt + dt2 < 0.5, text[:20]


# ---------------------------------------------------------------------------------------------------------
# The batch runner
# ---------------------------------------------------------------------------------------------------------

# Reward functions for the runner: module level, so the workers can unpickle them by reference.


def _raises(completion, answer):
    if completion == "bad":
        raise ValueError("boom")
    return 1.0


def _sleeps(completion, answer):
    if completion == "slow":
        time.sleep(60)
    return 1.0


def _dies(completion, answer):
    if completion == "die":
        os._exit(3)
    return 1.0


def _bad_values(completion, answer):
    return {"nan": float("nan"), "inf": math.inf, "str": "1.0", "none": None}.get(completion, 1.0)


def _allocates(completion, answer):
    if completion == "big":
        np.empty(64 * 2**30, np.uint8)  # virtual only; the address-space limit makes it raise MemoryError
    return 1.0


def _returns(completion, answer, value, delay=0.0):
    time.sleep(delay)
    return value


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.fixture(scope="module")
def runner():
    with RewardRunner(2, timeout_s=2.0) as r:
        yield r
    assert not any(_alive(pid) for pid in r.worker_pids)


def test_runner_matches_direct_calls(runner):
    completions = [row[1] for row in TABLE]
    answers = [row[2] for row in TABLE]
    rewards, stats = runner.score(othink_reward, completions, answers)
    expected = np.array([othink_reward(c, a) for c, a in zip(completions, answers)], np.float32)
    assert rewards.dtype == np.float32 and rewards.shape == (len(TABLE),)
    np.testing.assert_array_equal(rewards, expected)
    assert stats["n_errors"] == 0 and stats["n_timeouts"] == 0 and stats["n"] == len(TABLE)
    # options through fn_kwargs / functools.partial
    hard, _ = runner.score(hard_format_result_reward, completions, answers, fn_kwargs={"mode": "exact"})
    np.testing.assert_array_equal(hard, [hard_format_result_reward(c, a, mode="exact") for c, a in
                                         zip(completions, answers)])
    half, _ = runner.score(functools.partial(othink_reward, alpha=0.5), completions, answers)
    np.testing.assert_array_equal(half, [othink_reward(c, a, 0.5) for c, a in zip(completions, answers)])


def test_runner_errors_score_zero_and_are_counted(runner):
    rewards, stats = runner.score(_raises, ["ok", "bad", "ok", "bad", "ok"], [0] * 5)
    np.testing.assert_array_equal(rewards, [1, 0, 1, 0, 1])
    assert stats["n_errors"] == 2 and stats["n_timeouts"] == 0
    assert "ValueError: boom" in stats["first_error"]

    rewards, stats = runner.score(_bad_values, ["ok", "nan", "inf", "str", "none", "ok"], [0] * 6)
    np.testing.assert_array_equal(rewards, [1, 0, 0, 0, 0, 1])
    assert stats["n_errors"] == 4


def test_runner_timeout_kills_the_worker_and_recovers(runner):
    runner.score(_sleeps, ["ok", "ok"], [0, 0])  # the pool exists (this test may run alone)
    before = set(runner.worker_pids)
    rewards, stats = runner.score(_sleeps, ["ok", "slow", "ok", "ok"], [0] * 4, timeout_s=0.5)
    np.testing.assert_array_equal(rewards, [1, 0, 1, 1])
    assert stats["n_timeouts"] == 1 and stats["n_errors"] == 0 and stats["n_restarts"] == 1
    assert stats["wall_s"] < 5.0
    killed = before - set(runner.worker_pids)
    assert len(killed) == 1 and not _alive(killed.pop())
    # the next batch runs normally, on a full pool
    rewards, stats = runner.score(_sleeps, ["ok"] * 8, [0] * 8, timeout_s=5.0)
    np.testing.assert_array_equal(rewards, np.ones(8))
    assert stats["n_timeouts"] == 0 and stats["n_errors"] == 0
    assert len(runner.worker_pids) == 2


def test_runner_bounds_a_hanging_math_verify(runner):
    """A real hang: sympy on a power tower. math_verify's own timeouts are off; the runner's deadline holds."""
    bomb = "<think>x</think><answer>9^{9^{9^{9^{9}}}}</answer>"
    ok = "<think>x</think><answer>3</answer>"
    rewards, stats = runner.score(othink_reward, [bomb, ok], ["1", "3"], timeout_s=1.0)
    assert rewards[0] == 0.0 and stats["n_timeouts"] == 1
    assert rewards[1] == 2.0
    assert stats["wall_s"] < 6.0


def test_runner_survives_a_dying_worker(runner):
    rewards, stats = runner.score(_dies, ["ok", "die", "ok"], [0] * 3)
    np.testing.assert_array_equal(rewards, [1, 0, 1])
    assert stats["n_errors"] == 1 and "worker died" in stats["first_error"]
    rewards, stats = runner.score(_dies, ["ok"] * 4, [0] * 4)
    np.testing.assert_array_equal(rewards, np.ones(4))


def _slow_second_load(flag_path, value):
    try:  # the first worker to unpickle this wins the flag and loads at once; any other takes 0.3 s
        os.close(os.open(flag_path, os.O_CREAT | os.O_EXCL))
    except FileExistsError:
        time.sleep(0.3)
    return value


class _SlowSecondLoad:
    """Pickles as a call to `_slow_second_load`, so unpickling it in a worker is slow for all but one."""

    def __init__(self, flag_path, value):
        self.flag_path, self.value = str(flag_path), value

    def __reduce__(self):
        return _slow_second_load, (self.flag_path, self.value)


def _pause(completion, answer):
    time.sleep(0.2)
    return 1.0


def test_runner_never_uses_a_stale_function(tmp_path):
    """Regression: a worker still loading the previous call's function when that call ended must not run
    it in the next call (its late "loaded" ack once marked the *new* function as loaded)."""
    with RewardRunner(2) as r:
        rewards, _ = r.score(_pause, ["a", "b"], [0, 0])  # both workers up and busy once
        np.testing.assert_array_equal(rewards, [1, 1])
        slow = functools.partial(_returns, value=_SlowSecondLoad(tmp_path / "flag", 7.0))
        rewards, _ = r.score(slow, ["a"], [0])  # ends while the other worker is still loading `slow`
        np.testing.assert_array_equal(rewards, [7])
        # ~0.6 s of work: the other worker's late ack (~0.3 s) arrives mid-call and it takes samples
        rewards, stats = r.score(functools.partial(_returns, value=1.0, delay=0.06), ["a"] * 10, [0] * 10)
        np.testing.assert_array_equal(rewards, np.ones(10))
        assert stats["n_errors"] == 0


def test_runner_alternating_functions(runner):
    for k in range(40):
        value = float(k % 5)
        rewards, stats = runner.score(functools.partial(_returns, value=value), ["a"] * (1 + k % 3), [0] * (1 + k % 3))
        np.testing.assert_array_equal(rewards, value)
        assert stats["n_errors"] == 0


def test_runner_from_a_thread(runner):
    out: dict = {}

    def body():
        try:
            out["runner"] = runner.score(accuracy_reward, ["<answer>π/2</answer>", "<answer>1</answer>"],
                                         ["\\frac{\\pi}{2}", "2"])
            out["batch"] = score_batch(_sleeps, ["ok", "slow"], [0, 0], timeout_s=0.5, workers=1)
        except BaseException as exc:  # noqa: BLE001
            out["error"] = exc

    threads = [threading.Thread(target=body)]
    threads[0].start()
    threads[0].join(60)
    assert "error" not in out, out.get("error")
    rewards, stats = out["runner"]
    np.testing.assert_array_equal(rewards, [1, 0])
    rewards, stats = out["batch"]
    np.testing.assert_array_equal(rewards, [1, 0])
    assert stats["n_timeouts"] == 1
    reward_runner.close_default_runner()


def test_runner_concurrent_threads_share_it(runner):
    results = [None] * 3

    def body(k):
        results[k] = runner.score(format_reward, [f"<think>{k}</think><answer>{k}</answer>", "x"], [0, 0])

    threads = [threading.Thread(target=body, args=(k,)) for k in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for rewards, _ in results:
        np.testing.assert_array_equal(rewards, [1, 0])


def test_runner_api_errors_and_edge_cases(runner):
    rewards, stats = runner.score(format_reward, [], [])
    assert rewards.shape == (0,) and stats["n"] == 0
    with pytest.raises(ValueError, match="answers"):
        runner.score(format_reward, ["a", "b"], ["a"])
    with pytest.raises(TypeError, match="picklable"):
        runner.score(lambda c, a: 1.0, ["a"], ["a"])
    with pytest.raises(ValueError):
        RewardRunner(2, start_method="fork")


def test_inline_runner_for_unpicklable_functions():
    with RewardRunner(0) as inline:
        rewards, stats = inline.score(lambda c, a: 1.0 / int(c), ["1", "0", "2"], [0] * 3)
        np.testing.assert_allclose(rewards, [1.0, 0.0, 0.5])
        assert stats["n_errors"] == 1 and "ZeroDivisionError" in stats["first_error"]
        rewards, stats = inline.score(lambda c, a: time.sleep(0.2) or 1.0, ["a", "b"], [0, 0], timeout_s=0.1)
        np.testing.assert_array_equal(rewards, [0, 0])
        assert stats["n_timeouts"] == 2


def test_runner_memory_limit():
    with RewardRunner(1, max_memory_mb=4096) as small:
        rewards, stats = small.score(_allocates, ["ok", "big", "ok"], [0] * 3)
        np.testing.assert_array_equal(rewards, [1, 0, 1])
        assert stats["n_errors"] == 1 and "MemoryError" in stats["first_error"]


def test_spawn_start_method():
    with RewardRunner(1, start_method="spawn", warmup=False) as r:
        rewards, stats = r.score(_raises, ["ok", "bad"], [0, 0])
        np.testing.assert_array_equal(rewards, [1, 0])
        assert stats["n_errors"] == 1


def test_unloadable_function_raises_clearly(runner):
    """A systemic failure (the function cannot be loaded in the workers) raises instead of scoring 0s."""
    with pytest.raises(RuntimeError, match="could not be loaded"):
        runner.score(functools.partial(_returns, value=_Unloadable()), ["a"], [0])
    rewards, _ = runner.score(_raises, ["ok"], [0])  # and the runner still works afterwards
    assert rewards[0] == 1.0


def _fail_to_load():
    raise ImportError("no such module in the worker")


class _Unloadable:
    def __reduce__(self):
        return _fail_to_load, ()


def test_runner_close():
    r = RewardRunner(1)
    rewards, _ = r.score(format_reward, ["<think></think><answer>1</answer>"], [0])
    assert rewards[0] == 1.0
    pids = r.worker_pids
    assert pids and all(_alive(p) for p in pids)
    r.close()
    r.close()  # idempotent
    assert not any(_alive(p) for p in pids)
    with pytest.raises(RuntimeError, match="closed"):
        r.score(format_reward, ["x"], [0])
