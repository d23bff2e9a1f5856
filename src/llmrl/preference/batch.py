"""Tokenised pairs -> padded tensors, and the sequence log-probs every preference loss reads.

Notation: P pairs in a batch; L = prompt + response columns; T response columns. A batch holds 2P rows:
rows 0..P-1 are the chosen responses, rows P..2P-1 the rejected ones, each after its prompt, in the layout
of `llmrl.rollout.types.Rollout`:

    [pad pad p0 p1 p2 | r0 r1 r2 pad pad]
     <-- left-padded -> <- right-padded ->
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from llmrl.compute.logprobs import response_logprobs
from llmrl.rollout.sampler import left_pad

Encoded = tuple[list[int], list[int], list[int]]     # (prompt_ids, chosen_ids, rejected_ids) from `encode_pair`


@dataclass(frozen=True)
class PairBatch:
    input_ids: torch.Tensor        # [2P, L] long: chosen rows, then rejected rows
    attention_mask: torch.Tensor   # [2P, L] long
    response_mask: torch.Tensor    # [2P, T] float, 1 on response tokens (EOS included)

    @property
    def num_pairs(self) -> int:
        return self.input_ids.shape[0] // 2


def collate_pairs(encoded: list[Encoded], pad_id: int) -> PairBatch:
    """P tokenised pairs -> one PairBatch of 2P rows."""
    prompts = [p for p, _, _ in encoded] * 2
    responses = [c for _, c, _ in encoded] + [r for _, _, r in encoded]
    prompt_ids, prompt_mask = left_pad(prompts, pad_id)                               # [2P, P_len]
    T = max(len(r) for r in responses)
    response_ids = torch.full((len(responses), T), pad_id, dtype=torch.long)          # [2P, T]
    response_mask = torch.zeros((len(responses), T))
    for i, r in enumerate(responses):
        response_ids[i, :len(r)] = torch.tensor(r, dtype=torch.long)
        response_mask[i, :len(r)] = 1.0
    return PairBatch(input_ids=torch.cat([prompt_ids, response_ids], 1),
                     attention_mask=torch.cat([prompt_mask, response_mask.long()], 1),
                     response_mask=response_mask)


def truncate_pair(encoded: Encoded, max_length: int) -> Encoded:
    """Cut each response's tail so that prompt + response fits in `max_length` tokens (the prompt is kept whole)."""
    prompt, chosen, rejected = encoded
    room = max_length - len(prompt)
    if room < 1:
        raise ValueError(f"a prompt of {len(prompt)} tokens leaves no room for a response within max_length "
                         f"{max_length}")
    return prompt, chosen[:room], rejected[:room]


def sequence_logps(model, batch: PairBatch, *, autocast_dtype: torch.dtype | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of log pi(y_t | x, y_<t) over each row's response tokens [2P], response lengths [2P])."""
    T = batch.response_mask.shape[1]
    with torch.autocast("cpu", dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
        logp, _ = response_logprobs(model, batch.input_ids, batch.attention_mask, T, with_entropy=False)  # [2P, T]
    mask = batch.response_mask.bool()
    logp = torch.where(mask, logp.float(), torch.zeros_like(logp, dtype=torch.float32))   # padding adds exactly 0
    return logp.sum(-1), batch.response_mask.sum(-1)


def pair_logps(model, batch: PairBatch, *, autocast_dtype: torch.dtype | None = None, per_token_mean: bool = False
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen [P], rejected [P]) sequence log-probs: sums over response tokens, or per-token means if asked."""
    total, lengths = sequence_logps(model, batch, autocast_dtype=autocast_dtype)      # [2P], [2P]
    if per_token_mean:
        total = total / lengths.clamp(min=1)
    return total[:batch.num_pairs], total[batch.num_pairs:]
