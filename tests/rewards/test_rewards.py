"""Rewards: answer extraction, the built-in reward functions, and score()'s weighting and failure containment."""

import logging
import math

import pytest
import torch

from llmrl.data import Example
from llmrl.rewards import REWARDS, RewardResult, extract_answer, score


# ---------------------------------------------------------------- test-only reward functions

@REWARDS.register("test_rewards.length")
def _length(completions, examples, *, scale=1.0):
    return [scale * len(c) for c in completions]


@REWARDS.register("test_rewards.raises_on_bad")
def _raises_on_bad(completions, examples):
    if any("bad" in c for c in completions):
        raise RuntimeError("cannot score 'bad'")
    return [1.0] * len(completions)


@REWARDS.register("test_rewards.nan_on_odd")
def _nan_on_odd(completions, examples):
    return [math.nan if len(c) % 2 else 1.0 for c in completions]


@REWARDS.register("test_rewards.one_short")
def _one_short(completions, examples):
    return [1.0] * (len(completions) - 1)


@REWARDS.register("test_rewards.non_numbers")
def _non_numbers(completions, examples):
    return ["1.0", None, math.inf, torch.tensor(0.5)][: len(completions)]


# ---------------------------------------------------------------- extract_answer

@pytest.mark.parametrize("text, expected", [
    ("so the answer is \\boxed{42}.", "42"),
    ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),                      # nested braces
    ("first \\boxed{1}, finally \\boxed{ {2}+{3} }", "{2}+{3}"),      # the last box, contents stripped
    ("\\boxed{7} and then \\boxed{unclosed", "7"),                   # an unclosed box is skipped
    ("Answer: 42.", "42"),
    ("**Answer:** 42", "42"),
    ("**Answer**: $-3$.", "-3"),
    ("answer: 3.14.", "3.14"),
    ("ANSWER: Paris\nThanks!", "Paris"),
    ("Answer: 5\nwait, no.\nAnswer: 7", "7"),                       # the last Answer:
    ("Answer: 9 \\boxed{8}", "8"),                                    # a box wins over Answer:
    ("Answer:\nit is 12", "12"),                                      # empty Answer: line -> last number
    ("5 + 7 = 12, then 12 - 3 = 9 apples", "9"),
    ("x = -4", "-4"),
    ("10-4 is 6 but 10-4", "4"),                                      # subtraction is not a negative number
    ("the total is 1,234,567", "1234567"),
    ("pi is about 3.14159", "3.14159"),
    ("1,2,3", "3"),
    ("no numbers here", None),
    ("", None),
])
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


# ---------------------------------------------------------------- built-in reward functions

def ex(answer):
    return Example(prompt="q", answer=answer)


def test_correct():
    completions = ["... Answer: 12", "\\boxed{12.0}", "Answer: 13", "I don't know", "so 12"]
    assert REWARDS.get("correct")(completions, [ex("12")] * 5) == [1.0, 1.0, 0.0, 0.0, 1.0]


def test_correct_uses_the_examples_check():
    half = Example("q", "x", check=lambda pred, e: 0.5 if pred == "x" else 0.0)
    assert REWARDS.get("correct")(["Answer: x", "Answer: y", "nothing"], [half] * 3) == [0.5, 0.0, 0.0]


def test_correct_without_partial_credit_scores_only_exact_answers():
    half = Example("q", "x", check=lambda pred, e: {"x": 1.0, "xy": 0.5}.get(pred, 0.0))
    completions = ["Answer: x", "Answer: xy", "Answer: z"]
    assert REWARDS.get("correct")(completions, [half] * 3) == [1.0, 0.5, 0.0]
    assert REWARDS.get("correct")(completions, [half] * 3, partial=False) == [1.0, 0.0, 0.0]


def test_correct_without_partial_credit_stops_reasoning_gyms_substring_credit():
    """reasoning-gym scores an answer that contains the reference by len(ref)/len(answer): `123456` earns 1/6 on a
    count of 3. That credit is what a letter_counting run learned to game (docs/benchmarks.md, learning_bal)."""
    from llmrl.data.tasks import make_task

    task = make_task("reasoning_gym:letter_counting", options={})
    e = next(x for x in task.heldout(50) if len(x.answer) == 1 and x.answer in "123456")
    gamed, right = "Answer: 123456", f"Answer: {e.answer}"
    assert REWARDS.get("correct")([gamed, right], [e, e]) == pytest.approx([1 / 6, 1.0])
    assert REWARDS.get("correct")([gamed, right], [e, e], partial=False) == [0.0, 1.0]


