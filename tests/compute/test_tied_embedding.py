"""TiedEmbedding: a weight that is both the input embedding and the LM head gets its two gradients in one node, the
head's [V, H] gradient taking the embedding rows in place, with the values plain autograd gives."""

import pytest
import torch
import torch.nn.functional as F

import llmrl.compute.logprobs as L
from llmrl.models.loading import build_tiny

V, H = 50, 8


def bare(seed=0):
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(V, H, generator=g).requires_grad_()
    ids = torch.tensor([[3, 0, 7, 7], [1, 3, 0, 9]])            # 0 is the padding index; 3 and 7 repeat
    scale = torch.randn(2, 4, H, generator=g)
    return weight, ids, scale


def loss_plain(weight, ids, scale):
    h = torch.tanh(F.embedding(ids, weight, padding_idx=0) * scale)       # [2, 4, H]
    return torch.log_softmax(h @ weight.T, -1)[..., 5].sum()              # the head reads the same weight


def loss_tied(weight, ids, scale):
    embeds, head = L.TiedEmbedding.apply(weight, ids, 0)
    return torch.log_softmax(torch.tanh(embeds * scale) @ head.T, -1)[..., 5].sum()


def test_gradient_matches_plain_autograd_padding_row_included():
    w1, ids, scale = bare()
    loss_plain(w1, ids, scale).backward()
    w2 = w1.detach().clone().requires_grad_()
    loss_tied(w2, ids, scale).backward()
    assert torch.allclose(w2.grad, w1.grad, atol=1e-6), (w2.grad - w1.grad).abs().max()
    assert w1.grad[3].abs().max() > 1e-3          # a row both uses reach


def test_second_derivative_matches_plain_autograd():      # TRPO's Fisher-vector products differentiate twice
    def hvp(loss):
        w, ids, scale = bare(1)
        (g,) = torch.autograd.grad(loss(w, ids, scale), w, create_graph=True)
        v = torch.randn(g.shape, generator=torch.Generator().manual_seed(2))
        return torch.autograd.grad((g * v).sum(), w)[0]

    want, got = hvp(loss_plain), hvp(loss_tied)
    assert torch.allclose(got, want, atol=1e-5) and want.abs().max() > 1e-3


def response_grad(model, ids, mask, T, pack_tokens):
    model.zero_grad(set_to_none=True)
    logp, entropy = L.response_logprobs(model, ids, mask, T, pack_tokens=pack_tokens, chunk=5)
    weights = torch.linspace(-1, 2, logp.numel()).view_as(logp)
    ((logp * weights).sum() + 0.1 * entropy.sum()).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("pack_tokens", [None, 64])
def test_response_logprobs_takes_the_tied_path_with_the_same_gradients(monkeypatch, pack_tokens):
    model, _ = build_tiny(seed=3)
    assert L.tied_trainable_weight(model) is model.lm_head.weight
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, model.config.vocab_size, (4, 12), generator=g)
    ids[2:, :5] = ids[0, :5]                                   # two rows share a prompt (the packed path shares it)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0                                            # left padding
    mask[3, -3:] = 0                                           # right padding
    T = 6

    returned = []                                              # the [V, H] block the head's backward hands back
    backward = L.ChunkedHead.backward

    def spy(ctx, *grads):
        out = backward(ctx, *grads)
        returned.append(out[1].data_ptr())
        return out

    monkeypatch.setattr(L.ChunkedHead, "backward", staticmethod(spy))
    tied = response_grad(model, ids, mask, T, pack_tokens)
    assert model.lm_head.weight.grad.data_ptr() == returned[-1]   # the rows added in place: no second block
    monkeypatch.setattr(L, "tied_trainable_weight", lambda m: None)   # the two gradients summed by autograd
    plain = response_grad(model, ids, mask, T, pack_tokens)
    for name, want in plain.items():
        assert torch.allclose(tied[name], want, atol=1e-6, rtol=1e-5), name
    assert plain["model.embed_tokens.weight"].abs().max() > 1e-4


def test_untied_frozen_or_no_grad_is_left_alone():
    model, _ = build_tiny(seed=3)
    with torch.no_grad():
        assert L.tied_trainable_weight(model) is None
    model.lm_head.weight.requires_grad_(False)                # LoRA freezes the base weights
    assert L.tied_trainable_weight(model) is None
    model.lm_head.weight.requires_grad_(True)
    model.model.embed_tokens.sparse = True
    assert L.tied_trainable_weight(model) is None
