"""Reward estimates where the goal cannot be computed: a trained reward model, an LLM judge, and the
Monte-Carlo average of a stochastic scorer (the seed's "Reward Estimate Approaches").

All three share the reward registry's one signature, `fn(completions, examples, **options) -> list[float]`.
Models are loaded once per path and kept (a run scores every step with the same one).
"""

from __future__ import annotations

import functools
import re

import torch

from llmrl.rewards.functions import REWARDS

JUDGE_RUBRIC = (
    "You are grading an answer.\nQuestion: {prompt}\nReference answer: {answer}\nStudent answer: {completion}\n"
    "Is the student's final answer correct? Reply with a single score from 0 (wrong) to {scale} (correct)."
)


@functools.lru_cache(maxsize=4)
def _reward_model(path: str):
    from llmrl.preference.rm import load_reward_model

    model, tokenizer = load_reward_model(path)
    return model.eval().requires_grad_(False), tokenizer


@REWARDS.register("reward_model")
def reward_model(completions: list[str], examples: list, *, path: str, batch_size: int = 16) -> list[float]:
    """r(prompt, completion) from a Bradley-Terry reward model (`llmrl rm`, or any sequence-classification
    checkpoint with one label)."""
    from llmrl.preference.rm import reward_model_scores

    model, tokenizer = _reward_model(path)
    with torch.no_grad():
        scores = reward_model_scores(model, tokenizer, [ex.prompt for ex in examples], completions,
                                     batch_size=batch_size)
    return scores.float().tolist()


@functools.lru_cache(maxsize=2)
def _judge_model(name: str):
    from llmrl.models import load_model

    model, tokenizer = load_model(name)
    return model.eval().requires_grad_(False), tokenizer


def parse_score(text: str, scale: float) -> float:
    """The first number in the judge's reply, clipped to [0, scale] and divided by it; NaN when there is none
    (the reward stage counts NaN as a failure and scores the sample 0)."""
    m = re.search(r"-?\d+(?:\.\d+)?", text)
    return float("nan") if m is None else min(max(float(m.group()), 0.0), scale) / scale


@REWARDS.register("judge")
def judge(completions: list[str], examples: list, *, model: str = "smollm2-135m-instruct",
          rubric: str = JUDGE_RUBRIC, scale: float = 10.0, max_new_tokens: int = 8,
          temperature: float = 0.0, seed: int | None = None) -> list[float]:
    """LLM-as-judge: the rubric prompt filled with the question, reference answer and completion, sent to a local
    model; its parsed score / scale is the reward. With temperature > 0 the judge is stochastic (see `monte_carlo`)."""
    from llmrl.rollout.collect import collect_rollout
    from llmrl.data import Example

    judge_model, tokenizer = _judge_model(model)
    prompts = [Example(rubric.format(prompt=ex.prompt, answer=ex.answer, completion=c, scale=int(scale)), "")
               for c, ex in zip(completions, examples)]
    gen = None if seed is None else torch.Generator().manual_seed(seed)
    r = collect_rollout(judge_model, tokenizer, prompts, group_size=1, max_new_tokens=max_new_tokens,
                        temperature=temperature, generator=gen)
    return [parse_score(text, scale) for text in r.completions]


@REWARDS.register("monte_carlo")
def monte_carlo(completions: list[str], examples: list, *, of: str, samples: int = 4, options: dict | None = None) -> list[float]:
    """The mean of `samples` calls of a stochastic or expensive scorer `of` (e.g. a judge sampling at
    temperature > 0): a Monte-Carlo estimate of its expected score. A call's NaN makes that sample's mean NaN."""
    fn = REWARDS.get(of)
    if fn is monte_carlo:
        raise ValueError("monte_carlo of monte_carlo")
    runs = torch.tensor([[float(v) for v in fn(completions, examples, **(options or {}))] for _ in range(samples)])
    return runs.mean(0).tolist()
