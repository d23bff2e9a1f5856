"""Padding-free (packed) backbone forward for log-probs and the update, with one copy of each shared prompt.

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
addition, 8 completions a prompt) that is ~45% of the unshared tokens. Attention:
- shared prompts go in one pack through `segment_attention` (registered with transformers as "llmrl_segments"):
  a prompt block and a block of responses, each response against its prompt and itself, so no pair the mask would
  block is computed and the pack's length costs nothing;
- under gradient checkpointing the layers are recomputed in backward, after this call, under the model's own
  attention, so the shared layout runs with an explicit block mask (`PackLayout.attention_mask`, which
  transformers' "sdpa" and "eager" take) over packs of at most `optim.pack_tokens`. The CPU kernel computes the
  masked pairs too (L^2 a pack), so packs stay short; a segment longer than a pack is split, each part with its
  own copy of the prompt;
- rows that share no prompt, or a model with another attention (flash, flex), are packed unshared: positions
  restart at 0 for each row, with no mask, and transformers (>= 4.53,
  `masking_utils.find_packed_sequence_indices`) reads the restarts as sequence boundaries.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from llmrl.compute.attention import segment_attention  # registered below as "llmrl_segments"
from llmrl.compute.settings import choices

MASKED_ATTENTION = ("sdpa", "eager")    # attention implementations that take a custom 4D mask

# Packs are PACK_ALIGN slots long, or a multiple: the forward's matmul shapes then repeat from step to step, and
# oneDNN reuses its primitives (one per shape, JIT code and all) instead of creating and caching new ones every
# step. GRPO steps of bench/compare_trl.py's settings, one run each way (2026-11-25), aligned against not:
# - with gradient checkpointing, 21 steps: peak RSS 3541 against 3917 MiB (bytes in use growing 122 against 349
#   MiB over the run); update 3.19 against 3.50 s, reference forward 0.59 against 0.72 s;
# - without, 12 steps: peak RSS 3782 against 3959 MiB; the step about the same (5.54 against 5.61 s).
# The cost: up to 63 padding slots (~5% more rows) a pack.
PACK_ALIGN = 64


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
        same = seg[:, :, None] == seg[:, None, :]                                       # [K, L, L]
        visible = (own[:, None, :] == -1) | (own[:, :, None] == own[:, None, :])
        mask = (same & visible & torch.ones(L, L, dtype=torch.bool).tril()) | torch.eye(L, dtype=torch.bool)
        mask = mask[:, None]
        if dtype is None:
            return mask
        return torch.zeros(mask.shape, dtype=dtype).masked_fill(~mask, torch.finfo(dtype).min)

    def segment_plan(self) -> "SegmentPlan":
        """The index blocks `segment_attention` runs on (see SegmentPlan)."""
        return SegmentPlan.of(self)


SPLIT_MIN = 16   # a response block is split by length only when its longest response has at least this many tokens


def length_buckets(lengths: list[int]) -> list[list[int]]:
    """Indices of `lengths`, longest first, cut into runs where a length falls below half the run's longest (when that
    is at least SPLIT_MIN): each run is padded to its own longest, so padding stays under half of any run of
    real size, in at most log2(longest) runs."""
    out: list[list[int]] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        top = lengths[out[-1][0]] if out else 0
        if not out or (top >= SPLIT_MIN and 2 * lengths[i] < top):
            out.append([])
        out[-1].append(i)
    return out


@dataclass
class SegmentPlan:
    """Attention of shared-prompt packs as batched blocks over the flat slots [K * L] (index K * L: a zero slot
    that padding reads and writes), so a query is compared only with keys it may see. Each block is
    (queries [n, a], keys [n, b], mask [n, 1, a, b] bool, True: attend):

        the prompts       queries: the prompt slots of each segment        keys: the same, causal
        the responses,    queries: each response's slots                    keys: its segment's prompt, then its
        by length                                                                 own slots (causal)

    Shorter rows are padded to their block's longest; the responses go in blocks of similar length
    (`length_buckets`). Padding queries write to the zero slot, and one that would see no key sees the first (no
    empty softmax row)."""
    blocks: tuple[tuple[torch.Tensor, torch.Tensor, torch.Tensor], ...]

    @classmethod
    def of(cls, layout: PackLayout) -> "SegmentPlan":
        flat_seg, flat_own = layout.segment.flatten(), layout.owner.flatten()
        pad = flat_seg.numel()
        prompts, responses = [], []          # slot lists: per segment; per response (with its segment's prompt)
        for s in flat_seg.unique().tolist():
            if s < 0:
                continue
            slots = (flat_seg == s).nonzero()[:, 0]
            owners = flat_own[slots]
            prompt = slots[owners == -1]
            prompts.append(prompt)
            for i in owners[owners >= 0].unique().tolist():
                responses.append((prompt, slots[owners == i]))
        padded = lambda xs, n: torch.stack([F.pad(x, (0, n - len(x)), value=pad) for x in xs])   # noqa: E731
        causal = lambda n: torch.ones(n, n, dtype=torch.bool, device="cpu").tril()              # noqa: E731
        p = max(1, max(len(x) for x in prompts))
        prompt_q = padded(prompts, p)                                                     # [S, p]
        blocks = [(prompt_q, prompt_q, causal(p) & (prompt_q != pad)[:, None, :])]        # [S, p, p]
        for bucket in length_buckets([len(x) for _, x in responses]):
            part = [responses[i] for i in bucket]
            p, r = max(1, max(len(pr) for pr, _ in part)), max(1, max(len(x) for _, x in part))
            resp_q = padded([x for _, x in part], r)                                      # [n, r]
            resp_k = torch.cat([padded([pr for pr, _ in part], p), resp_q], 1)            # [n, p + r]
            own = causal(r) & (resp_q != pad)[:, None, :]                                 # [n, r, r]
            seen = (resp_k[:, :p] != pad)[:, None, :].expand(-1, r, -1)                   # [n, r, p]
            blocks.append((resp_q, resp_k, torch.cat([seen, own], -1)))                   # [n, r, p + r]
        for _, _, mask in blocks:
            mask[..., 0] |= ~mask.any(-1)                                                 # padding queries
        return cls(tuple((q, k, mask[:, None]) for q, k, mask in blocks))

    def to(self, device) -> "SegmentPlan":
        return SegmentPlan(tuple(tuple(t.to(device) for t in b) for b in self.blocks))


def _register() -> None:
    from transformers import AttentionInterface
    AttentionInterface.register("llmrl_segments", segment_attention)


_register()


def prompt_groups(attention_mask: torch.Tensor, prompt_len: int, input_ids: torch.Tensor | None) -> list[list[int]]:
    """Rows [N, S] grouped by the real tokens of their first `prompt_len` columns (None: a group per row)."""
    groups: dict = {}
    for i in range(len(attention_mask)):
        real = attention_mask[i, :prompt_len].bool()
        key = i if input_ids is None else tuple(input_ids[i, :prompt_len][real].tolist())
        groups.setdefault(key, []).append(i)
    return list(groups.values())


def pack_layout(attention_mask: torch.Tensor, pack_tokens: int, *, prompt_len: int = 0,
                input_ids: torch.Tensor | None = None, groups: list[list[int]] | None = None,
                align: int = 1) -> PackLayout:
    """attention_mask [N, S] -> the slots of K packs of at most `pack_tokens` tokens (a longer segment: a pack
    of its own). With `input_ids` [N, S] given, rows whose first `prompt_len` columns hold the same real
    tokens share one copy of them; without, every row is a segment of its own. The pack length L is rounded up
    to a multiple of `align` (padding slots, as in any pack shorter than the longest)."""
    N, S = attention_mask.shape
    real = attention_mask.bool()
    cols = [real[i].nonzero()[:, 0] for i in range(N)]                    # each row's real tokens, in order
    n_prompt = real[:, :prompt_len].sum(-1).tolist()                      # [N] real prompt tokens
    if groups is None:                                                    # (the caller's, when it has them)
        groups = prompt_groups(attention_mask, prompt_len, input_ids)
    # segments: a prompt (rows[0]'s) and the responses that fit with it in one pack
    segments: list[list[int]] = []
    for rows in groups:
        p = n_prompt[rows[0]]
        resp = [len(cols[i]) - p for i in rows]
        for part in first_fit_decreasing(resp, max(1, pack_tokens - p)):
            segments.append([rows[j] for j in sorted(part)])
    sizes = [n_prompt[s[0]] + sum(len(cols[i]) - n_prompt[i] for i in s) for s in segments]
    bins = first_fit_decreasing(sizes, pack_tokens)
    K, L = len(bins), max(sum(sizes[s] for s in b) for b in bins)
    L = -(-L // align) * align
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
                           pack_tokens: int, share_prompts: bool = True, embed=None) -> torch.Tensor:
    """input_ids, attention_mask [N, P+T] -> hidden [N, T, H] at the positions that predict the T response
    tokens, from one backbone pass over the packed real tokens. Padding positions get zeros.

    With `share_prompts` (and "sdpa" or "eager" attention) rows with the same prompt share one copy of it:
    - all in one pack, through `segment_attention` (which costs what the segments need, whatever the pack's
      length), on the CPU;
    - or on a GPU, or where the layers will be recomputed in backward (gradient checkpointing: the recomputation
      runs after this call, under the model's own attention), in packs of at most `pack_tokens` with an explicit
      block mask.
    Otherwise the rows are packed unshared in packs of at most `pack_tokens`, positions restarting at 0.
    `embed` (ids -> embeddings): the backbone gets those as `inputs_embeds` instead of looking the ids up itself."""
    T, S = response_len, input_ids.shape[1]
    config = getattr(backbone, "config", None)
    attn = getattr(config, "_attn_implementation", None)
    recomputed = torch.is_grad_enabled() and backbone.training and any(
        getattr(m, "gradient_checkpointing", False) for m in backbone.modules())
    device = input_ids.device
    # the segment blocks where the device takes them (the CPU: compute/settings.py); a GPU runs the block mask
    # through its SDPA kernel, whose cost grows with the pack's length, so its packs stay at `pack_tokens`
    by_blocks = choices(device).segment_attention and not recomputed
    mask, ids = attention_mask.cpu(), input_ids.cpu()      # the layout is planned on the host, then moved
    groups = prompt_groups(mask, S - T, ids) if share_prompts and attn in MASKED_ATTENTION else []
    if any(len(g) > 1 for g in groups):
        capacity = int(mask.sum()) if by_blocks else pack_tokens
        layout = pack_layout(mask, capacity, prompt_len=S - T, input_ids=ids, groups=groups, align=PACK_ALIGN)
    else:
        layout = pack_layout(mask, pack_tokens, align=PACK_ALIGN)
    kwargs = {"attention_mask": None}     # unshared: position restarts mark the rows (transformers' packed mask)
    segments = layout.shared and by_blocks
    if layout.shared and not by_blocks:
        kwargs["attention_mask"] = layout.attention_mask(None if attn == "sdpa" else torch.float32).to(device)
    elif segments:
        kwargs["llmrl_segments"] = layout.segment_plan().to(device)
        config._attn_implementation = "llmrl_segments"
    try:
        ids = input_ids.flatten()[layout.source.to(device)]                                       # [K, L]
        tokens = {"input_ids": ids} if embed is None else {"inputs_embeds": embed(ids)}
        hidden = backbone(**tokens, position_ids=layout.positions.to(device), use_cache=False,
                          **kwargs).last_hidden_state
    finally:
        if segments:
            config._attn_implementation = attn
    flat = torch.cat([hidden.flatten(0, 1), hidden.new_zeros(1, hidden.shape[-1])])        # [K * L + 1, H]
    return flat[layout.target[:, S - T - 1:S - 1].to(device)]                              # [N, T, H]
