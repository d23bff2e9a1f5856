"""Per-token log-probs and entropy of the response under a causal LM, computed in chunks.

The backbone runs once over [N, P+T]; the LM head and the log-softmax run over the T response
positions `chunk` at a time, each chunk under activation checkpointing when gradients are on, so the
[N, T, V] logits tensor never exists whole (forward or backward).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


def _head_logp_entropy(hidden, head_weight, targets, temperature: float):
    """hidden [N, C, H], targets [N, C] -> (logp [N, C], entropy [N, C]) under softmax(h W^T / temperature)."""
    logits = F.linear(hidden, head_weight).float() / temperature             # [N, C, V]
    logp_all = torch.log_softmax(logits, -1)
    logp = logp_all.gather(-1, targets[..., None])[..., 0]
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    return logp, entropy


def response_logprobs(
    model,
    input_ids: torch.Tensor,        # [N, P+T]
    attention_mask: torch.Tensor,   # [N, P+T]
    response_len: int,              # T
    *,
    temperature: float = 1.0,
    chunk: int = 64,
    with_entropy: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Returns (logp [N, T], entropy [N, T] or None): log pi(r_t | prompt, r_<t) at each response position."""
    T = response_len
    positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    backbone, head = model.get_decoder(), model.get_output_embeddings()
    if backbone is None or head is None or getattr(head, "bias", None) is not None:
        raise ValueError(f"{type(model).__name__}: needs get_decoder() and a bias-free get_output_embeddings()")
    hidden = backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions).last_hidden_state
    hidden = hidden[:, -T - 1:-1]                                                # [N, T, H] predicts response tokens
    targets = input_ids[:, -T:]                                                  # [N, T]
    logps, ents = [], []
    for s in range(0, T, chunk):
        h, y = hidden[:, s:s + chunk], targets[:, s:s + chunk]
        if torch.is_grad_enabled():
            lp, en = checkpoint(_head_logp_entropy, h, head.weight, y, temperature, use_reentrant=False)
        else:
            lp, en = _head_logp_entropy(h, head.weight, y, temperature)
        logps.append(lp)
        ents.append(en)
    return torch.cat(logps, 1), (torch.cat(ents, 1) if with_entropy else None)
