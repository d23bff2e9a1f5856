"""The update phase: micro-batching and skipping zero-advantage rows must not change the step."""

import copy

import pytest
import torch

from functools import partial

from llmrl.data import Example
from llmrl.objectives.policy import AGGREGATIONS, ppo_clip_objective
from llmrl.rollout.collect import collect_rollout
from llmrl.compute.batches import micro_batches
from llmrl.compute.settings import Execution
from llmrl.train.update import Passes, policy_update


@pytest.fixture(scope="module")
def rollout(tiny):
    model, tok = tiny
    exs = [Example("What is 1 + 2?", "3"), Example("Say hi", "hi"), Example("abc", "d")]
    return collect_rollout(model, tok, exs, group_size=2, max_new_tokens=6, temperature=1.0,
                           generator=torch.Generator().manual_seed(0))


def step(model, rollout, adv, *, micro, skip, aggregation="token-mean", tokens=None):
    m = copy.deepcopy(model).train()
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    objective = partial(ppo_clip_objective, aggregation=aggregation)
    policy_update(m, opt, rollout, adv, objective, Execution(micro_batch_size=micro, micro_batch_tokens=tokens, max_len=6),
                  Passes(max_grad_norm=1e9), skip_zero_advantage=skip)
    return torch.cat([p.detach().flatten() for p in m.parameters()])


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
def test_micro_batch_size_does_not_change_the_update(tiny, rollout, aggregation):
    model, _ = tiny
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5, 2.0, 0.0])[:, None] * rollout.response_mask
    before = torch.cat([p.detach().flatten() for p in model.parameters()])
    whole = step(model, rollout, adv, micro=6, skip=False, aggregation=aggregation)
    pieces = step(model, rollout, adv, micro=1, skip=False, aggregation=aggregation)
    assert not torch.allclose(whole, before)
    assert torch.allclose(whole, pieces, atol=1e-6)


def test_micro_batches_keep_order_and_bound_the_padded_tokens(rollout):
    P = rollout.prompt_len
    prompt_len = rollout.attention_mask[:, :P].sum(-1)
    resp_len = rollout.attention_mask[:, P:].sum(-1)
    rows = torch.arange(len(rollout.completions))
    longest = int(prompt_len.max() + resp_len.max())
    for budget in (1, longest, 2 * longest, 10**6):
        parts = micro_batches(rows, rollout, 4, budget)
        assert torch.equal(torch.cat(parts), rows)                     # every row once, in order
        for part in parts:
            assert len(part) <= 4
            padded = len(part) * int(prompt_len[part].max() + resp_len[part].max())
            assert len(part) == 1 or padded <= budget                  # a row over the budget goes alone
    assert all(len(p) == 1 for p in micro_batches(rows, rollout, 4, 1))
    assert [len(p) for p in micro_batches(rows, rollout, 4, None)] == [4, 2]


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
def test_a_token_budget_does_not_change_the_update(tiny, rollout, aggregation):
    model, _ = tiny
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5, 2.0, 0.0])[:, None] * rollout.response_mask
    whole = step(model, rollout, adv, micro=6, skip=False, aggregation=aggregation)
    budgeted = step(model, rollout, adv, micro=6, skip=False, aggregation=aggregation, tokens=80)   # splits 2 + 2 + 2
    assert torch.allclose(whole, budgeted, atol=1e-6)


def test_skipping_zero_advantage_rows_is_exact(tiny, rollout):
    model, _ = tiny
    adv = torch.tensor([1.0, -1.0, 0.0, 0.0, 0.0, 0.0])[:, None] * rollout.response_mask
    assert torch.allclose(step(model, rollout, adv, micro=2, skip=True), step(model, rollout, adv, micro=2, skip=False),
                          atol=1e-6)


def test_early_stop_on_kl_target_cuts_the_epochs(tiny, rollout):
    model, _ = tiny
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5, 2.0, -2.0])[:, None] * rollout.response_mask

    def passes(early_stop_kl):
        m = copy.deepcopy(model).train()
        out = policy_update(m, torch.optim.SGD(m.parameters(), lr=0.5), rollout, adv, ppo_clip_objective,
                            Execution(micro_batch_size=6, max_len=6), Passes(4, 2, 1e9, early_stop_kl),
                            generator=torch.Generator().manual_seed(0))
        return out["update_passes"], out["early_stopped"]

    assert passes(None) == (8.0, 0.0)
    n, stopped = passes(1e-9)
    assert stopped == 1.0 and n < 8


