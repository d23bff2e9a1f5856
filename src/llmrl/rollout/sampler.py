"""Native batched sampler: prefill once per prompt, share the prompt's KV cache across its G samples,
decode with temperature / top-p, stop at EOS or a stop string, and record each sampled token's log-prob.

The policy being sampled is pi(. | s) = softmax(logits / temperature); the recorded `logp` is the
log-prob of the sampled token under that distribution (top-p truncation is a sampling device and is
not folded into the log-prob, as in verl and TRL). With temperature 0 the sampler is greedy and the
log-prob is taken at temperature 1.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from llmrl.compute.lean_decoder import LeanDecoder, lean_supported
from llmrl.compute.settings import choices, device_generator
from llmrl.rollout.static_decode import StaticRunner, prompt_attention


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
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long, device="cpu")      # built on the host, then moved
    mask = torch.zeros((len(seqs), width), dtype=torch.long, device="cpu")
    for i, s in enumerate(seqs):
        if s:
            ids[i, width - len(s):] = torch.tensor(s, dtype=torch.long, device="cpu")
            mask[i, width - len(s):] = 1
    return ids, mask


BLOCK = 256     # vocabulary entries per block of the two-level inverse CDF


def categorical(weights: torch.Tensor, generator=None) -> torch.Tensor:
    """weights [N, V] >= 0 (unnormalised probabilities; zeros are never drawn) -> token [N], by inverting each
    row's CDF at one uniform draw, in two levels: the block of BLOCK entries the draw falls in (from the blocks'
    fp64 sums), then the entry within that block. Two passes over [N, V] and a cumsum over [N, V / BLOCK], where
    `torch.multinomial` draws an exponential per vocabulary entry: ~15 ms a step for 16 x 49k on this CPU,
    a quarter of a 135M model's decode."""
    N, V = weights.shape
    nb = -(-V // BLOCK)
    w = F.pad(weights, (0, nb * BLOCK - V)).view(N, nb, BLOCK)                        # [N, nb, BLOCK]
    block_cdf = w.sum(-1, dtype=torch.float64).cumsum(-1)                            # [N, nb]
    u = torch.rand(N, 1, dtype=torch.float64, generator=generator, device=weights.device) * block_cdf[:, -1:]
    b = torch.searchsorted(block_cdf, u, right=True).clamp_(max=nb - 1)              # [N, 1] first cdf > u
    below = torch.where(b > 0, block_cdf.gather(-1, (b - 1).clamp(min=0)), 0.0)      # mass of the blocks before
    inner = w.gather(1, b[:, :, None].expand(N, 1, BLOCK))[:, 0]                      # [N, BLOCK]
    inner_cdf = inner.double().cumsum(-1)
    j = torch.searchsorted(inner_cdf, u - below, right=True)                         # [N, 1]
    last = BLOCK - 1 - (inner.flip(-1) > 0).int().argmax(-1, keepdim=True)           # the block's last non-zero
    return (b * BLOCK + torch.minimum(j, last))[:, 0]                                 # (fp64 rounding past it)


def sample_next(logits: torch.Tensor, temperature: float, top_p: float, generator=None):
    """logits [N, V] -> (token [N], logp of token under softmax(logits / temperature) [N])."""
    logits = logits.float()
    if temperature <= 0:
        token = logits.argmax(-1)
        return token, torch.log_softmax(logits, -1).gather(-1, token[:, None])[:, 0]
    z = logits / temperature if temperature != 1.0 else logits                   # [N, V]
    top = z.amax(-1, keepdim=True)                                               # [N, 1]
    weights = (z - top).exp_()                                                   # [N, V] softmax, unnormalised
    lse = top[:, 0] + weights.sum(-1).log()                                      # [N]
    if top_p < 1.0:
        sorted_w, order = weights.sort(-1, descending=True)
        sorted_p = sorted_w / sorted_w.sum(-1, keepdim=True)
        keep = sorted_p.cumsum(-1) - sorted_p < top_p                            # always keeps the top token
        token = order.gather(-1, categorical(sorted_w * keep, generator)[:, None])[:, 0]
    else:
        token = categorical(weights, generator)
    return token, z.gather(-1, token[:, None])[:, 0] - lse


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


class HFRunner:
    """Any causal LM through its HF forward: a DynamicCache, the 2D mask grown by a column each step, all under one
    autocast region (entered by `generate`, so the weights are cast to bf16 once per call, not once per step)."""

    compacts = True     # `keep` drops stopped rows from the batch

    def __init__(self, model):
        self.model = model

    def prefill(self, prompt_ids, prompt_mask, positions, group_size: int, max_new_tokens: int):  # -> [N, V]
        from transformers import DynamicCache

        out = self.model(input_ids=prompt_ids, attention_mask=prompt_mask, position_ids=positions,
                         past_key_values=DynamicCache(), use_cache=True, logits_to_keep=1)
        self.cache = out.past_key_values
        if group_size > 1:
            self.cache.batch_repeat_interleave(group_size)
        self.mask = prompt_mask.repeat_interleave(group_size, 0)                                # [N, P]
        return out.logits[:, -1].repeat_interleave(group_size, 0)

    def keep(self, rows: torch.Tensor) -> None:                    # drop the rows not in `rows` from the batch
        self.cache.batch_select_indices(rows)
        self.mask = self.mask[rows]

    def decode(self, token, positions):                            # token, positions [n] -> logits [n, V]
        self.mask = torch.cat([self.mask, torch.ones_like(self.mask[:, :1])], 1)
        out = self.model(input_ids=token[:, None], attention_mask=self.mask, position_ids=positions[:, None],
                         past_key_values=self.cache, use_cache=True)
        self.cache = out.past_key_values
        return out.logits[:, -1]


class LeanRunner:
    """Llama-family models through `LeanDecoder`: weights cast once, a pre-allocated KV cache [.., N, K, P+T, D] and
    key mask [N, P+T], written in place; `keep` compacts both when rows stop. Where the C decode step is available
    (bf16 on CPU: compute/decode_kernels.py) the decode steps run through `LeanDecoder.decode` on its own cache layout
    (keys transposed), filled from the prefill's."""

    compacts = True

    def __init__(self, model, dtype):
        self.lean = LeanDecoder(model, dtype)

    def prefill(self, prompt_ids, prompt_mask, positions, group_size: int, max_new_tokens: int):
        B, P = prompt_ids.shape
        valid = prompt_mask.bool()
        cache = self.lean.new_cache(B, P)
        logits = self.lean.forward(prompt_ids, positions, cache, 0, prompt_attention(prompt_mask))   # [B, V]
        if self.lean.c is not None:                                        # keys [.., D, L], values [.., L, D]
            self.kt, self.vc = self.lean.new_decode_cache(B * group_size, P + max_new_tokens)
            self.kt[..., :P] = cache[:, 0].transpose(-1, -2).repeat_interleave(group_size, 1)
            self.vc[..., :P, :] = cache[:, 1].repeat_interleave(group_size, 1)
            width = self.kt.shape[-1]
        else:
            self.cache = self.lean.new_cache(B * group_size, P + max_new_tokens)
            self.cache[:, :, :, :, :P] = cache.repeat_interleave(group_size, 2)
            width = P + max_new_tokens
        self.keys = torch.zeros(B * group_size, width, dtype=torch.bool, device=valid.device)
        self.keys[:, :P] = valid.repeat_interleave(group_size, 0)                                # [N, width]
        self.length = P
        return logits.repeat_interleave(group_size, 0)

    def keep(self, rows: torch.Tensor) -> None:
        if self.lean.c is not None:
            self.kt, self.vc = self.kt[:, rows], self.vc[:, rows]
        else:
            self.cache = self.cache[:, :, rows]
        self.keys = self.keys[rows]

    def decode(self, token, positions):
        start, self.length = self.length, self.length + 1
        self.keys[:, start] = True
        if self.lean.c is not None:
            return self.lean.decode(token, positions, self.kt, self.vc, start, self.keys)
        return self.lean.forward(token[:, None], positions[:, None], self.cache, start,
                                 self.keys[:, None, :start + 1])


DECODERS = {"lean": LeanRunner, "static": StaticRunner}     # the decode loops of `compute.settings.choices(device)`


def make_runner(model, device: torch.device, autocast_dtype, max_len: int, lean: bool, decoder: str | None):
    """(runner, the autocast region its calls run in): the device's decode loop (`decoder` overrides it) on the
    lean decoder where the model is one it reproduces, else HF's forward under autocast."""
    if lean and lean_supported(model, max_len):
        return DECODERS[decoder or choices(device).decoder](model, autocast_dtype), contextlib.nullcontext()
    return HFRunner(model), torch.autocast(device.type, dtype=autocast_dtype or torch.bfloat16,
                                           enabled=autocast_dtype is not None)


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
    lean: bool = True,             # the lean Llama-family decoder where it applies (else HF's forward)
    decoder: str | None = None,    # its decode loop: lean | static (None: the device's, compute/settings.py)
) -> Samples:
    """Sample `group_size` responses per prompt. Returns rows grouped: prompt b's samples are rows b*G .. b*G+G-1.
    A row ends after a stop id, after a token that completes one of `stop_strings`, or at max_new_tokens.
    Rows that have stopped are dropped from the batch once they are at least half of it."""
    if stop_strings and tokenizer is None:
        raise ValueError("generate: stop_strings need a tokenizer to decode with")
    stop_text = StopStrings(tokenizer, stop_strings) if stop_strings else None
    device = next(model.parameters()).device
    generator = device_generator(generator, device)                             # draws where the logits are
    prompt_ids, prompt_mask = left_pad(prompts, pad_id)                          # [B, P]
    prompt_ids, prompt_mask = prompt_ids.to(device), prompt_mask.to(device)
    B, G, T = len(prompts), group_size, max_new_tokens
    N = B * G
    runner, amp = make_runner(model, device, autocast_dtype, prompt_ids.shape[1] + T, lean, decoder)

    response_ids = torch.full((N, T), pad_id, dtype=torch.long, device=device)
    response_mask = torch.zeros(N, T, device=device)
    logps = torch.zeros(N, T, device=device)
    truncated = torch.zeros(N, dtype=torch.bool, device=device)
    stop = torch.tensor(list(stop_ids) or [-1], device=device)
    rows = torch.arange(N, device=device)                                        # batch row -> output row, [n]
    alive = torch.ones(N, dtype=torch.bool, device=device)                       # [n]
    steps = 0
    with amp:
        # --- prefill: B prompts once, the cache shared across each prompt's G samples
        positions = (prompt_mask.cumsum(-1) - 1).clamp(min=0)                    # [B, P]
        logits = runner.prefill(prompt_ids, prompt_mask, positions, G, T)        # [N, V]
        next_pos = positions[:, -1].repeat_interleave(G, 0) + 1                  # [N]
        for t in range(T):
            token, logp = sample_next(logits, temperature, top_p, generator)
            live = rows[alive]
            response_ids[live, t], logps[live, t], response_mask[live, t] = token[alive], logp[alive], 1.0
            steps = t + 1
            alive = alive & ~torch.isin(token, stop)
            if stop_text is not None and alive.any():
                idx = alive.nonzero()[:, 0]
                alive[idx] = ~stop_text(response_ids[rows[idx], max(0, steps - stop_text.window):steps])
            if not alive.any():
                break
            if t == T - 1:
                truncated[rows[alive]] = True
                break
            if runner.compacts and 2 * int(alive.sum()) <= len(rows):            # compact: drop stopped rows
                idx = alive.nonzero()[:, 0]
                runner.keep(idx)
                rows, alive, token, next_pos = rows[idx], alive[idx], token[idx], next_pos[idx]
            logits = runner.decode(token, next_pos)
            next_pos = next_pos + 1

    return Samples(
        prompt_ids=prompt_ids.repeat_interleave(G, 0), prompt_mask=prompt_mask.repeat_interleave(G, 0),
        response_ids=response_ids[:, :steps], response_mask=response_mask[:, :steps],
        logp=logps[:, :steps], truncated=truncated,
    )
