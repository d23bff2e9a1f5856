"""Monte-Carlo values from branched rollouts (VinePPO, Kazemnejad et al. 2024, sec. 4).

From each reasoning-step boundary of each sampled response, K continuations are sampled with the same
sampler and scored with the same reward (`score`: texts, examples -> rewards [n]); their mean reward is V(prefix). The value is written at the
first token of the step that starts there — the layout the `vineppo` credit estimator reads.
Cost: one generation of K samples per step boundary (reported as `mc_continuations`, `mc_time`).
"""

from __future__ import annotations

import time
from typing import Callable

import torch

from llmrl.rollout.collect import stop_ids
from llmrl.rollout.sampler import generate
from llmrl.rollout.types import Rollout


@torch.no_grad()
def monte_carlo_values(
    model,
    tokenizer,
    rollout: Rollout,
    boundaries: list[list[int]],     # per row, the response positions where a step starts (credit.step_boundaries)
    score: Callable,                 # (texts, examples) -> rewards [n]: the outcome reward of the recipe
    *,
    samples: int,                    # K continuations per boundary
    max_new_tokens: int,             # response budget; a continuation gets what is left of it
    temperature: float,
    top_p: float = 1.0,
    batch_prefixes: int = 16,
    autocast_dtype=None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, dict]:
    """Returns (values [N, T] with V(before step s) at the first token of each step s, 0 elsewhere; stats)."""
    t0 = time.perf_counter()
    P = rollout.prompt_len
    values = torch.zeros_like(rollout.response_mask)
    jobs = []                                                       # (row, boundary t, prefix token ids)
    for i, starts in enumerate(boundaries):
        prompt = rollout.input_ids[i, :P][rollout.attention_mask[i, :P].bool()].tolist()
        response = rollout.input_ids[i, P:].tolist()
        for t in starts:
            jobs.append((i, t, prompt + response[:t]))
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(jobs), batch_prefixes):
            chunk = jobs[start:start + batch_prefixes]
            budget = max(1, max_new_tokens - min(t for _, t, _ in chunk))
            s = generate(model, [ids for _, _, ids in chunk], group_size=samples, max_new_tokens=budget,
                         temperature=temperature, top_p=top_p, stop_ids=stop_ids(tokenizer),
                         pad_id=tokenizer.pad_token_id, generator=generator, autocast_dtype=autocast_dtype)
            cont = s.response_ids.masked_fill(s.response_mask == 0, tokenizer.pad_token_id)
            texts, examples = [], []
            for k, (i, t, _) in enumerate(chunk):
                head = rollout.input_ids[i, P:P + t].tolist()
                for g in range(samples):
                    texts.append(tokenizer.decode(head + cont[k * samples + g].tolist(), skip_special_tokens=True))
                    examples.append(rollout.examples[i])
            means = score(texts, examples).view(len(chunk), samples).mean(-1)   # [jobs]
            for (i, t, _), v in zip(chunk, means.tolist()):
                values[i, t] = v
    finally:
        model.train(was_training)
    return values, {"mc_boundaries": len(jobs), "mc_continuations": len(jobs) * samples,
                    "mc_time": time.perf_counter() - t0}
