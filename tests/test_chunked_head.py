"""ChunkedHead: the LM head's log-probs and entropy, forward and hand-written backward, against plain autograd."""

import pytest
import torch

from llmrl.objectives.logprobs import ChunkedHead, _head_logp_entropy

M, H, V = 37, 16, 300


def inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(M, H, generator=g, requires_grad=True)
    weight = (0.5 * torch.randn(V, H, generator=g)).requires_grad_()
    targets = torch.randint(0, V, (M,), generator=g)
    return hidden, weight, targets


def grads(fn, loss_of, seed=0):
    hidden, weight, targets = inputs(seed)
    logp, entropy = fn(hidden, weight, targets)
    loss_of(logp, entropy).backward()
    return logp.detach(), entropy.detach(), hidden.grad, weight.grad


LOSSES = {   # the objective's shapes: both terms, log-probs only (no entropy bonus), entropy only
    "both": lambda lp, en: (lp * torch.linspace(-1, 2, M)).sum() + 0.3 * (en * torch.linspace(1, 0, M)).sum(),
    "logp": lambda lp, en: (lp * torch.linspace(-1, 2, M)).sum(),
    "entropy": lambda lp, en: en.sum(),
}


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("chunk", [1, 8, 1000])
def test_matches_autograd_in_fp32(loss, temperature, chunk):
    want = grads(lambda h, w, y: _head_logp_entropy(h, w, y, temperature), LOSSES[loss])
    got = grads(lambda h, w, y: ChunkedHead.apply(h, w, y, temperature, chunk, True), LOSSES[loss])
    for g, w in zip(got, want):
        assert torch.allclose(g, w, atol=1e-5, rtol=1e-4), (g - w).abs().max()


def test_under_bf16_autocast_close_to_fp32():
    want = grads(lambda h, w, y: _head_logp_entropy(h, w, y, 1.0), LOSSES["both"])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = grads(lambda h, w, y: ChunkedHead.apply(h, w, y, 1.0, 8, True), LOSSES["both"])
    for g, w in zip(got, want):
        assert g.dtype == torch.float32
        assert (g - w).abs().max() < 0.05 * w.abs().max(), (g - w).abs().max()


def test_second_derivative_goes_through_the_plain_ops():
    """TRPO's Fisher-vector product: grad of (grad f . v) must equal plain autograd's."""
    def hvp(fn):
        hidden, weight, targets = inputs(1)
        logp = fn(hidden, weight, targets)[0]
        (g,) = torch.autograd.grad((logp * torch.linspace(0, 1, M)).sum(), weight, create_graph=True)
        v = torch.randn(g.shape, generator=torch.Generator().manual_seed(2))
        (hv,) = torch.autograd.grad((g * v).sum(), weight)
        return hv

    want = hvp(lambda h, w, y: _head_logp_entropy(h, w, y, 1.0, with_entropy=False))
    got = hvp(lambda h, w, y: ChunkedHead.apply(h, w, y, 1.0, 8, False))
    assert torch.allclose(got, want, atol=1e-5) and want.abs().max() > 1e-3


def test_frozen_head_weight_gets_no_gradient():   # LoRA: the tied embedding / head is frozen
    hidden, weight, targets = inputs()
    weight.requires_grad_(False)
    ChunkedHead.apply(hidden, weight, targets, 1.0, 8, True)[0].sum().backward()
    want, _ = grads(lambda h, w, y: _head_logp_entropy(h, w, y, 1.0), lambda lp, en: lp.sum())[2:]
    assert weight.grad is None and torch.allclose(hidden.grad, want, atol=1e-5)
