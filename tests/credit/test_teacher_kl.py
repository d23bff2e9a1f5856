"""teacher_kl: the per-token teacher term and its credit against slow loops; on a categorical policy (enumerated,
exact, float64) its expected policy gradient through the real objective equals grad KL(pi || pi_teacher)."""

from dataclasses import replace

import pytest
import torch

from llmrl.credit import CREDIT, CreditInputs, assign_credit
from llmrl.credit.teacher_kl import exact_token_kl, teacher_token_rewards
from llmrl.objectives.policy import BatchCounts, ppo_clip_objective


def _batch(seed=0, N=4, T=6):
    g = torch.Generator().manual_seed(seed)
    logp = -torch.rand(N, T, generator=g, dtype=torch.float64) * 3
    logp_t = -torch.rand(N, T, generator=g, dtype=torch.float64) * 3
    mask = torch.ones(N, T, dtype=torch.float64)
    mask[0, 4:] = 0
    mask[1, 2] = 0                      # a hole (a tool output)
    mask[3, 1:] = 0
    scores = torch.tensor([1.0, 0.0, 1.0, 0.0], dtype=torch.float64)
    return logp, logp_t, mask, scores, torch.tensor([0, 0, 1, 1])


def slow(logp, logp_t, mask, coef, gamma):
    """A_t = sum over the later chosen tokens k of gamma^(#chosen tokens between) * -coef (logp_k - logp_t_k)."""
    N, T = mask.shape
    out = torch.zeros(N, T, dtype=torch.float64)
    for i in range(N):
        chosen = [t for t in range(T) if mask[i, t] > 0]
        for j, t in enumerate(chosen):
            out[i, t] = sum(gamma ** (m - j) * -coef * (logp[i, k] - logp_t[i, k])
                            for m, k in enumerate(chosen) if m >= j)
    return out


@pytest.mark.parametrize("coef, gamma", [(1.0, 0.0), (0.5, 0.0), (1.0, 1.0), (2.0, 0.9)])
def test_teacher_kl_matches_a_slow_reference(coef, gamma):
    logp, logp_t, mask, scores, groups = _batch()
    r = teacher_token_rewards(logp, logp_t, mask, coef)
    assert torch.equal(r == 0, (mask == 0) | (logp == logp_t))
    inputs = CreditInputs(scores=scores, response_mask=mask, group_ids=groups, token_rewards=r)
    got = assign_credit("teacher_kl", inputs, gamma=gamma).advantages
    torch.testing.assert_close(got, slow(logp, logp_t, mask, coef, gamma), rtol=1e-12, atol=1e-12)
    assert torch.all(got[mask == 0] == 0)


def test_with_an_outcome_estimator_it_adds_that_estimators_advantage_of_the_scores_alone():
    logp, logp_t, mask, scores, groups = _batch(1)
    r = teacher_token_rewards(logp, logp_t, mask)
    inputs = CreditInputs(scores=scores, response_mask=mask, group_ids=groups, token_rewards=r)
    got = assign_credit("teacher_kl", inputs, outcome="grpo").advantages
    grpo = assign_credit("grpo", replace(inputs, token_rewards=None)).advantages
    torch.testing.assert_close(got, r + grpo)
    assert grpo.abs().sum() > 0


def test_it_needs_a_teacher_and_says_so():
    assert "teacher" in CREDIT.info("teacher_kl")["needs"] and CREDIT.info("teacher_kl")["returns"] is False
    _, _, mask, scores, groups = _batch()
    with pytest.raises(ValueError, match="token_rewards"):
        assign_credit("teacher_kl", CreditInputs(scores=scores, response_mask=mask, group_ids=groups))
    with pytest.raises(ValueError, match="another estimator"):
        assign_credit("teacher_kl", CreditInputs(scores=scores, response_mask=mask, group_ids=groups,
                                                 token_rewards=mask), outcome="teacher_kl")


@pytest.mark.parametrize("seed", range(4))
def test_expected_gradient_is_the_gradient_of_the_reverse_kl_to_the_teacher(seed):
    """One token from K: the policy's loss at pi_old = pi, each action a sampled with probability pi(a)."""
    K = 7
    g = torch.Generator().manual_seed(seed)
    theta = torch.randn(K, generator=g, dtype=torch.float64, requires_grad=True)
    logq = torch.log_softmax(torch.randn(K, generator=g, dtype=torch.float64) * 2, -1)      # the teacher
    logp = torch.log_softmax(theta, -1)                                                     # [K]
    (truth,) = torch.autograd.grad((logp.exp() * (logp - logq)).sum(), theta)
    expected = torch.zeros(K, dtype=torch.float64)
    for a in range(K):                              # E_a~pi [grad loss(a)]: the sampling weight pi(a) detached
        logp = torch.log_softmax(theta, -1)
        lp, mask = logp[a].view(1, 1), torch.ones(1, 1, dtype=torch.float64)
        inputs = CreditInputs(scores=torch.zeros(1, dtype=torch.float64), response_mask=mask,
                              group_ids=torch.zeros(1, dtype=torch.long),
                              token_rewards=teacher_token_rewards(lp, logq[a].view(1, 1), mask))
        adv = assign_credit("teacher_kl", inputs).advantages
        out = ppo_clip_objective(lp, lp.detach(), adv, mask, BatchCounts.of(mask))
        (g_a,) = torch.autograd.grad(out.losses["loss_policy"], theta)
        expected += logp[a].exp().detach() * g_a
    torch.testing.assert_close(expected, truth, rtol=1e-10, atol=1e-12)
    # a sign error would give -truth, and the k1 term without the log pi part would give another vector
    assert not torch.allclose(expected, -truth)


