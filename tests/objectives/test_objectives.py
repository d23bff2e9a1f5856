"""Objective pieces: PPO clip (and dual clip), KL estimators, KL in the reward, KL controllers, loss aggregation —
hand-computed values, gradient signs, length bias and micro-batch invariance."""

import math

import pytest
import torch

from llmrl.objectives.kl import AdaptiveKLController, FixedKLController, kl_in_reward
from llmrl.objectives.policy import (
    AGGREGATIONS,
    BatchCounts,
    aggregate,
    clipped_surrogate,
    dual_clipped,
    kl_estimate,
    ppo_clip_objective,
)


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


# ----------------------------------------------------------------------------- dual clip (Ye et al. 2020)

def test_dual_clip_hand_computed():
    # ratios 4, 2, 4, 0.5 with advantages -1, -1, +1, -2; eps 0.2, c 3.
    # PPO losses: 4 (= -min(-4, -1.2)), 2, -1.2, 1.6; the cap c|A| = 3, 3, -, 6 binds only on the first.
    logp = torch.log(t([[4.0, 2.0, 4.0, 0.5]]))
    adv = t([[-1.0, -1.0, 1.0, -2.0]])
    ppo, _ = clipped_surrogate(logp, torch.zeros(1, 4), adv, clip_low=0.2, clip_high=0.2)
    assert torch.allclose(ppo, t([[4.0, 2.0, -1.2, 1.6]]), atol=1e-6)
    loss, capped = dual_clipped(ppo, adv, dual_clip=3.0)
    assert torch.allclose(loss, t([[3.0, 2.0, -1.2, 1.6]]), atol=1e-6)
    assert capped.tolist() == [[True, False, False, False]]


def test_dual_clip_in_objective_zeroes_capped_gradient_and_reports_fraction():
    logp = torch.log(t([[4.0, 2.0, 4.0, 0.5]])).requires_grad_()
    adv, m = t([[-1.0, -1.0, 1.0, -2.0]]), torch.ones(1, 4)
    out = ppo_clip_objective(logp, torch.zeros(1, 4), adv, m, BatchCounts.of(m), dual_clip=3.0)
    out.total.backward()
    assert out.losses["loss_policy"].item() == pytest.approx((3.0 + 2.0 - 1.2 + 1.6) / 4, abs=1e-6)
    assert out.metrics["dual_clip_fraction"].item() == pytest.approx(0.25)
    # capped token: gradient 0; token 1 (r = 2, A = -1) keeps the unclipped loss r |A|: d/dlogp = r |A| / 4 tokens
    assert logp.grad[0, 0] == 0 and logp.grad[0, 1] == pytest.approx(2.0 / 4)
    off = ppo_clip_objective(logp, torch.zeros(1, 4), adv, m, BatchCounts.of(m))
    assert "dual_clip_fraction" not in off.metrics
    assert off.losses["loss_policy"].item() == pytest.approx((4.0 + 2.0 - 1.2 + 1.6) / 4, abs=1e-6)


def test_dual_clip_must_exceed_one():
    with pytest.raises(ValueError, match="> 1"):
        dual_clipped(torch.ones(1, 1), -torch.ones(1, 1), dual_clip=1.0)


def test_approx_kl_old_is_k3_of_old_to_new():
    # r = pi / pi_old = 2 on every token: KL(old || new) k3 estimate = r - 1 - log r
    m = torch.ones(2, 3)
    out = ppo_clip_objective(torch.full((2, 3), math.log(2.0)), torch.zeros(2, 3), torch.ones(2, 3), m,
                             BatchCounts.of(m))
    assert out.metrics["approx_kl_old"].item() == pytest.approx(1.0 - math.log(2.0), abs=1e-6)


# ----------------------------------------------------------------------------- KL in the reward, controllers

def test_kl_in_reward_hand_computed_and_masked():
    logp_old = t([[math.log(0.5), math.log(0.2), 5.0]])
    logp_ref = t([[math.log(0.25), math.log(0.4), -math.inf]])   # junk on the padded position
    m = t([[1, 1, 0]])
    r = kl_in_reward(logp_old.requires_grad_(), logp_ref, m, beta=0.1)
    assert torch.allclose(r, t([[-0.1 * math.log(2), 0.1 * math.log(2), 0.0]]), atol=1e-7)
    assert not r.requires_grad


def test_adaptive_kl_moves_beta_toward_target():
    above = AdaptiveKLController(value=0.1, target=6.0, horizon=100)
    above.update(12.0, n_steps=10)                  # error clipped to +0.2: beta * (1 + 0.1 * 0.2)
    assert above.value == pytest.approx(0.1 * 1.02)
    below = AdaptiveKLController(value=0.1, target=6.0, horizon=100)
    below.update(5.4, n_steps=10)                   # error -0.1: beta * (1 - 0.1 * 0.1)
    assert below.value == pytest.approx(0.1 * 0.99)


def test_adaptive_kl_converges_when_kl_is_c_over_beta():
    c, target = 2.0, 0.5                             # fixed point beta* = c / target = 4
    ctl = AdaptiveKLController(value=0.05, target=target, horizon=10)
    for _ in range(400):
        ctl.update(c / ctl.value, n_steps=1)
    assert ctl.value == pytest.approx(c / target, rel=1e-6)


def test_kl_controllers_state_round_trip():
    a = AdaptiveKLController(value=0.2, target=1.0, horizon=50)
    a.update(3.0, n_steps=5)
    b = AdaptiveKLController(value=1.0, target=9.0, horizon=1)
    b.load_state_dict(a.state_dict())
    assert b == a
    f = FixedKLController(0.04)
    f.update(100.0, n_steps=10)
    g = FixedKLController(0.0)
    g.load_state_dict(f.state_dict())
    assert f.value == g.value == 0.04


# ----------------------------------------------------------------------------- length bias of the aggregations

def test_length_bias_of_seq_mean_token_mean():
    """Same negative advantage on a long (8) and a short (2) answer: per-token gradients differ by 1/len_i in
    seq-mean-token-mean (1/16 vs 1/4), and are equal in token-mean (1/10) and seq-mean-token-sum-norm (1/16)."""
    m = torch.zeros(2, 8)
    m[0], m[1, :2] = 1, 1
    adv = -torch.ones(2, 8)
    grads = {}
    for mode in ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"):
        logp = torch.zeros(2, 8, requires_grad=True)
        ppo_clip_objective(logp, logp.detach(), adv, m, BatchCounts.of(m), aggregation=mode).total.backward()
        grads[mode] = (logp.grad[0, 0].item(), logp.grad[1, 0].item())   # (long, short)
    assert grads["token-mean"] == pytest.approx((0.1, 0.1))
    assert grads["seq-mean-token-mean"] == pytest.approx((1 / 16, 1 / 4))
    assert grads["seq-mean-token-sum-norm"] == pytest.approx((1 / 16, 1 / 16))
