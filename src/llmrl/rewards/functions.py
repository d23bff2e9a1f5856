"""Reward functions, by name. One signature for all, batched so learned models and judges fit later:

    fn(completions: list[str], examples: list[Example], **options) -> list[float]   # one float per completion

`score.score` calls them, weights them and contains their failures; a function here may simply raise.
"""

from __future__ import annotations

import re

from llmrl.data.tasks import Example
from llmrl.registry import Registry
from llmrl.rewards.extract import extract_answer, last_boxed

REWARDS = Registry("reward function")

# "Answer: <value>" at the start of a line, allowing markdown around it ("**Answer:** 42", "- Answer: 42").
_ANSWER_LINE = re.compile(r"^[\s*_#>-]*answer\s*\**\s*:[\s*$]*[^\s*$]", re.IGNORECASE | re.MULTILINE)


@REWARDS.register("correct")
def correct(completions: list[str], examples: list[Example]) -> list[float]:
    """The task's check of the extracted answer (1.0 right, 0.0 wrong, partial credit if the task gives it)."""
    scores = []
    for completion, ex in zip(completions, examples, strict=True):
        pred = extract_answer(completion)
        scores.append(0.0 if pred is None else float(ex.check(pred, ex)))
    return scores


@REWARDS.register("format")
def format_(completions: list[str], examples: list[Example], *, pattern: str | None = None) -> list[float]:
    """1.0 if the completion states its answer as asked (an `Answer: <value>` line or a `\\boxed{}`), else 0.0.

    pattern: a regular expression that must match (re.search) instead.
    """
    if pattern is not None:
        regex = re.compile(pattern)
        return [1.0 if regex.search(c) else 0.0 for c in completions]
    return [1.0 if _ANSWER_LINE.search(c) or last_boxed(c) else 0.0 for c in completions]


@REWARDS.register("length_penalty")
def length_penalty(completions: list[str], examples: list[Example], *, target_chars: int = 200) -> list[float]:
    """-len(completion) / target_chars, clipped to [-1, 0]: a gentle push towards short answers."""
    if target_chars <= 0:
        raise ValueError(f"length_penalty: target_chars must be > 0, got {target_chars}")
    return [max(-1.0, -len(c) / target_chars) for c in completions]