def test_format():
    completions = ["work\nAnswer: 42", "**Answer:** 42", "\\boxed{42}", "the answer is 42", "Answer:", "\\boxed{}"]
    assert REWARDS.get("format")(completions, [ex("42")] * 6) == [1.0, 1.0, 1.0, 0.0, 0.0, 0.0]
    assert REWARDS.get("format")(["<a>1</a>", "Answer: 1"], [ex("1")] * 2, pattern=r"<a>\d+</a>") == [1.0, 0.0]


def test_length_penalty():
    got = REWARDS.get("length_penalty")(["", "x" * 50, "x" * 100, "x" * 500], [ex("1")] * 4, target_chars=100)
    assert got == [0.0, -0.5, -1.0, -1.0]


# ---------------------------------------------------------------- score

def test_score_weighted_total_and_unweighted_components():
    completions = ["Answer: 12", "Answer: 13", "\\boxed{12}"]
    terms = [("correct", 2.0, {}), ("format", 0.5, {}), ("test_rewards.length", -0.1, {"scale": 0.5})]
    result = score(completions, [ex("12")] * 3, terms)
    assert isinstance(result, RewardResult)
    lengths = [0.5 * len(c) for c in completions]
    assert result.components["correct"].tolist() == [1.0, 0.0, 1.0]
    assert result.components["format"].tolist() == [1.0, 1.0, 1.0]
    assert torch.allclose(result.components["test_rewards.length"], torch.tensor(lengths))
    expected = torch.tensor([2.0 * c + 0.5 * 1.0 - 0.1 * n for c, n in zip([1, 0, 1], lengths)])
    assert result.total.dtype == torch.float32 and result.total.shape == (3,)
    assert torch.allclose(result.total, expected, atol=1e-6, rtol=0)
    assert result.failures == {"correct": 0, "format": 0, "test_rewards.length": 0}


def test_score_contains_a_function_that_raises_on_one_sample(caplog):
    completions = ["good", "bad", "good"]
    with caplog.at_level(logging.WARNING, logger="llmrl.rewards"):
        result = score(completions, [ex("1")] * 3, [("test_rewards.raises_on_bad", 1.0, {}), ("format", 1.0, {})])
    assert result.components["test_rewards.raises_on_bad"].tolist() == [1.0, 0.0, 1.0]
    assert result.failures == {"test_rewards.raises_on_bad": 1, "format": 0}
    assert result.total.tolist() == [1.0, 0.0, 1.0]
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1
    assert "test_rewards.raises_on_bad" in warnings[0] and "RuntimeError: cannot score 'bad'" in warnings[0]


def test_score_nan_is_zero_and_counted():
    result = score(["ab", "abc", "abcd", "a"], [ex("1")] * 4, [("test_rewards.nan_on_odd", 3.0, {})])
    assert result.components["test_rewards.nan_on_odd"].tolist() == [1.0, 0.0, 1.0, 0.0]
    assert result.total.tolist() == [3.0, 0.0, 3.0, 0.0]
    assert result.failures["test_rewards.nan_on_odd"] == 2


def test_score_wrong_length_is_all_zero_and_counted(caplog):
    with caplog.at_level(logging.WARNING, logger="llmrl.rewards"):
        result = score(["a", "b", "c"], [ex("1")] * 3, [("test_rewards.one_short", 1.0, {})])
    assert result.components["test_rewards.one_short"].tolist() == [0.0, 0.0, 0.0]
    assert result.failures["test_rewards.one_short"] == 3
    assert "returned 2 values for 3 completions" in caplog.text


def test_score_non_numbers_are_zero_and_counted():
    result = score(list("abcd"), [ex("1")] * 4, [("test_rewards.non_numbers", 1.0, {})])
    assert result.components["test_rewards.non_numbers"].tolist() == [0.0, 0.0, 0.0, 0.5]  # a 0-d tensor is a number
    assert result.failures["test_rewards.non_numbers"] == 3


def test_score_errors_that_are_the_callers():
    with pytest.raises(KeyError, match="unknown reward function 'corect'; valid: .*correct"):
        score(["a"], [ex("1")], [("corect", 1.0, {})])
    with pytest.raises(ValueError, match="listed twice"):
        score(["a"], [ex("1")], [("format", 1.0, {}), ("format", 2.0, {})])
    with pytest.raises(ValueError, match="2 completions but 1 examples"):
        score(["a", "b"], [ex("1")], [("format", 1.0, {})])


def test_score_empty_batch():
    result = score([], [], [("correct", 1.0, {})])
    assert result.total.shape == (0,) and result.failures == {"correct": 0}
