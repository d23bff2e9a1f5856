"""On-policy distillation as credit: a teacher's per-token disagreement with the student's own samples.

For each sampled token a_t of a student rollout, the teacher term is the per-token reverse-KL estimate (k1)

    r_t = -coef * (log pi(a_t | s_t) - log pi_teacher(a_t | s_t))             (`teacher_token_rewards`)

a reward that is negative where the teacher finds the student's choice less likely than the student does
(Agarwal et al. 2023, GKD, arXiv 2306.13649; Thinking Machines 2025, "On-policy distillation"). Its expected
score-function gradient is exactly grad KL(pi || pi_teacher) for one token (tests/credit/test_teacher_kl.py):
E_a~pi[(log pi(a) - log pi_t(a)) grad log pi(a)] = grad sum_a pi(a) (log pi(a) - log pi_t(a)), as
E_a~pi[grad log pi(a)] = 0. The recipe puts r_t in `CreditInputs.token_rewards` (stage `teacher_logprobs`,
`train/teacher.py`), so any estimator that reads per-token rewards (reinforce_pp, gae, broadcast, ...) takes it,
and `teacher_kl` below uses it alone or beside an outcome estimator:

    credit: {estimator: teacher_kl}                                   pure distillation: A_t = r_t
    credit: {estimator: teacher_kl, options: {outcome: grpo}}         A_t = r_t + GRPO's advantage of the outcome
    credit: {estimator: teacher_kl, options: {gamma: 1.0}}            A_t = sum_{k>=t} r_k (the sequence KL's
                                                                      reward-to-go instead of the per-token term)

`teacher.estimator=exact` replaces the sampled term by its expectation: the exact KL(pi(. | s_t) || pi_teacher(. | s_t))
over the whole vocabulary at every response position, as a differentiable loss term (`exact_token_kl`; GKD,
Agarwal et al. 2023, with the reverse KL as its divergence and only student-sampled sequences). Its gradient is
the expectation of the sampled term's score-function gradient, so it points the same way with no sampling noise:
every position teaches the student about every token, not only the one it drew. The per-token reward is then 0
(the teacher's term is in the loss; `train/update.py`), and the credit estimators carry only the task outcome.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from llmrl.credit.estimators import CREDIT, Credit, CreditInputs, masked, require, reverse_discounted_sum


def teacher_token_rewards(logp: torch.Tensor, logp_teacher: torch.Tensor, mask: torch.Tensor, coef: float = 1.0
                          ) -> torch.Tensor:
    """-coef * (log pi - log pi_teacher) of each sampled token [N, T], 0 where mask [N, T] is 0; detached."""
    return torch.where(mask > 0, -coef * (logp - logp_teacher).detach(), 0.0)


def exact_token_kl(logp_all: torch.Tensor, logp_teacher_all: torch.Tensor) -> torch.Tensor:
    """[..., V] log pi and log pi_teacher over the vocabulary -> [...] KL(pi || pi_teacher) at each position,
    sum_v pi(v) (log pi(v) - log pi_teacher(v)); differentiable in logp_all (the teacher's side is detached)."""
    return (logp_all.exp() * (logp_all - logp_teacher_all.detach())).sum(-1)


@CREDIT.register("teacher_kl", needs=("teacher",), returns=False)
def teacher_kl(inputs: CreditInputs, *, outcome: str | None = None, outcome_options: dict | None = None,
               gamma: float = 0.0) -> Credit:
    """A_t = sum_{k>=t} gamma^(k-t) r_k over chosen tokens (gamma 0: r_t itself), r = token_rewards (the teacher
    term), plus, with `outcome`, the advantages that estimator gives the outcome scores alone."""
    require(inputs, "teacher_kl", "token_rewards")
    if outcome == "teacher_kl":
        raise ValueError("teacher_kl: outcome must name another estimator (e.g. grpo), not teacher_kl")
    chosen = inputs.response_mask > 0                                              # [N, T]
    adv = reverse_discounted_sum(masked(inputs.token_rewards, chosen), chosen, gamma)   # [N, T]
    if outcome is not None:
        adv = adv + CREDIT.get(outcome)(replace(inputs, token_rewards=None), **(outcome_options or {})).advantages
    return Credit(advantages=adv * inputs.response_mask)
