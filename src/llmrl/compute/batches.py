"""A rollout's rows through a model, micro-batch by micro-batch: the trimming, the micro-batch split and the
no-gradient forwards (log-probs of the reference or of pi_old, a critic's values) that the recipe's stages and the
update share. The rollout is any `llmrl.rollout.Rollout` (read through its fields: input_ids, attention_mask,
response_mask, prompt_len, select, with_)."""

from __future__ import annotations

import torch

from llmrl.compute.logprobs import policy_logprobs
from llmrl.compute.settings import Execution


def trim(rollout):
    """Drop prompt columns that are padding in every row and response columns past the longest response."""
    T_used = int(rollout.response_mask.sum(0).nonzero().max()) + 1 if rollout.response_mask.any() else 1
    P = rollout.prompt_len
    first = int(rollout.attention_mask[:, :P].sum(0).nonzero().min()) if P else 0
    keep = lambda x: None if x is None else x[:, :T_used]  # noqa: E731
    return rollout.with_(
        input_ids=rollout.input_ids[:, first:P + T_used], attention_mask=rollout.attention_mask[:, first:P + T_used],
        response_mask=rollout.response_mask[:, :T_used], logp_old=rollout.logp_old[:, :T_used],
        logp_ref=keep(rollout.logp_ref), values=keep(rollout.values), step_ids=keep(rollout.step_ids),
        is_weight=keep(rollout.is_weight), teacher_logp_all=keep(rollout.teacher_logp_all),
    )


def micro_batches(rows: torch.Tensor, rollout, max_rows: int, max_tokens: int | None) -> list[torch.Tensor]:
    """Split `rows` [n] (in order) into micro-batches of at most `max_rows` rows whose trimmed forward,
    rows x (longest prompt + longest response), stays within `max_tokens` (None: no token bound). A row longer
    than `max_tokens` goes alone. Activation memory grows with those tokens, not with the row count: long
    multi-turn prompts need fewer rows per pass than short ones."""
    if max_tokens is None:
        return list(rows.split(max_rows))
    P = rollout.prompt_len
    prompt_len = rollout.attention_mask[rows, :P].sum(-1).tolist()     # [n] real prompt tokens
    resp_len = rollout.attention_mask[rows, P:].sum(-1).tolist()       # [n] response (and observation) tokens
    out, start, p_max, r_max = [], 0, 0, 0
    for i in range(len(rows)):
        p, r = max(p_max, prompt_len[i]), max(r_max, resp_len[i])
        if i > start and ((i - start + 1) * (p + r) > max_tokens or i - start == max_rows):
            out.append(rows[start:i])
            start, p, r = i, prompt_len[i], resp_len[i]
        p_max, r_max = p, r
    if len(rows):
        out.append(rows[start:])
    return out


def micro_batches_of(rows: torch.Tensor, rollout, ex: Execution) -> list[torch.Tensor]:
    """`micro_batches` with the execution settings' bounds."""
    return micro_batches(rows, rollout, ex.micro_batch_size, ex.micro_batch_tokens)


@torch.no_grad()
def batched_logprobs(model, rollout, ex: Execution) -> torch.Tensor:
    """logp [N, T] of every response under `model` at `ex.temperature`, without gradient, micro-batch by
    micro-batch (padding-free in packs of at most `ex.pack_tokens` tokens when set: compute/packing.py)."""
    T = rollout.response_mask.shape[1]
    out = []
    for idx in micro_batches_of(torch.arange(len(rollout.completions), device="cpu"), rollout, ex):
        r = trim(rollout.select(idx))
        with ex.autocast():
            lp, _ = policy_logprobs(model, r.input_ids, r.attention_mask, r.response_mask.shape[1],
                                    temperature=ex.temperature, with_entropy=False, pack_tokens=ex.pack_tokens,
                                    chunk=ex.head_chunk)
        out.append(torch.nn.functional.pad(lp.float(), (0, T - lp.shape[1])))
    return torch.cat(out) * rollout.response_mask


@torch.no_grad()
def batched_full_logprobs(model, rollout, ex: Execution) -> torch.Tensor:
    """log pi(. | s_t) [N, T, V] fp32 over the whole vocabulary at every response position under `model`, without
    gradient, micro-batch by micro-batch (0 at padding). N x T x V x 4 bytes: 32 rows of 32 tokens over SmolLM2's
    49,152 tokens take 201 MB."""
    N, T = rollout.response_mask.shape
    out = None
    for idx in micro_batches_of(torch.arange(N, device="cpu"), rollout, ex):
        r = trim(rollout.select(idx))
        t = r.response_mask.shape[1]
        with ex.autocast():
            _, _, logp_all = policy_logprobs(model, r.input_ids, r.attention_mask, t, temperature=ex.temperature,
                                             with_entropy=False, pack_tokens=ex.pack_tokens, full=True)   # [M, V]
        if out is None:
            out = torch.zeros(N, T, logp_all.shape[-1])
        block = torch.zeros(len(idx), t, logp_all.shape[-1])
        block[r.attention_mask[:, -t:].bool()] = logp_all.float()
        out[idx, :t] = block
    return out


@torch.no_grad()
def batched_values(critic, rollout, ex: Execution) -> torch.Tensor:
    """V(s_t) [N, T] of every response position under `critic`, without gradient."""
    T = rollout.response_mask.shape[1]
    out = []
    for idx in micro_batches_of(torch.arange(len(rollout.completions), device="cpu"), rollout, ex):
        r = trim(rollout.select(idx))
        with ex.autocast():
            v = critic(r.input_ids, r.attention_mask, r.response_mask.shape[1])
        out.append(torch.nn.functional.pad(v.float(), (0, T - v.shape[1])))
    return torch.cat(out) * rollout.response_mask
