"""Padding-free (packed) backbone forward for the update phase.

A micro-batch's rows [N, P+T] carry left padding before the prompt and right padding after the response
(`rollout/types.py`). Packing drops every padding token and lays the rows' real tokens end to end in K
sequences of at most `pack_tokens` tokens each (first-fit decreasing), with position ids that restart at 0
for each row and no attention mask. transformers (>= 4.53, `masking_utils.find_packed_sequence_indices`)
reads the restarts as sequence boundaries and builds a block-causal mask, so no row sees another; the
positions equal the padded path's (cumsum of the mask - 1), so every real token's hidden state is the same.
The states that predict the response tokens are gathered back to [N, T, H] for the chunked LM head.

    rows [N, P+T]   [. . p p p r r .]      packs [K, L]   [p p p r r | q q r r r r]   positions [0 1 2 3 4 | 0 1 2 3 4 5]
                    [q q r r r r . .]                     [s s s s r | . .]           positions [0 1 2 3 4 | 0 1]

Cost: the matmuls see only real tokens (plus the tail of each pack's padding to the longest pack).
Attention over a pack of L tokens costs L^2: the mask blocks the cross-row pairs, but the CPU attention
kernel still computes them, so a pack of k rows of length l costs k^2 l^2 against k l^2 padded. Packs are
therefore kept short: `optim.pack_tokens` defaults to 256, a few rows of a short-answer task. The projections
and MLP of SmolLM2-135M cost ~7M FLOPs a token a layer, attention 4 L d = 0.6M at L = 256; measured
(bench/update_efficiency.py, 16 rows of 50-108 tokens, one thread), attention takes ~17% of the packed update's
time at 256, 128-384 are within 10% of each other, 512 and one pack of everything are ~30% slower.
"""

from __future__ import annotations

import torch


def first_fit_decreasing(lengths: list[int], capacity: int) -> list[list[int]]:
    """Row indices grouped into bins whose lengths sum to at most `capacity`, longest rows placed first;
    a row longer than `capacity` gets a bin of its own."""
    bins: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        for b in range(len(bins)):
            if lengths[i] <= room[b]:
                bins[b].append(i)
                room[b] -= lengths[i]
                break
        else:
            bins.append([i])
            room.append(capacity - lengths[i])
    return bins


def pack_layout(attention_mask: torch.Tensor, pack_tokens: int):
    """attention_mask [N, S] -> (source [K, L], positions [K, L], target [N, S]), all long.

    source: flat index into [N * S] of the token at each pack slot (slots past a pack's end hold index 0);
    positions: each row's tokens numbered from 0, the slots past a pack's end numbered from 0 too (a segment
    of their own, seen by no row); target: flat index into [K * L] of each real token's slot, K * L for padding."""
    N, S = attention_mask.shape
    real = attention_mask.bool()
    lengths = real.sum(-1).tolist()
    bins = first_fit_decreasing(lengths, pack_tokens)
    L = max(sum(lengths[i] for i in b) for b in bins)
    source = torch.zeros(len(bins), L, dtype=torch.long)
    positions = torch.zeros(len(bins), L, dtype=torch.long)
    target = torch.full((N, S), len(bins) * L, dtype=torch.long)
    for k, rows in enumerate(bins):
        start = 0
        for i in rows:
            cols = real[i].nonzero()[:, 0]                           # [n] the row's real tokens, in order
            n = len(cols)
            source[k, start:start + n] = i * S + cols
            positions[k, start:start + n] = torch.arange(n)
            target[i, cols] = k * L + start + torch.arange(n)
            start += n
        positions[k, start:] = torch.arange(L - start)
    return source, positions, target


def packed_response_hidden(backbone, input_ids: torch.Tensor, attention_mask: torch.Tensor, response_len: int, *,
                           pack_tokens: int) -> torch.Tensor:
    """input_ids, attention_mask [N, P+T] -> hidden [N, T, H] at the positions that predict the T response
    tokens, from one backbone pass over the packed real tokens. Padding positions get zeros."""
    T, S = response_len, input_ids.shape[1]
    source, positions, target = pack_layout(attention_mask.cpu(), pack_tokens)
    device = input_ids.device
    packed_ids = input_ids.flatten()[source.to(device)]                                    # [K, L]
    hidden = backbone(input_ids=packed_ids, position_ids=positions.to(device), attention_mask=None,
                      use_cache=False).last_hidden_state                                   # [K, L, H]
    flat = torch.cat([hidden.flatten(0, 1), hidden.new_zeros(1, hidden.shape[-1])])        # [K * L + 1, H]
    return flat[target[:, S - T - 1:S - 1].to(device)]                                     # [N, T, H]
