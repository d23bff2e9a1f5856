"""Held-out evaluation: greedy responses to held-out prompts, scored by the task's own checker.

`collect` is the rollout collector (`collect_rollout`, or `collect_episodes` with its tools bound for a
multi-turn tool task); both take the same arguments and return a `Rollout`.
"""

from __future__ import annotations

from collections import Counter
from typing import Callable

import torch

from llmrl.data.tasks import answer_key, full_credit
from llmrl.rewards import score
from llmrl.rewards.extract import extract_answer
from llmrl.rollout.collect import collect_rollout


@torch.no_grad()
def evaluate(
    model,
    tokenizer,
    examples: list,
    *,
    max_new_tokens: int,
    batch_size: int = 64,
    chat_template: bool = True,
    system_prompt: str | None = None,
    autocast_dtype: torch.dtype | None = None,
    reference=None,
    collect: Callable = collect_rollout,
    progress: bool = False,
) -> dict:
    """Greedy decode each held-out example once. Returns accuracy (mean `correct` reward: a task whose checker gives
    partial credit, such as reasoning-gym's letter_counting or spell_backward, counts it), `exact` (the share of
    examples given full credit, which is the accuracy where the checker says only right or wrong), mean response length
    (chosen tokens), the exact KL(policy || reference) summed over the greedy responses' tokens when a reference
    is given, the mean tool calls per episode with tools, the first few samples, and how often each answer was given
    and each reference answer occurs (`collapse_stats` reads them).
    `progress`: a bar over the examples with the accuracy so far."""
    from tqdm.auto import tqdm

    from llmrl.compute.logprobs import response_kl
    from llmrl.compute.batches import trim

    correct, lengths, kls, calls, samples = [], [], [], [], []
    given, answers = Counter(), Counter()
    bar = tqdm(total=len(examples), desc="evaluating", disable=not progress, dynamic_ncols=True)
    for start in range(0, len(examples), batch_size):
        batch = examples[start:start + batch_size]
        r = collect(model, tokenizer, batch, group_size=1, max_new_tokens=max_new_tokens, temperature=0.0,
                    chat_template=chat_template, system_prompt=system_prompt, autocast_dtype=autocast_dtype)
        result = score(r.completions, r.examples, [("correct", 1.0, {})])
        correct.append(result.total)
        lengths.append(r.response_lengths)
        if "tool_calls" in r.extras:
            calls.append(r.extras["tool_calls"].float())
        if reference is not None:
            t = trim(r)
            with torch.autocast(t.input_ids.device.type, dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
                kl = response_kl(model, reference, t.input_ids, t.attention_mask, t.response_mask.shape[1])
            kls.append((kl * t.response_mask).sum(-1))                      # [n] exact KL over the chosen tokens
        given.update(answer_counts(extract_answer(c) for c in r.completions))
        answers.update(answer_counts(str(ex.answer) for ex in r.examples))
        for c, ex, ok in zip(r.completions, r.examples, result.total.tolist()):
            if len(samples) < 8:
                samples.append({"prompt": ex.prompt, "answer": ex.answer, "completion": c, "correct": ok})
        bar.set_postfix(acc=f"{float(torch.cat(correct).mean()):.3f}")
        bar.update(len(batch))
    bar.close()
    scores = torch.cat(correct)                                                # [n] in [0, 1]
    out = {
        "accuracy": float(scores.mean()),
        "exact": float(torch.tensor([full_credit(x) for x in scores.tolist()]).mean()),
        "response_length": float(torch.cat(lengths).float().mean()),
        "n": len(examples),
        "samples": samples,
        "given_counts": given,
        "answer_counts": answers,
    }
    if kls:
        out["kl_to_ref"] = float(torch.cat(kls).mean())
    if calls:
        out["tool_calls"] = float(torch.cat(calls).mean())
    return out


def answer_counts(answers) -> Counter:
    """How often each answer occurs, white space collapsed and case folded (`Answer: Yes`, `Answer:  yes` are one);
    a None (a response that gives no answer) is not counted."""
    return Counter(answer_key(a) for a in answers if a is not None)


def collapse_stats(ev: dict) -> dict:
    """Tells a learned task from a collapsed policy, from an evaluation's counts: `top_answer_share`, the share of
    the prompts whose response gives the commonest answer (`extract_answer`: the `Answer:` line, else the last
    number; 1.0: one answer to every prompt, however it is worded), and `constant_answer_accuracy`, the share of the
    commonest reference answer (what giving it to every prompt would score: syllogism's `Yes`, 0.72)."""
    n = sum(ev["answer_counts"].values())                  # every prompt has a reference answer
    if not n:
        return {"top_answer_share": None, "constant_answer_accuracy": None}
    return {"top_answer_share": max(ev["given_counts"].values(), default=0) / n,
            "constant_answer_accuracy": max(ev["answer_counts"].values()) / n}
