"""Which KL estimator has the right gradient in which placement — computed EXACTLY, not sampled.

One state, a categorical policy pi = softmax(theta) over K actions with the logits theta as parameters, a fixed
pi_ref. Every expectation over x ~ pi is a sum over the K actions weighted by pi (detached: the sampling
distribution is not differentiated, as in a real rollout). Truths by autograd on the closed forms:
    g_rev = grad KL(pi || pi_ref)   (the seed's constraint)      g_fwd = grad KL(pi_ref || pi)
The table these tests prove is in the docstring of llmrl.objectives.kl. float64 throughout.
"""

import pytest
import torch

from llmrl.objectives.kl import KL_ESTIMATORS, kl_estimate, kl_in_reward

K = 6


def setup(seed):
    g = torch.Generator().manual_seed(seed)
    theta = torch.randn(K, generator=g, dtype=torch.float64, requires_grad=True)
    logq = torch.log_softmax(torch.randn(K, generator=g, dtype=torch.float64), -1)
    return theta, logq


def grad(f, theta):
    (out,) = torch.autograd.grad(f, theta)
    return out


def truths(theta, logq):
    logp = torch.log_softmax(theta, -1)
    g_rev = grad((logp.exp() * (logp - logq)).sum(), theta)
    logp = torch.log_softmax(theta, -1)
    g_fwd = grad((logq.exp() * (logq - logp)).sum(), theta)
    return g_rev, g_fwd


def in_loss(theta, logq, kind):
    """E_{x~pi}[grad k(x)]: the estimator as a loss term, differentiated through log pi(x) only."""
    logp = torch.log_softmax(theta, -1)
    return grad((logp.exp().detach() * kl_estimate(logp, logq, kind)).sum(), theta)


def in_reward(theta, logq, kind):
    """E_{x~pi}[k(x) grad log pi(x)]: the estimator as a (detached) reward, score-function gradient."""
    logp = torch.log_softmax(theta, -1)
    k = kl_estimate(logp, logq, kind).detach()
    return grad((logp.exp().detach() * k * logp).sum(), theta)


def full(theta, logq, kind):
    """grad E_{x~pi}[k(x)]: both the sampling distribution and the estimator differentiated."""
    logp = torch.log_softmax(theta, -1)
    return grad((logp.exp() * kl_estimate(logp, logq, kind)).sum(), theta)


def close(a, b):
    return torch.allclose(a, b, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("seed", range(5))
def test_truths_are_distinct(seed):
    g_rev, g_fwd = truths(*setup(seed))
    assert g_rev.norm() > 1e-2 and g_fwd.norm() > 1e-2 and (g_rev - g_fwd).norm() > 1e-2


@pytest.mark.parametrize("seed", range(5))
def test_in_loss_k1_has_zero_expected_gradient(seed):
    theta, logq = setup(seed)
    assert close(in_loss(theta, logq, "k1"), torch.zeros(K, dtype=torch.float64))


@pytest.mark.parametrize("seed", range(5))
def test_in_loss_k2_is_reverse_kl_gradient(seed):
    theta, logq = setup(seed)
    g_rev, _ = truths(theta, logq)
    assert close(in_loss(theta, logq, "k2"), g_rev)


@pytest.mark.parametrize("seed", range(5))
def test_in_loss_k3_is_forward_kl_gradient(seed):
    theta, logq = setup(seed)
    g_rev, g_fwd = truths(theta, logq)
    got = in_loss(theta, logq, "k3")
    assert close(got, g_fwd) and not torch.allclose(got, g_rev, atol=1e-3)


@pytest.mark.parametrize("seed", range(5))
def test_in_reward_k1_is_reverse_kl_gradient(seed):
    theta, logq = setup(seed)
    g_rev, _ = truths(theta, logq)
    assert close(in_reward(theta, logq, "k1"), g_rev)


@pytest.mark.parametrize("seed", range(5))
def test_in_reward_k2_and_k3_are_wrong(seed):
    theta, logq = setup(seed)
    g_rev, g_fwd = truths(theta, logq)
    k2 = in_reward(theta, logq, "k2")
    assert not torch.allclose(k2, g_rev, atol=1e-3) and not torch.allclose(k2, g_fwd, atol=1e-3)
    assert close(in_reward(theta, logq, "k3"), g_rev - g_fwd)


@pytest.mark.parametrize("seed", range(5))
def test_full_gradient_of_unbiased_estimators_is_reverse_kl(seed):
    theta, logq = setup(seed)
    g_rev, _ = truths(theta, logq)
    assert close(full(theta, logq, "k1"), g_rev) and close(full(theta, logq, "k3"), g_rev)
    assert not torch.allclose(full(theta, logq, "k2"), g_rev, atol=1e-3)


@pytest.mark.parametrize("seed", range(3))
def test_kl_in_reward_through_reinforce_descends_reverse_kl(seed):
    """-beta * k1 from `kl_in_reward` as a per-token reward, through the REINFORCE loss -E[R log pi]: beta g_rev."""
    theta, logq = setup(seed)
    g_rev, _ = truths(theta, logq)
    beta = 0.3
    logp = torch.log_softmax(theta, -1)
    reward = kl_in_reward(logp[None], logq[None], torch.ones(1, K), beta)[0]   # each action as a one-token response
    loss = -(logp.exp().detach() * reward * logp).sum()
    assert not reward.requires_grad
    assert close(grad(loss, theta), beta * g_rev)


@pytest.mark.parametrize("kind", KL_ESTIMATORS)
def test_estimator_gradient_matches_finite_differences(kind):
    g = torch.Generator().manual_seed(0)
    logp = (torch.randn(3, 4, generator=g, dtype=torch.float64) - 1).requires_grad_()
    logp_ref = (torch.randn(3, 4, generator=g, dtype=torch.float64) - 1).requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: kl_estimate(a, b, kind), (logp, logp_ref), eps=1e-6, atol=1e-8)