def test_with_reward_to_go_the_expected_gradient_is_that_of_the_sequence_kl():
    """Two tokens from K, the second's distribution depending on the first: with gamma = 1 the expected gradient
    over all K^2 sequences is grad KL(pi || pi_teacher) of whole sequences; the per-token term alone (gamma = 0)
    drops what the first token does to the second's KL, so it is another vector."""
    K = 4
    g = torch.Generator().manual_seed(7)
    t1 = torch.randn(K, generator=g, dtype=torch.float64, requires_grad=True)
    t2 = torch.randn(K, K, generator=g, dtype=torch.float64, requires_grad=True)
    q1 = torch.log_softmax(torch.randn(K, generator=g, dtype=torch.float64), -1)
    q2 = torch.log_softmax(torch.randn(K, K, generator=g, dtype=torch.float64), -1)
    p1, p2 = torch.log_softmax(t1, -1), torch.log_softmax(t2, -1)                 # [K], [K, K]
    seq_kl = sum(p1[a].exp() * p2[a, b].exp() * (p1[a] + p2[a, b] - q1[a] - q2[a, b])
                 for a in range(K) for b in range(K))
    truth = torch.autograd.grad(seq_kl, (t1, t2))

    def expected(gamma):
        out = [torch.zeros_like(t1), torch.zeros_like(t2)]
        mask = torch.ones(1, 2, dtype=torch.float64)
        for a in range(K):
            for b in range(K):
                p1, p2 = torch.log_softmax(t1, -1), torch.log_softmax(t2, -1)
                lp = torch.stack([p1[a], p2[a, b]]).view(1, 2)
                r = teacher_token_rewards(lp, torch.stack([q1[a], q2[a, b]]).view(1, 2), mask)
                inputs = CreditInputs(scores=torch.zeros(1, dtype=torch.float64), response_mask=mask,
                                      group_ids=torch.zeros(1, dtype=torch.long), token_rewards=r)
                adv = assign_credit("teacher_kl", inputs, gamma=gamma).advantages
                out_ = ppo_clip_objective(lp, lp.detach(), adv, mask, BatchCounts(1.0, 1.0, 2.0))   # token sum
                grads = torch.autograd.grad(out_.losses["loss_policy"], (t1, t2))
                w = (p1[a] + p2[a, b]).exp().detach()
                out = [o + w * gr for o, gr in zip(out, grads)]
        return out

    for got, want in zip(expected(1.0), truth):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    assert not torch.allclose(expected(0.0)[0], truth[0])


@pytest.mark.parametrize("seed", range(3))
def test_the_exact_term_is_the_kl_and_its_gradient_is_the_sampled_terms_expected_gradient(seed):
    """teacher.estimator=exact: the value is KL(pi || pi_teacher) (torch.distributions' own), and its gradient is
    the expectation over a ~ pi of the sampled term's gradient through credit and the objective: the same direction
    with no sampling noise."""
    K = 6
    g = torch.Generator().manual_seed(seed)
    theta = torch.randn(2, K, generator=g, dtype=torch.float64, requires_grad=True)      # two positions
    logq = torch.log_softmax(torch.randn(2, K, generator=g, dtype=torch.float64) * 2, -1)
    logp = torch.log_softmax(theta, -1)
    kl = exact_token_kl(logp, logq)                                                        # [2]
    want = torch.distributions.kl_divergence(torch.distributions.Categorical(logits=logp),
                                             torch.distributions.Categorical(logits=logq))
    torch.testing.assert_close(kl, want)
    (exact,) = torch.autograd.grad(kl.sum(), theta)
    sampled = torch.zeros_like(theta)
    mask = torch.ones(1, 1, dtype=torch.float64)
    for pos in range(2):
        for a in range(K):
            lp = torch.log_softmax(theta, -1)[pos, a].view(1, 1)
            inputs = CreditInputs(scores=torch.zeros(1, dtype=torch.float64), response_mask=mask,
                                  group_ids=torch.zeros(1, dtype=torch.long),
                                  token_rewards=teacher_token_rewards(lp, logq[pos, a].view(1, 1), mask))
            out = ppo_clip_objective(lp, lp.detach(), assign_credit("teacher_kl", inputs).advantages, mask,
                                     BatchCounts.of(mask))
            (g_a,) = torch.autograd.grad(out.losses["loss_policy"], theta)
            sampled += lp.exp().detach()[0, 0] * g_a
    torch.testing.assert_close(exact, sampled, rtol=1e-10, atol=1e-12)
    assert not torch.allclose(exact, -sampled)
    # the teacher side carries no gradient
    q = logq.clone().requires_grad_()
    exact_token_kl(torch.log_softmax(theta, -1), q).sum().backward()
    assert q.grad is None or not q.grad.any()
