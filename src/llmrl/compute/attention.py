"""Attention of shared-prompt packs (`packing.SegmentPlan`): each block of queries against only the keys it may see.

`segment_attention` is the transformers attention interface ("llmrl_segments", registered by packing.py). Its
forward and backward are written by hand (`_SegmentAttention`), the way FlashAttention's are: the forward keeps
q, k and v (in the value's dtype: bf16 under autocast, as the "sdpa" attention computes them) and each query's
log-normaliser, and the backward recomputes the probabilities from them. Through plain autograd the blocks would
keep their fp32 gathers of q, k and v and their fp32 probabilities: on SmolLM2-135M and a GRPO batch of ~640
packed tokens, ~190 of the ~430 MiB the update's forward keeps for backward; here ~40.

Per block, with s = scale q k^T (masked), lse = logsumexp(s), p = exp(s - lse), o = p v and g = dL/do:

    dv = p^T g        dp = g v^T        ds = p (dp - rowsum(g o)) scale        dq = ds k        dk = ds^T q

Notation: B packs of L slots, H query heads, Kh key/value heads (rep = H / Kh query heads read each), D head dim;
a block has n rows of a queries and b keys.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _flat(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[B, h, L, D] -> [B L + 1, h, D] in `dtype`; the last slot is zeros (padding reads and writes it)."""
    B, h, L, D = x.shape
    out = x.new_empty(B * L + 1, h, D, dtype=dtype)
    out[:B * L] = x.transpose(1, 2).reshape(B * L, h, D)
    out[B * L] = 0
    return out


