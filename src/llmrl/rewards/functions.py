"""Reward functions, by name. One signature for all, batched so learned models and judges fit later:

    fn(completions: list[str], examples: list[Example], **options) -> list[float]   # one float per completion

`score.score` calls them, weights them and contains their failures; a function here may simply raise.

Multi-turn episodes (rollout/episodes.py): the completion is the whole transcript, tool outputs included, and
each example carries the row's `Episode` (`episode_of(ex)`: tool calls, turns, errors, the final answer turn's
text). Functions that judge the answer read `answer_text`, so a number in a tool's output is never taken
for the model's answer.
"""

from __future__ import annotations

import re

from llmrl.data.tasks import Example, full_credit
from llmrl.registry import Registry
from llmrl.rewards.extract import extract_answer, last_boxed
from llmrl.rollout.types import episode_of

REWARDS = Registry("reward function")

# "Answer: <value>" at the start of a line, allowing markdown around it ("**Answer:** 42", "- Answer: 42").
_ANSWER_LINE = re.compile(r"^[\s*_#>-]*answer\s*\**\s*:[\s*$]*[^\s*$]", re.IGNORECASE | re.MULTILINE)


def answer_text(completion: str, example) -> str:
    """The text that states the answer: a multi-turn episode's final turn (the model's own words, after its last
    tool output; "" if it ended on a call), else the whole completion."""
    episode = episode_of(example)
    return completion if episode is None else (episode.answer or "")


@REWARDS.register("correct")
def correct(completions: list[str], examples: list[Example], *, partial: bool = True) -> list[float]:
    """The task's check of the extracted answer (1.0 right, 0.0 wrong, partial credit if the task gives it); for an
    environment episode (llmrl/envs), the environment's own reward.
    `partial=False` (`{name: correct, options: {partial: false}}`): exact match only: a check below 1.0 scores 0 (an
    environment's own reward is kept as it is).
    reasoning-gym's default scorer gives len(reference)/len(answer) when the reference is inside the answer, so
    `123456` earns 1/6 on every letter_counting prompt whose count is a digit from 1 to 6, and a run trained on
    that credit learns such strings (docs/benchmarks.md, `learning_bal`)."""
    scores = []
    for completion, ex in zip(completions, examples, strict=True):
        episode = episode_of(ex)
        if episode is not None and episode.reward is not None:     # an environment episode: its own reward
            scores.append(float(episode.reward))
            continue
        pred = extract_answer(answer_text(completion, ex))
        value = 0.0 if pred is None else float(ex.check(pred, ex))
        scores.append(value if partial else full_credit(value))
    return scores


@REWARDS.register("tool_efficiency")
def tool_efficiency(completions: list[str], examples: list[Example], *, free_calls: int = 1,
                    cost_per_call: float = 0.25, cost_per_error: float = 0.0) -> list[float]:
    """Success discounted by tool use: correct * max(0, 1 - cost_per_call * max(0, calls - free_calls)
    - cost_per_error * errors).

    1 for a right answer with at most `free_calls` calls, `cost_per_call` less for each call beyond them (and
    `cost_per_error` less per call that returned an error), never below 0; a wrong answer scores 0 however few
    calls it made, so failing fast is never rewarded. A single-turn row counts 0 calls (its score is `correct`'s).
    """
    if free_calls < 0 or cost_per_call < 0 or cost_per_error < 0:
        raise ValueError("tool_efficiency: free_calls, cost_per_call and cost_per_error must be >= 0")
    scores = []
    for solved, ex in zip(correct(completions, examples), examples, strict=True):
        episode = episode_of(ex)
        calls, errors = (episode.tool_calls, episode.tool_errors) if episode else (0, 0)
        scores.append(solved * max(0.0, 1.0 - cost_per_call * max(0, calls - free_calls) - cost_per_error * errors))
    return scores


@REWARDS.register("format")
def format_(completions: list[str], examples: list[Example], *, pattern: str | None = None) -> list[float]:
    """1.0 if the completion (its final turn, in a multi-turn episode) states its answer as asked (an
    `Answer: <value>` line or a `\\boxed{}`), else 0.0.

    pattern: a regular expression that must match (re.search) instead.
    """
    texts = [answer_text(c, ex) for c, ex in zip(completions, examples, strict=True)]
    if pattern is not None:
        regex = re.compile(pattern)
        return [1.0 if regex.search(t) else 0.0 for t in texts]
    return [1.0 if _ANSWER_LINE.search(t) or last_boxed(t) else 0.0 for t in texts]


@REWARDS.register("length_penalty")
def length_penalty(completions: list[str], examples: list[Example], *, target_chars: int = 200) -> list[float]:
    """-len(completion) / target_chars, clipped to [-1, 0]: a gentle push towards short answers."""
    if target_chars <= 0:
        raise ValueError(f"length_penalty: target_chars must be > 0, got {target_chars}")
    return [max(-1.0, -len(c) / target_chars) for c in completions]
