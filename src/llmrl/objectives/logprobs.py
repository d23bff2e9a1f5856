"""Per-token log-probs and entropy of the response under a causal LM, computed in chunks.

The backbone runs once over [N, P+T] (or over the rows' real tokens packed end to end, `pack_tokens`:
see `packing.py`); the LM head and the log-softmax run only over the real response tokens (not the
padding), `chunk` x N of them at a time, each chunk under activation checkpointing when gradients are on,
so the [N, T, V] logits tensor never exists whole (forward or backward).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from llmrl.objectives.packing import packed_response_hidden


def _head_logp_entropy(hidden, head_weight, targets, temperature: float, with_entropy: bool = True):
    """hidden [M, H], targets [M] -> (logp [M], entropy [M] or None) under softmax(h W^T / temperature)."""
    logits = F.linear(hidden, head_weight).float()                           # [M, V]
    if temperature != 1.0:                                                   # (saves a pass over [M, V] when 1)
        logits = logits / temperature
    logp_all = torch.log_softmax(logits, -1)
    logp = logp_all.gather(-1, targets[..., None])[..., 0]
    entropy = -(logp_all.exp() * logp_all).sum(-1) if with_entropy else None
    return logp, entropy


def response_hidden(backbone, input_ids, attention_mask, response_len: int, *, pack_tokens: int | None = None):
    """input_ids, attention_mask [N, P+T] -> hidden [N, T, H], the states that predict the T response tokens.
    With `pack_tokens` the backbone runs padding-free on packs of at most that many tokens (same values)."""
    if pack_tokens:
        return packed_response_hidden(backbone, input_ids, attention_mask, response_len, pack_tokens=pack_tokens)
    positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    hidden = backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions).last_hidden_state
    return hidden[:, -response_len - 1:-1]


def response_logprobs(
    model,
    input_ids: torch.Tensor,        # [N, P+T]
    attention_mask: torch.Tensor,   # [N, P+T]
    response_len: int,              # T
    *,
    temperature: float = 1.0,
    chunk: int = 64,
    with_entropy: bool = True,
    pack_tokens: int | None = None,  # run the backbone on padding-free packs of at most this many tokens
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Returns (logp [N, T], entropy [N, T] or None): log pi(r_t | prompt, r_<t) at each response position.

    The head runs only at real response tokens (attention_mask 1), `chunk` x N of them at a time; padding
    positions get logp = entropy = 0."""
    T = response_len
    backbone, head = model.get_decoder(), model.get_output_embeddings()
    if backbone is None or head is None or getattr(head, "bias", None) is not None:
        raise ValueError(f"{type(model).__name__}: needs get_decoder() and a bias-free get_output_embeddings()")
    hidden = response_hidden(backbone, input_ids, attention_mask, T, pack_tokens=pack_tokens)  # [N, T, H]
    real = attention_mask[:, -T:].bool()                                         # [N, T]
    hidden, targets = hidden[real], input_ids[:, -T:][real]                      # [M, H], [M]
    step = chunk * input_ids.shape[0]
    logps, ents = [], []
    for s in range(0, len(targets), step):
        h, y = hidden[s:s + step], targets[s:s + step]
        if torch.is_grad_enabled():
            lp, en = checkpoint(_head_logp_entropy, h, head.weight, y, temperature, with_entropy, use_reentrant=False)
        else:
            lp, en = _head_logp_entropy(h, head.weight, y, temperature, with_entropy)
        logps.append(lp)
        ents.append(en)
    logp = _scatter(real, logps)
    return logp, (_scatter(real, ents) if with_entropy else None)


def _scatter(real: torch.Tensor, parts: list[torch.Tensor]) -> torch.Tensor:
    """The values of the real positions (in order, in pieces) back into [N, T] fp32, zeros elsewhere."""
    out = torch.zeros(real.shape, dtype=torch.float32, device=real.device)
    if parts:
        out = out.masked_scatter(real, torch.cat(parts).float())
    return out


def _response_hidden(model, input_ids, attention_mask, T):
    hidden = response_hidden(model.get_decoder(), input_ids, attention_mask, T)
    return hidden, model.get_output_embeddings().weight                          # [N, T, H], [V, H]


@torch.no_grad()
def response_kl(model, reference, input_ids, attention_mask, response_len: int, *, chunk: int = 16) -> torch.Tensor:
    """Exact KL(pi(. | s_t) || pi_ref(. | s_t)) summed over the vocabulary at each response position -> [N, T].

    Unlike a sampled estimator (k1/k3) this is exact per state and never negative, so it is the right number
    to report for responses that were not sampled from pi (greedy evaluation)."""
    h, w = _response_hidden(model, input_ids, attention_mask, response_len)
    h_ref, w_ref = _response_hidden(reference, input_ids, attention_mask, response_len)
    out = []
    for s in range(0, response_len, chunk):
        logp = torch.log_softmax(F.linear(h[:, s:s + chunk], w).float(), -1)       # [N, C, V]
        logq = torch.log_softmax(F.linear(h_ref[:, s:s + chunk], w_ref).float(), -1)
        out.append((logp.exp() * (logp - logq)).sum(-1))
    return torch.cat(out, 1).clamp(min=0)
