"""Reward estimates where the goal cannot be computed: a trained reward model, an LLM judge, and the
Monte-Carlo average of a stochastic scorer (the seed's "Reward Estimate Approaches").

All three share the reward registry's one signature, `fn(completions, examples, **options) -> list[float]`.
Models are loaded once per path and kept (a run scores every step with the same one).

Learned-reward inference lives here: `reward_model_scores` (a Bradley-Terry reward model, `llmrl rm`) and
`prm_step_scores` (a process reward model, `llmrl prm`; the `prm` step reward of `llmrl.rewards.process`), with
the prompt and response encoding their training uses too (`llmrl.train.rm`, `llmrl.train.prm`), so that a model is
scored on exactly the tokens it was trained on. Models, the sampler and transformers are imported where they are
used, so that importing `llmrl.rewards` stays light.
"""

from __future__ import annotations

import functools
import re

import torch

from llmrl.rewards.functions import REWARDS

Messages = list[dict]

JUDGE_RUBRIC = (
    "You are grading an answer.\nQuestion: {prompt}\nReference answer: {answer}\nStudent answer: {completion}\n"
    "Is the student's final answer correct? Reply with a single score from 0 (wrong) to {scale} (correct)."
)


# ----------------------------------------------------------------------------- encoding

def encode_any_prompt(tokenizer, prompt: str | Messages, chat_template: bool = True, *,
                      system_prompt: str | None = None) -> list[int]:
    """A text prompt (one user message) or the conversation so far -> prompt ids ending in the generation prompt."""
    from llmrl.rollout.collect import encode_prompt

    if isinstance(prompt, str):
        return encode_prompt(tokenizer, prompt, chat_template=chat_template, system_prompt=system_prompt)
    if not chat_template:
        raise ValueError("a chat-message prompt needs chat_template=True")
    if system_prompt and prompt[0]["role"] != "system":
        prompt = [{"role": "system", "content": system_prompt}, *prompt]
    return list(tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=False))


def encode_response(tokenizer, response: str | Messages) -> list[int]:
    """Response text (or one assistant message) -> its token ids + EOS."""
    text = response if isinstance(response, str) else response[0]["content"]
    return tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]


def encode_steps(tokenizer, prompt, steps: list[str], *, chat_template: bool = True,
                 system_prompt: str | None = None) -> tuple[list[int], list[int]]:
    """(prompt + step token ids, index of each step's last token; -1 for a step with no tokens). Each step is
    tokenised on its own."""
    ids = encode_any_prompt(tokenizer, prompt, chat_template, system_prompt=system_prompt)
    ends = []
    for text in steps:
        piece = tokenizer(text, add_special_tokens=False)["input_ids"] if text else []
        ids += piece
        ends.append(len(ids) - 1 if piece else -1)
    return ids, ends


# ----------------------------------------------------------------------------- scoring with learned models

@torch.no_grad()
def reward_model_scores(model, tokenizer, prompts: list, completions: list[str], *, chat_template: bool = True,
                        system_prompt: str | None = None, batch_size: int = 16,
                        autocast_dtype: torch.dtype | None = None) -> torch.Tensor:
    """r(prompt, completion) [N] for N (prompt, completion) pairs; prompts are text or chat messages."""
    from llmrl.models.heads import sequence_rewards
    from llmrl.rollout.sampler import left_pad

    if len(prompts) != len(completions):
        raise ValueError(f"reward_model_scores: {len(prompts)} prompts but {len(completions)} completions")
    was_training = model.training
    model.eval()
    seqs = [encode_any_prompt(tokenizer, p, chat_template, system_prompt=system_prompt) + encode_response(tokenizer, c)
            for p, c in zip(prompts, completions)]
    out = [sequence_rewards(model, *left_pad(seqs[s:s + batch_size], tokenizer.pad_token_id),
                            autocast_dtype=autocast_dtype) for s in range(0, len(seqs), batch_size)]
    model.train(was_training)
    return torch.cat(out) if out else torch.zeros(0)


@torch.no_grad()
def prm_step_scores(model, tokenizer, prompts: list, step_texts: list[list[str]], *, chat_template: bool = True,
                    system_prompt: str | None = None, batch_size: int = 16,
                    autocast_dtype: torch.dtype | None = None) -> list[list[float]]:
    """P(good) = sigmoid(logit at the step's last token) for each step of each (prompt, steps); NaN for an empty
    step. Prompts are text or chat messages, encoded as in training."""
    from llmrl.models.heads import step_logits

    if len(prompts) != len(step_texts):
        raise ValueError(f"prm_step_scores: {len(prompts)} prompts but {len(step_texts)} step lists")
    was_training = model.training
    model.eval()
    rows = [encode_steps(tokenizer, p, s, chat_template=chat_template, system_prompt=system_prompt)
            for p, s in zip(prompts, step_texts)]
    out = [torch.sigmoid(x).tolist() for s in range(0, len(rows), batch_size)
           for x in step_logits(model, rows[s:s + batch_size], tokenizer.pad_token_id, autocast_dtype=autocast_dtype)]
    model.train(was_training)
    return out


@functools.lru_cache(maxsize=4)
def _prm_model(path: str):
    from llmrl.models.heads import load_prm

    model, tokenizer = load_prm(path)
    return model.eval().requires_grad_(False), tokenizer


@functools.lru_cache(maxsize=4)
def _reward_model(path: str):
    from llmrl.models.heads import load_reward_model

    model, tokenizer = load_reward_model(path)
    return model.eval().requires_grad_(False), tokenizer


@REWARDS.register("reward_model")
def reward_model(completions: list[str], examples: list, *, path: str, batch_size: int = 16) -> list[float]:
    """r(prompt, completion) from a Bradley-Terry reward model (`llmrl rm`, or any sequence-classification
    checkpoint with one label)."""
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
