"""Native batched sampler: prefill once per prompt, share the prompt's KV cache across its G samples,
decode with temperature / top-p, stop at EOS or a stop string, and record each sampled token's log-prob.

The policy being sampled is pi(. | s) = softmax(logits / temperature); the recorded `logp` is the
log-prob of the sampled token under that distribution (top-p truncation is a sampling device and is
not folded into the log-prob, as in verl and TRL). With temperature 0 the sampler is greedy and the
log-prob is taken at temperature 1.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Samples:
    prompt_ids: torch.Tensor      # [N, P] long, left-padded
    prompt_mask: torch.Tensor     # [N, P] long
    response_ids: torch.Tensor    # [N, T] long, right-padded with pad_id
    response_mask: torch.Tensor   # [N, T] float, 1 up to and including the stop token
    logp: torch.Tensor            # [N, T] float, 0 where masked
    truncated: torch.Tensor       # [N] bool, hit max_new_tokens without a stop token


def left_pad(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists -> (ids [N, P], mask [N, P]) left-padded to the longest."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        if s:
            ids[i, width - len(s):] = torch.tensor(s, dtype=torch.long)
            mask[i, width - len(s):] = 1
    return ids, mask


def sample_next(logits: torch.Tensor, temperature: float, top_p: float, generator=None):
    """logits [N, V] -> (token [N], logp of token under softmax(logits / temperature) [N])."""
    logits = logits.float()
    if temperature <= 0:
        token = logits.argmax(-1)
        return token, torch.log_softmax(logits, -1).gather(-1, token[:, None])[:, 0]
    logp_all = torch.log_softmax(logits / temperature, -1)                       # [N, V]
    probs = logp_all.exp()
    if top_p < 1.0:
        sorted_p, order = probs.sort(-1, descending=True)
        keep = sorted_p.cumsum(-1) - sorted_p < top_p                            # always keeps the top token
        sorted_p = sorted_p * keep
        choice = torch.multinomial(sorted_p, 1, generator=generator)            # [N, 1]
        token = order.gather(-1, choice)[:, 0]
    else:
        token = torch.multinomial(probs, 1, generator=generator)[:, 0]
    return token, logp_all.gather(-1, token[:, None])[:, 0]


class StopStrings:
    """Ends a row once the text of its last few sampled tokens contains one of `strings` (a tool call's end).

    Checked after every token on the last `window` tokens: a string that ended at an earlier token would have
    stopped the row then, so a hit ends at the token just sampled (a token may run past it: it is kept whole).
    The window is the longest string's length in characters; every token decodes to at least one character.
    """

    def __init__(self, tokenizer, strings: tuple[str, ...]):
        if not strings or not all(strings):
            raise ValueError(f"StopStrings: need non-empty strings, got {strings!r}")
        self.tokenizer, self.strings, self.window = tokenizer, tuple(strings), max(map(len, strings))

    def __call__(self, recent: torch.Tensor) -> torch.Tensor:      # recent [N, W<=window] sampled ids -> [N] bool
        texts = self.tokenizer.batch_decode(recent.tolist())
        return torch.tensor([any(s in t for s in self.strings) for t in texts], device=recent.device)


@torch.no_grad()
def generate(
    model,
    prompts: list[list[int]],      # B prompts, already chat-templated token ids
    *,
    group_size: int = 1,
    max_new_tokens: int = 64,
    temperature: float = 1.0,
    top_p: float = 1.0,
    stop_ids: tuple[int, ...] = (),
    pad_id: int = 0,
    generator: torch.Generator | None = None,
    autocast_dtype: torch.dtype | None = None,
    stop_strings: tuple[str, ...] = (),
    tokenizer=None,                # decodes the tails checked against stop_strings
) -> Samples:
    """Sample `group_size` responses per prompt. Returns rows grouped: prompt b's samples are rows b*G .. b*G+G-1.
    A row ends after a stop id, after a token that completes one of `stop_strings`, or at max_new_tokens."""
    if stop_strings and tokenizer is None:
        raise ValueError("generate: stop_strings need a tokenizer to decode with")
    stop_text = StopStrings(tokenizer, stop_strings) if stop_strings else None
    from transformers import DynamicCache

    device = next(model.parameters()).device
    prompt_ids, prompt_mask = left_pad(prompts, pad_id)                          # [B, P]
    prompt_ids, prompt_mask = prompt_ids.to(device), prompt_mask.to(device)
    B, G = len(prompts), group_size
    N = B * G
    amp = torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None)

    # --- prefill: B prompts once, then share the cache across each prompt's G samples
    cache = DynamicCache()
    positions = (prompt_mask.cumsum(-1) - 1).clamp(min=0)
    with amp:
        out = model(input_ids=prompt_ids, attention_mask=prompt_mask, position_ids=positions,
                    past_key_values=cache, use_cache=True, logits_to_keep=1)
    cache = out.past_key_values
    if G > 1:
        cache.batch_repeat_interleave(G)
    logits = out.logits[:, -1].repeat_interleave(G, 0)                          # [N, V]
    mask = prompt_mask.repeat_interleave(G, 0)                                   # [N, P]
    next_pos = positions[:, -1:].repeat_interleave(G, 0) + 1                    # [N, 1]

    stop = torch.tensor(list(stop_ids) or [-1], device=device)
    tokens, logps, alive_cols = [], [], []
    alive = torch.ones(N, dtype=torch.bool, device=device)
    for _ in range(max_new_tokens):
        token, logp = sample_next(logits, temperature, top_p, generator)
        token = torch.where(alive, token, torch.full_like(token, pad_id))
        tokens.append(token)
        logps.append(torch.where(alive, logp, torch.zeros_like(logp)))
        alive_cols.append(alive.clone())
        alive = alive & ~torch.isin(token, stop)
        if stop_text is not None and alive.any():
            rows = alive.nonzero()[:, 0]
            recent = torch.stack(tokens[-stop_text.window:], 1)[rows]            # [alive, W]
            alive[rows] = ~stop_text(recent)
        if not alive.any():
            break
        mask = torch.cat([mask, torch.ones(N, 1, dtype=mask.dtype, device=device)], 1)
        with amp:
            out = model(input_ids=token[:, None], attention_mask=mask, position_ids=next_pos,
                        past_key_values=cache, use_cache=True)
        cache = out.past_key_values
        logits = out.logits[:, -1]
        next_pos = next_pos + 1

    response_ids = torch.stack(tokens, 1)                                        # [N, T]
    response_mask = torch.stack(alive_cols, 1).float()                           # [N, T]
    return Samples(
        prompt_ids=prompt_ids.repeat_interleave(G, 0), prompt_mask=prompt_mask.repeat_interleave(G, 0),
        response_ids=response_ids, response_mask=response_mask,
        logp=torch.stack(logps, 1), truncated=alive,
    )