def test_bf16_autocast_matches_fp32_loss_and_gradient(tiny):
    """bf16 autocast over fp32 master weights: the same loss and gradient as fp32, within bf16's precision.

    Tolerances (stated): relative error of each loss term < 5e-3; the flattened gradient's cosine similarity
    > 0.9999 and relative norm error ||g_bf16 - g_fp32|| / ||g_fp32|| < 1.5e-2 (bf16 keeps 8 significant bits,
    2^-8 = 0.4%; measured here: 1.3e-3 on the KL term, cosine 0.999997, norm error 4.6e-3). Rounding the
    returned log-probs to bf16 (instead of keeping the head's fp32 log-softmax) fails the KL term's bound."""
    from llmrl.models import build_tiny
    from llmrl.compute.batches import batched_logprobs

    model, tok = tiny
    exs = [Example("What is 1 + 2?", "3"), Example("Say hi", "hi"), Example("abc", "d")]
    r = collect_rollout(model, tok, exs, group_size=2, max_new_tokens=12, temperature=1.0,
                        generator=torch.Generator().manual_seed(0))
    reference, _ = build_tiny(1)
    r = r.with_(logp_ref=batched_logprobs(reference, r, Execution(micro_batch_size=6)))
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5, 2.0, -1.5])[:, None] * r.response_mask    # sums to != 0

    def update(amp):   # SGD with lr 1 and no clipping: the step is minus the gradient
        m = copy.deepcopy(model).train()
        before = [p.detach().clone() for p in m.parameters()]
        out = policy_update(m, torch.optim.SGD(m.parameters(), lr=1.0), r, adv,
                            partial(ppo_clip_objective, kl_coef=1.0, entropy_coef=0.1),
                            Execution(autocast_dtype=amp, micro_batch_size=3, max_len=12), Passes(max_grad_norm=1e9))
        assert all(p.dtype == torch.float32 for p in m.parameters())    # fp32 master weights
        return out, torch.cat([(b - p.detach()).flatten() for b, p in zip(before, m.parameters())])

    (want, g32), (got, g16) = update(None), update(torch.bfloat16)
    for k in ("loss_policy", "loss_kl_to_ref", "loss_entropy"):
        assert abs(got[k] - want[k]) < 5e-3 * abs(want[k]), (k, got[k], want[k])
    assert torch.nn.functional.cosine_similarity(g16, g32, 0) > 0.9999
    assert (g16 - g32).norm() < 1.5e-2 * g32.norm()
    assert not torch.equal(g16, g32)            # autocast did run in bf16


def test_engine_tis_in_the_update_equals_a_forward_before_it(tiny, rollout):
    """engine_correction: pi_old and the TIS weight from the update's own forward give the step that a separate
    forward over the rollout (logp_old = pi, is_weight = min(pi / mu, cap)) gives, and the mismatch stats."""
    from llmrl.objectives.mismatch import Correction, truncated_is_weight
    from llmrl.compute.batches import batched_logprobs

    model, _ = tiny
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5, 2.0, -1.5])[:, None] * rollout.response_mask
    pi = batched_logprobs(model, rollout, Execution(micro_batch_size=6))
    mu = (pi - 0.3 * torch.linspace(-1, 1, 6)[:, None]) * rollout.response_mask    # engine: off by -0.3 .. +0.3

    def run(r, **kw):
        m = copy.deepcopy(model).train()
        out = policy_update(m, torch.optim.SGD(m.parameters(), lr=0.1), r, adv, ppo_clip_objective,
                            Execution(micro_batch_size=2, max_len=6), Passes(max_grad_norm=1e9), **kw)
        return out, torch.cat([p.detach().flatten() for p in m.parameters()])

    out, got = run(rollout.with_(logp_old=mu), engine_correction=Correction("tis_token", cap=1.2))
    _, want = run(rollout.with_(logp_old=pi, is_weight=truncated_is_weight(pi, mu, cap=1.2)))
    assert torch.allclose(got, want, atol=1e-6)
    assert out["mismatch_logp_abs_max"] == pytest.approx(0.3, abs=1e-4)
    assert 0 < out["tis_truncated_fraction"] < 1          # exp(0.3) > 1.2 > exp(0.1): some rows are truncated
    with pytest.raises(ValueError, match="one on-policy"):
        policy_update(model, None, rollout, adv, ppo_clip_objective, Execution(micro_batch_size=2, max_len=6),
                      Passes(epochs=2), engine_correction=Correction("tis_token", cap=1.2))


def test_gradients_are_freed_after_the_step(tiny, rollout):
    """The step's gradients are dead once the optimizer has stepped: they must not be held through the next
    rollout (at 135M parameters, 513 MiB)."""
    model, _ = tiny
    m = copy.deepcopy(model).train()
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5, 2.0, 0.0])[:, None] * rollout.response_mask
    before = [p.detach().clone() for p in m.parameters()]
    policy_update(m, opt, rollout, adv, ppo_clip_objective, Execution(micro_batch_size=2, max_len=6),
                  Passes(minibatches=2), skip_zero_advantage=True)
    assert any(not torch.equal(a, p) for a, p in zip(before, m.parameters()))     # it did step
    assert all(p.grad is None for p in m.parameters())
