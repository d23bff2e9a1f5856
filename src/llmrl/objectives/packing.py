"""Padding-free (packed) backbone forward for the update phase, with one copy of each shared prompt.

A micro-batch's rows [N, P+T] carry left padding before the prompt and right padding after the response
(`rollout/types.py`). Packing drops every padding token and lays the real tokens end to end in K sequences
of at most `pack_tokens` tokens each. Rows whose prompts are the same tokens (a GRPO group: one prompt, G
completions) share one copy of it: a segment is a prompt followed by several responses, each response
attending to the prompt and, causally, to itself only. Positions continue from the prompt in every response,
as in the padded path (cumsum of the mask - 1), so every real token's hidden state is the same.

    rows [N, P+T]   [p p p r r .]     one pack [1, 8]   [p p p r r s s s]     positions [0 1 2 3 4 3 4 5]
                    [p p p s s s]                         ^^^^^ ^^^ ^^^^^
                                                         prompt  row0  row1  (row1 sees p p p and s s s, not r r)

The states that predict the response tokens are gathered back to [N, T, H] for the chunked LM head; every row
of a segment reads the shared state of the last prompt token for its first response token, so in the backward
the gather sums their gradients into it.

Cost: the matmuls see each prompt once per segment. With a 51-token chat prompt and ~30-token answers (2-digit
addition, 8 completions a prompt) that is ~45% of the unshared tokens. Attention over a pack of L tokens costs
L^2: the mask blocks the pairs that must not see each other, but the CPU attention kernel still computes them,
so packs are kept short (`optim.pack_tokens`, default 256). A segment longer than a pack is split into several,
each with its own copy of the prompt.

Sharing needs an explicit attention mask, which transformers' "sdpa" and "eager" attention take; with another
attention (flash, flex) the rows are packed unshared, positions restarting at 0 for each row and no mask, which
transformers (>= 4.53, `masking_utils.find_packed_sequence_indices`) reads as sequence boundaries.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

MASKED_ATTENTION = ("sdpa", "eager")    # attention implementations that take a custom 4D mask


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


@dataclass
class PackLayout:
    source: torch.Tensor      # [K, L] flat index into [N * S] of the token in each slot (0 past a pack's end)
    positions: torch.Tensor   # [K, L] position id of each slot
    target: torch.Tensor      # [N, S] flat index into [K * L] of each real token's slot, K * L for padding
    segment: torch.Tensor     # [K, L] segment of each slot (a prompt and the responses that share it); -1 past the end
    owner: torch.Tensor       # [K, L] the row whose response fills the slot; -1 for a (shared) prompt slot
    shared: bool              # some segment holds more than one row

    def attention_mask(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """[K, 1, L, L]: query slot q sees key slot k <= q of its segment that is the prompt or its own row.
        Slots past a pack's end see only themselves. bool (True: attend), or additive in `dtype` (eager)."""
        L = self.segment.shape[1]
        seg, own = self.segment, self.owner
        causal = torch.ones(L, L, dtype=torch.bool).tril()
        same = seg[:, :, None] == seg[:, None, :]                                       # [K, L, L]
        visible = (own[:, None, :] == -1) | (own[:, :, None] == own[:, None, :])
        mask = same & visible & causal
        mask |= torch.eye(L, dtype=torch.bool)                                          # padding slots: themselves
        mask = mask[:, None]
        if dtype is None:
            return mask
        return torch.zeros(mask.shape, dtype=dtype).masked_fill(~mask, torch.finfo(dtype).min)