def _queries(x: torch.Tensor, qi: torch.Tensor, rep: int) -> torch.Tensor:
    """The fp32 gather of a block's query slots qi [n, a] from x [B L + 1, Kh rep, D]: [n, Kh, rep a, D]."""
    (n, a), (_, H, D) = qi.shape, x.shape
    xb = x.index_select(0, qi.flatten()).float().view(n, a, H // rep, rep, D).permute(0, 2, 3, 1, 4)
    return xb.reshape(n, H // rep, rep * a, D)


def _block(q, k, v, qi, ki, rep: int):
    """The fp32 gathers of one block: q [n, Kh, rep a, D], k and v [n, Kh, b, D]."""
    n, b = ki.shape
    Kh, D = k.shape[1], k.shape[2]
    kb = k.index_select(0, ki.flatten()).float().view(n, b, Kh, D).transpose(1, 2)
    vb = v.index_select(0, ki.flatten()).float().view(n, b, Kh, D).transpose(1, 2)
    return _queries(q, qi, rep), kb, vb


def _scores(qb, kb, mask, scale: float, rep: int):
    """Masked scores [n, Kh, rep a, b] (mask [n, 1, a, b], True: attend)."""
    n, Kh, ra, _ = qb.shape
    s = (qb @ kb.transpose(-1, -2)).view(n, Kh, rep, ra // rep, -1) * scale
    return s.masked_fill_(~mask[:, :, None], float("-inf")).view(n, Kh, ra, -1)


def _to_rows(x: torch.Tensor, rep: int) -> torch.Tensor:
    """[n, Kh, rep a, D] -> [n a, Kh rep, D]: the block's outputs by query slot."""
    n, Kh, ra, D = x.shape
    return x.view(n, Kh, rep, ra // rep, D).permute(0, 3, 1, 2, 4).reshape(n * (ra // rep), Kh * rep, D)


class _SegmentAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, query, key, value, plan, scale: float):
        B, H, L, D = query.shape
        Kh, dt = key.shape[1], value.dtype
        rep = H // Kh
        q, k, v = _flat(query, dt), _flat(key, dt), _flat(value, dt)
        out = query.new_zeros(B * L + 1, H, D, dtype=dt)
        lses, grad = [], any(ctx.needs_input_grad[:3])
        for qi, ki, mask in plan.blocks:
            qb, kb, vb = _block(q, k, v, qi, ki, rep)
            s = _scores(qb, kb, mask, scale, rep)                                 # [n, Kh, rep a, b]
            if grad:
                lses.append(torch.logsumexp(s, -1, keepdim=True))                 # [n, Kh, rep a, 1]
                p = s.sub_(lses[-1]).exp_()
            else:                                                                 # (a reference forward)
                p = s.softmax(-1)
            out.index_copy_(0, qi.flatten(), _to_rows(p @ vb, rep).to(dt))
        if grad:
            ctx.save_for_backward(q, k, v, *lses)
        ctx.plan, ctx.scale, ctx.shape, ctx.dtypes = plan, scale, (B, H, L, D), (query.dtype, key.dtype, value.dtype)
        return out[:B * L].view(B, L, H, D)

    @staticmethod
    def backward(ctx, g_out):
        if torch.is_grad_enabled():
            raise NotImplementedError("segment attention has no double backward (TRPO runs its forwards unpacked)")
        q, k, v, *lses = ctx.saved_tensors
        B, H, L, D = ctx.shape
        Kh = k.shape[1]
        rep = H // Kh
        g = _flat(g_out.transpose(1, 2), torch.float32)                          # [B L + 1, H, D]
        dq, dk, dv = (torch.zeros(B * L + 1, h, D, device=q.device) for h in (H, Kh, Kh))
        for (qi, ki, mask), lse in zip(ctx.plan.blocks, lses):
            n, b = len(qi), ki.shape[1]
            qb, kb, vb = _block(q, k, v, qi, ki, rep)
            p = _scores(qb, kb, mask, ctx.scale, rep).sub_(lse).exp_()           # [n, Kh, rep a, b]
            gb = _queries(g, qi, rep)                                             # [n, Kh, rep a, D]
            row = (gb * (p @ vb)).sum(-1, keepdim=True)                           # rowsum(g o) [n, Kh, rep a, 1]
            ds = (gb @ vb.transpose(-1, -2)).sub_(row).mul_(p).mul_(ctx.scale)   # [n, Kh, rep a, b]
            dq.index_add_(0, qi.flatten(), _to_rows(ds @ kb, rep))
            dk.index_add_(0, ki.flatten(), (ds.transpose(-1, -2) @ qb).transpose(1, 2).reshape(n * b, Kh, D))
            dv.index_add_(0, ki.flatten(), (p.transpose(-1, -2) @ gb).transpose(1, 2).reshape(n * b, Kh, D))
        back = lambda x, dtype: x[:B * L].view(B, L, -1, D).transpose(1, 2).to(dtype)        # noqa: E731
        qt, kt, vt = ctx.dtypes
        return back(dq, qt), back(dk, kt), back(dv, vt), None, None


def _segment_attention_autograd(query, key, value, plan, scale: float, drop: float):
    """The same attention through plain autograd ops (fp32 gathers kept for backward), with attention dropout."""
    B, H, L, D = query.shape
    Kh = key.shape[1]
    rep = H // Kh
    q, k, v = (_flat(x, torch.float32) for x in (query, key, value))
    out = value.new_zeros(B * L + 1, H, D)
    for qi, ki, mask in plan.blocks:
        qb, kb, vb = _block(q, k, v, qi, ki, rep)
        probs = F.dropout(_scores(qb, kb, mask, scale, rep).softmax(-1), drop)
        out = out.index_copy(0, qi.flatten(), _to_rows(probs @ vb, rep).to(out.dtype))
    return out[:B * L].view(B, L, H, D)


def segment_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, *,
                      llmrl_segments, **kwargs):
    """transformers' attention interface (registered as "llmrl_segments"): query [B, H, L, D], key, value
    [B, Kh, L, D] of the packed slots -> [B, L, H, D], each query attending only to the keys `llmrl_segments` (a
    `packing.SegmentPlan`) gives it. The same values as the block mask over the whole pack, without the pairs it
    would mask out. Query head h reads key/value head h // rep: a block's rep query heads of one key head are
    stacked as rows of one matmul against that head's keys. Scores and softmax in fp32."""
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    drop = dropout if module.training else 0.0
    with torch.autocast(query.device.type, enabled=False):     # the blocks are small: fp32 scores, plain matmuls
        if drop:
            return _segment_attention_autograd(query, key, value, llmrl_segments, scale, drop), None
        return _SegmentAttention.apply(query, key, value, llmrl_segments, scale), None
