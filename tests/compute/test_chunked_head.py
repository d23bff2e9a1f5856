"""ChunkedHead: the LM head's log-probs and entropy, forward and hand-written backward, against plain autograd."""

import pytest
import torch

from llmrl.compute import logprobs as L
from llmrl.compute.logprobs import ChunkedHead, _head_logp_entropy

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


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_c_kernels_match_the_torch_path_under_bf16(monkeypatch, loss, temperature):
    """head_kernels.c (bf16 logits, one pass a row) against the same head through PyTorch ops: the values agree
    to fp32 rounding of the same bf16 logits, the gradients to bf16 rounding of the logits' gradient."""
    if L.head_kernels() is None:
        pytest.skip("no C compiler")
    calls = []
    real = L.head_kernels()

    class Spy:
        def __getattr__(self, name):
            calls.append(name)
            return getattr(real, name)

    def run(lib):
        monkeypatch.setattr(L, "head_kernels", lambda: lib)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return grads(lambda h, w, y: ChunkedHead.apply(h, w, y, temperature, 8, True), LOSSES[loss])

    want, got = run(None), run(Spy())
    assert {"head_forward", "head_backward"} <= set(calls)
    lp, en, dh, dw = got
    assert torch.allclose(lp, want[0], atol=1e-4), (lp - want[0]).abs().max()
    assert torch.allclose(en, want[1], atol=1e-4), (en - want[1]).abs().max()
    for g, w in ((dh, want[2]), (dw, want[3])):
        assert (g - w).abs().max() < 0.02 * w.abs().max(), (g - w).abs().max()


def test_c_kernels_refuse_targets_outside_the_vocabulary():
    if L.head_kernels() is None:
        pytest.skip("no C compiler")
    hidden, weight, targets = inputs()
    targets[3] = V
    with torch.autocast("cpu", dtype=torch.bfloat16), pytest.raises(IndexError, match="target token ids"):
        ChunkedHead.apply(hidden, weight, targets, 1.0, 8, True)


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


def test_matmul_shapes_repeat_across_row_counts(monkeypatch):
    """oneDNN caches a primitive per matmul shape: the head's shapes must not follow the exact token count M,
    only its multiple of HEAD_ALIGN (rows) and a power-of-two vocabulary block."""
    import llmrl.compute.logprobs as L

    def shapes(m):
        seen, real = set(), L._chunk_logits
        monkeypatch.setattr(L, "_chunk_logits", lambda h, w, t: seen.add((h.shape, w.shape)) or real(h, w, t))
        g = torch.Generator().manual_seed(m)
        hidden = torch.randn(m, H, generator=g, requires_grad=True)
        weight = torch.randn(4096, H, generator=g, requires_grad=True)
        logp, entropy = ChunkedHead.apply(hidden, weight, torch.randint(0, 4096, (m,), generator=g), 1.0, 128, True)
        (logp.sum() + entropy.sum()).backward()
        monkeypatch.setattr(L, "_chunk_logits", real)
        return seen

    assert shapes(131) == shapes(150) == shapes(192)            # all pad to 192 rows
    assert all(h[0] % L.HEAD_ALIGN == 0 for h, _ in shapes(131))
    assert shapes(131) != shapes(200)
    assert L._vocab_block(49152, 128 * 49152 // 640) == 8192 and L._vocab_block(300, 10**6) == 300
    assert L._vocab_block(49152, 3) == 256