def test_estimator_gradient_hand_derived():
    """d k / d log pi at log r = log 2: k1 -> 1, k2 -> log r, k3 -> 1 - 1/r."""
    log_r = torch.log(torch.tensor(2.0, dtype=torch.float64))
    want = {"k1": 1.0, "k2": float(log_r), "k3": 0.5}
    for kind, w in want.items():
        logp = log_r.clone().requires_grad_()
        (d,) = torch.autograd.grad(kl_estimate(logp, torch.zeros((), dtype=torch.float64), kind), logp)
        assert float(d) == pytest.approx(w, abs=1e-12), kind


# ----------------------------------------------------------------------------- reused data: the ratio weight

def old_policy(seed):
    g = torch.Generator().manual_seed(100 + seed)
    return torch.log_softmax(torch.randn(K, generator=g, dtype=torch.float64), -1)


def in_loss_off_policy(theta, logq, logp_old, kind, weighted):
    """E_{x~pi_old}[grad term(x)]: tokens of a reused rollout, sampled by pi_old, the term weighted or not."""
    from llmrl.objectives.policy import off_policy_kl

    logp = torch.log_softmax(theta, -1)
    term = off_policy_kl(logp, logp_old, logq, kind) if weighted else kl_estimate(logp, logq, kind)
    return grad((logp_old.exp() * term).sum(), theta)


@pytest.mark.parametrize("seed", range(5))
def test_reused_data_kl_in_loss_is_exact_once_weighted(seed):
    """epochs or minibatches > 1: the rollout came from pi_old != pi. With the detached weight pi / pi_old, k2 in the
    loss has exactly the reverse-KL gradient (and k3 the forward one) of the current policy; without it, neither."""
    theta, logq = setup(seed)
    logp_old = old_policy(seed)
    g_rev, g_fwd = truths(theta, logq)
    assert close(in_loss_off_policy(theta, logq, logp_old, "k2", weighted=True), g_rev)
    assert close(in_loss_off_policy(theta, logq, logp_old, "k3", weighted=True), g_fwd)
    assert not torch.allclose(in_loss_off_policy(theta, logq, logp_old, "k2", weighted=False), g_rev, atol=1e-3)


def test_objective_kl_term_is_the_weighted_one_and_on_policy_unchanged():
    from llmrl.objectives.policy import BatchCounts, aggregate, off_policy_kl, ppo_clip_objective

    g = torch.Generator().manual_seed(0)
    logp, logp_ref = torch.randn(3, 4, generator=g) - 2, torch.randn(3, 4, generator=g) - 2
    logp_old = logp + 0.3 * torch.randn(3, 4, generator=g)
    m, adv = torch.ones(3, 4), torch.randn(3, 4, generator=g)
    c = BatchCounts.of(m)
    out = ppo_clip_objective(logp, logp_old, adv, m, c, logp_ref=logp_ref, kl_coef=0.5, kl_estimator="k2")
    want = 0.5 * aggregate(off_policy_kl(logp, logp_old, logp_ref, "k2"), m, "token-mean", c)
    assert torch.equal(out.losses["loss_kl_to_ref"], want)
    assert not torch.allclose(want, 0.5 * aggregate(kl_estimate(logp, logp_ref, "k2"), m, "token-mean", c))
    # one on-policy pass: pi_old = sg(pi), the weight is exactly 1 and the term bit for bit the unweighted one
    lp = logp.clone().requires_grad_()
    on = off_policy_kl(lp, lp.detach(), logp_ref, "k3")
    assert torch.equal(on, kl_estimate(lp, logp_ref, "k3"))
