"""Objective pieces: PPO clip, KL estimators, loss aggregation — hand-computed values, gradient signs,
and micro-batch invariance."""

import math

import pytest
import torch

from llmrl.objectives.policy import AGGREGATIONS, BatchCounts, aggregate, clipped_surrogate, kl_estimate, ppo_clip_objective


def t(x):
    return torch.tensor(x, dtype=torch.float32)


def test_clipped_surrogate_hand_computed():
    # ratios 1.5, 0.5, 0.5, 1.1 with advantages +1, +1, -1, +1 and eps 0.2
    logp_old = torch.zeros(1, 4)
    logp = torch.log(t([[1.5, 0.5, 0.5, 1.1]]))
    loss, clipped = clipped_surrogate(logp, logp_old, t([[1.0, 1.0, -1.0, 1.0]]), clip_low=0.2, clip_high=0.2)
    assert torch.allclose(loss, t([[-1.2, -0.5, 0.8, -1.1]]), atol=1e-6)
    assert clipped.tolist() == [[True, False, True, False]]


def test_asymmetric_clip_bounds():
    logp = torch.log(t([[1.3, 0.7]]))
    loss, _ = clipped_surrogate(logp, torch.zeros(1, 2), t([[1.0, -1.0]]), clip_low=0.1, clip_high=0.28)
    assert torch.allclose(loss, t([[-1.28, 0.9]]), atol=1e-6)


def test_policy_gradient_sign_raises_good_tokens():
    """Descending the loss must raise log-probs of positive-advantage tokens and lower negative ones."""
    logp = torch.zeros(2, 3, requires_grad=True)
    adv = t([[1.0, 1.0, 1.0], [-1.0, -1.0, -1.0]])
    out = ppo_clip_objective(logp, logp.detach(), adv, torch.ones(2, 3), BatchCounts.of(torch.ones(2, 3)))
    out.total.backward()
    assert torch.all(logp.grad[0] < 0) and torch.all(logp.grad[1] > 0)


def test_kl_estimators_hand_computed():
    logp, logp_ref = t([[math.log(0.5)]]), t([[math.log(0.25)]])   # r = pi / pi_ref = 2
    assert torch.allclose(kl_estimate(logp, logp_ref, "k1"), t([[math.log(2)]]))
    assert torch.allclose(kl_estimate(logp, logp_ref, "k2"), t([[0.5 * math.log(2) ** 2]]))
    assert torch.allclose(kl_estimate(logp, logp_ref, "k3"), t([[0.5 - 1 + math.log(2)]]))


def test_k3_is_nonnegative_and_zero_at_equality():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(50, generator=g), torch.randn(50, generator=g)
    assert torch.all(kl_estimate(a, b, "k3") >= 0)
    assert torch.all(kl_estimate(a, a, "k3") == 0)


def test_kl_estimators_agree_in_expectation():
    """Sampled from pi, mean k1 and k3 both estimate KL(pi || pi_ref) of two known categoricals."""
    p, q = t([0.6, 0.3, 0.1]), t([0.2, 0.5, 0.3])
    true_kl = float((p * (p / q).log()).sum())
    x = torch.multinomial(p, 200_000, replacement=True, generator=torch.Generator().manual_seed(0))
    lp, lq = p.log()[x], q.log()[x]
    for kind in ("k1", "k3"):
        assert abs(float(kl_estimate(lp, lq, kind).mean()) - true_kl) < 0.01


def test_aggregation_hand_computed():
    x = t([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]])
    m = t([[1, 1, 1], [1, 0, 0]])
    c = BatchCounts.of(m, max_len=4)
    assert aggregate(x, m, "token-mean", c).item() == pytest.approx(10 / 4)
    assert aggregate(x, m, "seq-mean-token-mean", c).item() == pytest.approx((2 + 4) / 2)
    assert aggregate(x, m, "seq-mean-token-sum", c).item() == pytest.approx((6 + 4) / 2)
    assert aggregate(x, m, "seq-mean-token-sum-norm", c).item() == pytest.approx(10 / (2 * 4))


@pytest.mark.parametrize("mode", AGGREGATIONS)
def test_aggregation_is_invariant_to_micro_batching(mode):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 5, generator=g, requires_grad=True)
    m = (torch.rand(6, 5, generator=g) > 0.3).float()
    c = BatchCounts.of(m)
    full = aggregate(x, m, mode, c)
    (g_full,) = torch.autograd.grad(full, x)
    parts = sum(aggregate(x[i:i + 2], m[i:i + 2], mode, c) for i in range(0, 6, 2))
    (g_parts,) = torch.autograd.grad(parts, x)
    assert torch.allclose(full, parts, atol=1e-6) and torch.allclose(g_full, g_parts, atol=1e-6)


def test_masked_positions_never_matter():
    g = torch.Generator().manual_seed(0)
    logp, adv = torch.randn(3, 4, generator=g), torch.randn(3, 4, generator=g)
    m = t([[1, 1, 0, 0], [1, 1, 1, 0], [1, 0, 0, 0]])
    c = BatchCounts.of(m)
    a = ppo_clip_objective(logp, logp * 0.9, adv, m, c, logp_ref=logp * 1.1, kl_coef=0.1).total
    junk = torch.where(m.bool(), logp, t(123.0))
    b = ppo_clip_objective(junk, torch.where(m.bool(), logp * 0.9, t(-50.0)), torch.where(m.bool(), adv, t(9.0)), m, c,
                           logp_ref=torch.where(m.bool(), logp * 1.1, t(7.0)), kl_coef=0.1).total
    assert torch.allclose(a, b, atol=1e-6)


def test_unknown_aggregation_lists_valid():
    with pytest.raises(ValueError, match="token-mean"):
        aggregate(torch.ones(1, 1), torch.ones(1, 1), "mean", BatchCounts.of(torch.ones(1, 1)))
