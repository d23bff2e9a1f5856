"""Held-out evaluation: greedy responses to held-out prompts, scored by the task's own checker.

`collect` is the rollout collector (`collect_rollout`, or `collect_episodes` with its tools bound for a
multi-turn tool task); both take the same arguments and return a `Rollout`.
"""

from __future__ import annotations

from collections import Counter
from typing import Callable

import torch

from llmrl.rewards import score
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
    """Greedy decode each held-out example once. Returns accuracy (mean `correct` reward), mean response length
    (chosen tokens), the exact KL(policy || reference) summed over the greedy responses' tokens when a reference
    is given, the mean tool calls per episode with tools, the first few samples, and the counts of the distinct
    responses and reference answers (`collapse_stats` reads them).
    `progress`: a bar over the examples with the accuracy so far."""
    from tqdm.auto import tqdm

    from llmrl.compute.logprobs import response_kl
    from llmrl.compute.batches import trim

    correct, lengths, kls, calls, samples = [], [], [], [], []
    responses, answers = Counter(), Counter()
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
        responses.update(text_counts(r.completions))
        answers.update(text_counts(str(ex.answer) for ex in r.examples))
        for c, ex, ok in zip(r.completions, r.examples, result.total.tolist()):
            if len(samples) < 8:
                samples.append({"prompt": ex.prompt, "answer": ex.answer, "completion": c, "correct": ok})
        bar.set_postfix(acc=f"{float(torch.cat(correct).mean()):.3f}")
        bar.update(len(batch))
    bar.close()
    out = {
        "accuracy": float(torch.cat(correct).mean()),
        "response_length": float(torch.cat(lengths).float().mean()),
        "n": len(examples),
        "samples": samples,
        "response_counts": responses,
        "answer_counts": answers,
    }
    if kls:
        out["kl_to_ref"] = float(torch.cat(kls).mean())
    if calls:
        out["tool_calls"] = float(torch.cat(calls).mean())
    return out


def text_counts(texts) -> Counter:
    """How often each text occurs, with white space collapsed (`Answer:  Yes\n` and `Answer: Yes` are one)."""
    return Counter(" ".join(t.split()) for t in texts)


def collapse_stats(ev: dict) -> dict:
    """Tells a learned task from a collapsed policy, from an evaluation's counts: `top_response_share`, the share of
    the held-out prompts that got the single most common response (1.0: one response to every prompt), and
    `constant_answer_accuracy`, the share of the most common reference answer (what answering it to every prompt
    would score: syllogism's `Yes` scores 0.72). Responses and answers are compared with whitespace collapsed."""
    n = sum(ev["response_counts"].values())
    if not n:
        return {"top_response_share": None, "constant_answer_accuracy": None}
    return {"top_response_share": max(ev["response_counts"].values()) / n,
            "constant_answer_accuracy": max(ev["answer_counts"].values()) / n}
