"""Segment attention's hand-written backward against plain autograd, and what it keeps for backward."""

import pytest
import torch

from llmrl.compute.attention import _segment_attention_autograd, segment_attention
from llmrl.compute.packing import pack_layout


class _Module(torch.nn.Module):
    pass


def layout():
    """Two prompts (3 and 5 tokens) with 3 and 2 responses of different lengths, left/right padded rows."""
    rows = [(3, 4), (3, 1), (3, 9), (5, 2), (5, 6)]          # (prompt tokens, response tokens)
    P, T = 6, 9
    mask = torch.zeros(len(rows), P + T, dtype=torch.long)
    ids = torch.zeros_like(mask)
    for i, (p, r) in enumerate(rows):
        mask[i, P - p:P + r] = 1
        ids[i, P - p:P] = torch.arange(p) + (100 if p == 3 else 200)      # the same prompt within a group
        ids[i, P:P + r] = torch.arange(r) + 10 * i
    lay = pack_layout(mask, 1000, prompt_len=P, input_ids=ids)
    assert lay.shared
    return lay


def inputs(lay, H=4, Kh=2, D=8, value_dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    K, L = lay.source.shape
    q = torch.randn(K, H, L, D, generator=g, requires_grad=True)
    k = torch.randn(K, Kh, L, D, generator=g, requires_grad=True)
    v = torch.randn(K, Kh, L, D, generator=g).to(value_dtype).requires_grad_()
    return q, k, v


def run(fn, lay, q, k, v):
    out = fn(q, k, v)
    weights = torch.linspace(-1, 1, out.numel()).view_as(out)
    real = (lay.segment >= 0).float()[:, :, None, None]                    # slots past a pack's end are ignored
    (out.float() * weights * real).sum().backward()
    return out.detach(), q.grad, k.grad, v.grad


def test_backward_matches_autograd_in_fp32():
    lay = layout()
    plan = lay.segment_plan()
    scale = 0.3
    got = run(lambda q, k, v: segment_attention(_Module(), q, k, v, None, scale, llmrl_segments=plan)[0],
              lay, *inputs(lay))
    want = run(lambda q, k, v: _segment_attention_autograd(q, k, v, plan, scale, 0.0), lay, *inputs(lay))
    for a, b in zip(got, want):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-5), (a - b).abs().max()
    assert got[1].abs().max() > 1e-3 and got[2].abs().max() > 1e-3


def test_bf16_values_round_q_and_k_as_the_values_are():
    """Under autocast q and k arrive in fp32 (after RoPE), v in bf16: all three are used at bf16 precision."""
    lay = layout()
    plan = lay.segment_plan()
    q, k, v = inputs(lay, value_dtype=torch.bfloat16)
    out = segment_attention(_Module(), q, k, v, None, llmrl_segments=plan)[0]
    assert out.dtype == torch.bfloat16
    rounded = [x.detach().to(torch.bfloat16).float() for x in (q, k, v)]
    want = _segment_attention_autograd(*rounded, plan, 8 ** -0.5, 0.0)
    assert (out.float() - want).abs().max() < 0.02
    out.float().sum().backward()
    assert q.grad.dtype == torch.float32 and v.grad.dtype == torch.bfloat16


def test_keeps_only_q_k_v_and_the_normalisers():
    lay = layout()
    plan = lay.segment_plan()
    saved = []

    def pack(t):
        saved.append(t.numel() * t.element_size())
        return t

    q, k, v = inputs(lay, value_dtype=torch.bfloat16)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        segment_attention(_Module(), q, k, v, None, llmrl_segments=plan)
    K, H, L, D = q.shape
    qkv = (K * L + 1) * (H + 2 * k.shape[1]) * D * 2                       # three bf16 flats
    assert qkv <= sum(saved) < qkv + 4 * K * L * H * 4                    # + one fp32 normaliser per query


def test_no_double_backward():
    lay = layout()
    q, k, v = inputs(lay)
    out = segment_attention(_Module(), q, k, v, None, llmrl_segments=lay.segment_plan())[0]
    (gq,) = torch.autograd.grad(out.sum(), q, create_graph=False)
    assert gq.shape == q.shape
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(out.sum(), q, create_graph=True)
