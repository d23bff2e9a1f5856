"""The optimisation phase of one RL step: epochs over shuffled minibatches of the rollout, each minibatch
split into micro-batches whose gradients accumulate, then one clipped optimizer step.

Micro-batching never changes the loss: every aggregation divides by counts of the whole minibatch
(`BatchCounts`), so the sum of micro-batch losses equals the minibatch loss.
"""

from __future__ import annotations

import time
from collections import defaultdict
from typing import Callable

import torch

from llmrl.objectives.logprobs import response_logprobs
from llmrl.objectives.policy import BatchCounts, ObjectiveOutput
from llmrl.rollout.types import Rollout


def trim(rollout: Rollout) -> Rollout:
    """Drop prompt columns that are padding in every row and response columns past the longest response."""
    T_used = int(rollout.response_mask.sum(0).nonzero().max()) + 1 if rollout.response_mask.any() else 1
    P = rollout.prompt_len
    first = int(rollout.attention_mask[:, :P].sum(0).nonzero().min()) if P else 0
    keep = lambda x: None if x is None else x[:, :T_used]  # noqa: E731
    return rollout.with_(
        input_ids=rollout.input_ids[:, first:P + T_used], attention_mask=rollout.attention_mask[:, first:P + T_used],
        response_mask=rollout.response_mask[:, :T_used], logp_old=rollout.logp_old[:, :T_used],
        logp_ref=keep(rollout.logp_ref), values=keep(rollout.values), step_ids=keep(rollout.step_ids),
    )


def policy_logprobs(model, rollout: Rollout, *, temperature: float, autocast_dtype, with_entropy=True, chunk=64):
    """(logp [n, T], entropy [n, T]) of the rollout's responses under `model` (with gradient if enabled)."""
    r = trim(rollout)
    T_used = r.response_mask.shape[1]
    with torch.autocast("cpu", dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
        logp, ent = response_logprobs(model, r.input_ids, r.attention_mask, T_used, temperature=temperature,
                                      chunk=chunk, with_entropy=with_entropy)
    pad = rollout.response_mask.shape[1] - T_used
    logp = torch.nn.functional.pad(logp.float(), (0, pad))
    ent = None if ent is None else torch.nn.functional.pad(ent.float(), (0, pad))
    return logp, ent


@torch.no_grad()
def batched_logprobs(model, rollout: Rollout, *, micro_batch_size: int, temperature: float, autocast_dtype) -> torch.Tensor:
    """logp [N, T] of every response under `model`, without gradient, micro-batch by micro-batch."""
    out = []
    for idx in torch.arange(len(rollout.completions)).split(micro_batch_size):
        lp, _ = policy_logprobs(model, rollout.select(idx), temperature=temperature, autocast_dtype=autocast_dtype,
                                with_entropy=False)
        out.append(lp)
    return torch.cat(out) * rollout.response_mask


def policy_update(
    model,
    optimizer: torch.optim.Optimizer,
    rollout: Rollout,
    advantages: torch.Tensor,             # [N, T]
    objective: Callable[..., ObjectiveOutput],
    *,
    epochs: int,
    minibatches: int,
    micro_batch_size: int,
    max_grad_norm: float,
    temperature: float,
    autocast_dtype,
    max_len: int,
    zero_advantage_is_zero_loss: bool,
    generator: torch.Generator | None = None,
) -> dict[str, float]:
    """Run the update; returns metrics averaged over micro-batches (and the last grad norm)."""
    N = advantages.shape[0]
    sums: dict[str, float] = defaultdict(float)
    reuse_detached = epochs == 1 and minibatches == 1    # on-policy, one pass: old policy == current policy
    logp_old = None if reuse_detached else batched_logprobs(
        model, rollout, micro_batch_size=micro_batch_size, temperature=temperature, autocast_dtype=autocast_dtype)
    for _ in range(epochs):
        order = torch.randperm(N, generator=generator) if minibatches > 1 else torch.arange(N)
        for mb in order.chunk(minibatches):
            counts = BatchCounts.of(rollout.response_mask[mb], max_len)
            if zero_advantage_is_zero_loss:   # rows with A = 0 everywhere add exactly zero gradient: skip their compute
                mb = mb[(advantages[mb] != 0).any(-1)]
            optimizer.zero_grad(set_to_none=True)
            mb_sums: dict[str, float] = defaultdict(float)
            for idx in mb.split(micro_batch_size) if len(mb) else ():
                part = rollout.select(idx)
                logp, entropy = policy_logprobs(model, part, temperature=temperature, autocast_dtype=autocast_dtype)
                out = objective(
                    logp, logp.detach() if logp_old is None else logp_old[idx], advantages[idx], part.response_mask,
                    counts, logp_ref=part.logp_ref, entropy=entropy)
                out.total.backward()
                for k, v in {**out.losses, **out.metrics}.items():   # each is a share of the minibatch value
                    mb_sums[k] += float(v.detach())
            # token-mean metrics were divided by all the minibatch's tokens; rescale to the rows actually computed
            active = float(rollout.response_mask[mb].sum()) if len(mb) else 0.0
            for k, v in mb_sums.items():
                sums[k] += v if k.startswith("loss_") or not active else v * counts.num_tokens / active
            if len(mb):
                sums["grad_norm"] += float(torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm))
                optimizer.step()
            sums["update_rows"] += len(mb)
    passes = epochs * minibatches
    return {k: v / passes for k, v in sums.items()}
