"""bench/update_efficiency.py: the op breakdown puts each aten op in its kind, and the FLOP count is the formula's."""

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

from update_efficiency import flops_linear, op_breakdown, synthetic_rollout, useful_flops  # noqa: E402


def test_op_breakdown_counts_each_kind_of_op_forward_and_backward():
    a = torch.randn(8, 16, requires_grad=True)
    b = torch.randn(16, 4)
    q = torch.randn(1, 2, 5, 8, requires_grad=True)

    def fn():
        (a @ b).sum().backward()                                   # mm forward; mm for a's gradient; sum
        F.scaled_dot_product_attention(q, q, q).sum().backward()

    total, spent = op_breakdown(fn)
    assert spent["matmul"][1] >= 2 and spent["dtype casts"][1] == 0
    assert spent["elementwise and other"][1] >= 2
    assert sum(s for s, _ in spent.values()) <= total
    assert a.grad is not None and q.grad is not None


def test_useful_flops_is_six_per_weight_per_token_plus_causal_attention(tiny):
    model, tok = tiny
    r = synthetic_rollout(4, model.config.vocab_size, tok.pad_token_id)
    cfg = model.config
    linear = sum(m.weight.numel() for m in model.get_decoder().layers.modules() if isinstance(m, torch.nn.Linear))
    n = r.attention_mask.sum(-1).double()
    expect_linear = 6 * (linear * n.sum() + cfg.vocab_size * cfg.hidden_size * r.response_mask.sum())
    assert flops_linear(model, r) == float(expect_linear)
    d_attn = cfg.num_attention_heads * (cfg.hidden_size // cfg.num_attention_heads)
    attention = 6 * cfg.num_hidden_layers * d_attn * float((n * (n + 1)).sum())
    assert abs(useful_flops(model, r) - float(expect_linear) - attention) < 1e-6 * attention