def pack_layout(attention_mask: torch.Tensor, pack_tokens: int, *, prompt_len: int = 0,
                input_ids: torch.Tensor | None = None) -> PackLayout:
    """attention_mask [N, S] -> the slots of K packs of at most `pack_tokens` tokens (a longer segment: a pack
    of its own). With `input_ids` [N, S] given, rows whose first `prompt_len` columns hold the same real
    tokens share one copy of them; without, every row is a segment of its own."""
    N, S = attention_mask.shape
    real = attention_mask.bool()
    cols = [real[i].nonzero()[:, 0] for i in range(N)]                    # each row's real tokens, in order
    n_prompt = real[:, :prompt_len].sum(-1).tolist()                      # [N] real prompt tokens
    groups: dict = {}
    for i in range(N):
        key = i if input_ids is None else tuple(input_ids[i, :prompt_len][real[i, :prompt_len]].tolist())
        groups.setdefault(key, []).append(i)
    # segments: a prompt (rows[0]'s) and the responses that fit with it in one pack
    segments: list[list[int]] = []
    for rows in groups.values():
        p = n_prompt[rows[0]]
        resp = [len(cols[i]) - p for i in rows]
        for part in first_fit_decreasing(resp, max(1, pack_tokens - p)):
            segments.append([rows[j] for j in sorted(part)])
    sizes = [n_prompt[s[0]] + sum(len(cols[i]) - n_prompt[i] for i in s) for s in segments]
    bins = first_fit_decreasing(sizes, pack_tokens)
    K, L = len(bins), max(sum(sizes[s] for s in b) for b in bins)
    source = torch.zeros(K, L, dtype=torch.long)
    positions = torch.zeros(K, L, dtype=torch.long)
    segment = torch.full((K, L), -1, dtype=torch.long)
    owner = torch.full((K, L), -1, dtype=torch.long)
    target = torch.full((N, S), K * L, dtype=torch.long)
    for k, segs in enumerate(bins):
        start = 0
        for s in segs:
            rows = segments[s]
            p = n_prompt[rows[0]]
            prompt_cols = cols[rows[0]][:p]
            source[k, start:start + p] = rows[0] * S + prompt_cols
            positions[k, start:start + p] = torch.arange(p)
            segment[k, start:start + p] = s
            for i in rows:
                target[i, cols[i][:p]] = k * L + start + torch.arange(p)
            start += p
            for i in rows:
                c = cols[i][p:]
                n = len(c)
                source[k, start:start + n] = i * S + c
                positions[k, start:start + n] = p + torch.arange(n)
                segment[k, start:start + n] = s
                owner[k, start:start + n] = i
                target[i, c] = k * L + start + torch.arange(n)
                start += n
        positions[k, start:] = torch.arange(L - start)
    return PackLayout(source, positions, target, segment, owner, any(len(s) > 1 for s in segments))


def packed_response_hidden(backbone, input_ids: torch.Tensor, attention_mask: torch.Tensor, response_len: int, *,
                           pack_tokens: int, share_prompts: bool = True) -> torch.Tensor:
    """input_ids, attention_mask [N, P+T] -> hidden [N, T, H] at the positions that predict the T response
    tokens, from one backbone pass over the packed real tokens (rows with the same prompt sharing one copy,
    when `share_prompts` and the attention takes a mask). Padding positions get zeros."""
    T, S = response_len, input_ids.shape[1]
    attn = getattr(getattr(backbone, "config", None), "_attn_implementation", None)
    share = share_prompts and attn in MASKED_ATTENTION
    layout = pack_layout(attention_mask.cpu(), pack_tokens, prompt_len=S - T,
                         input_ids=input_ids.cpu() if share else None)
    device = input_ids.device
    mask = None
    if layout.shared:   # otherwise the position restarts mark the rows (and the flash kernels need no mask)
        mask = layout.attention_mask(None if attn == "sdpa" else torch.float32).to(device)
    packed_ids = input_ids.flatten()[layout.source.to(device)]                             # [K, L]
    hidden = backbone(input_ids=packed_ids, position_ids=layout.positions.to(device), attention_mask=mask,
                      use_cache=False).last_hidden_state                                   # [K, L, H]
    flat = torch.cat([hidden.flatten(0, 1), hidden.new_zeros(1, hidden.shape[-1])])        # [K * L + 1, H]
    return flat[layout.target[:, S - T - 1:S - 1].to(device)]                              # [N, T, H]
