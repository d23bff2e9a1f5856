"""DPO and KL-regularised RL reach the same policy, when the preferences are Bradley-Terry (and only then).

The seed: "LLM RL is equivalent to DPO supervised learning when you have preference data of the right sort ...
It falls apart when you need actual outcome rewards." This script shows both halves, exactly, on a policy over
K discrete answers (a one-token "language model" whose logits are the parameters):

(a) closed form     pi*(a) ∝ pi_ref(a) exp(r(a) / beta)       the optimum of E_pi[r] - beta KL(pi || pi_ref)
                                                              (Rafailov et al. 2023, eq. 4)
(b) RL              gradient ascent on E_pi[r] - beta KL(pi || pi_ref) with the exact policy gradient
                    E_{a~pi}[grad log pi(a) (r(a) - beta log(pi(a) / pi_ref(a)))] (the score-function estimator,
                    summed over all K answers instead of sampled), run to convergence
(c) DPO             `llmrl.objectives.preference.dpo_loss` on pairs (a, b) drawn from pi_ref, labelled by Bradley-Terry
                    P(a > b) = sigmoid(r(a) - r(b)), minimised to convergence (L-BFGS; the loss is convex here)

Then outcome rewards r(a) in {0, 1} ("passes the test"), with pairs labelled by a rule that is not Bradley-Terry
in r: (d) "the passing answer is always preferred" (what `build_pairs_from_task` produces), and (e) "the passing
answer is preferred with probability 0.9". DPO's optimum is then not the RL optimum of r: (d) is Bradley-Terry
only for an infinite reward gap, so DPO drives pi(fail) -> 0 however large beta is; (e) is Bradley-Terry in
r' = log(0.9 / 0.1) r, so DPO finds the RL optimum of r', a reward set by the labelling noise, not by r.

    python examples/dpo_equivalence.py          # prints the table; `run_equivalence()` returns the numbers
"""

from __future__ import annotations

import math

import torch

from llmrl.objectives.preference import dpo_loss

K = 6                                  # answers
BETA = 0.5                             # KL strength of the RL objective and DPO's beta
PAIR_COUNTS = (1_000, 10_000, 100_000, 1_000_000)
TOL_RL = 1e-3                          # TV(a, b) after 4000 plain policy-gradient steps: 1e-16 .. 1e-4 over
                                       # seeds 0-7 (plain gradient is slow on answers of near-zero probability)
TOL_DPO = 0.02                         # TV(a, c) with 1,000,000 Bradley-Terry pairs (sampling error only)
MIN_GAP_OUTCOME = 0.3                  # TV(RL optimum, DPO optimum) on outcome preferences is at least this


def total_variation(p: torch.Tensor, q: torch.Tensor) -> float:
    return 0.5 * float((p - q).abs().sum())


def closed_form(logp_ref: torch.Tensor, rewards: torch.Tensor, beta: float) -> torch.Tensor:   # [K] each -> [K]
    """(a) pi* ∝ pi_ref exp(r / beta)."""
    return torch.softmax(logp_ref + rewards / beta, -1)


def kl_regularised_rl(logp_ref, rewards, beta: float, *, steps: int = 4000, lr: float = 2.0) -> torch.Tensor:
    """(b) Gradient ascent on E_pi[r] - beta KL(pi || pi_ref) from pi = pi_ref, with the exact policy gradient."""
    logits = logp_ref.clone().requires_grad_(True)
    for _ in range(steps):
        logp = torch.log_softmax(logits, -1)                                       # [K]
        pi = logp.exp().detach()
        shaped = (rewards - beta * (logp - logp_ref)).detach()                     # reward with the KL penalty (k1)
        surrogate = (pi * logp * (shaped - (pi * shaped).sum())).sum()             # E_pi[log pi * advantage]
        (grad,) = torch.autograd.grad(surrogate, logits)
        with torch.no_grad():
            logits += lr * grad
    return torch.softmax(logits.detach(), -1)


def sample_pairs(logp_ref, n: int, label_prob, generator) -> torch.Tensor:
    """counts [K, K]: counts[w, l] = pairs where w was preferred to l. Both answers are drawn from pi_ref
    (ties dropped); `label_prob(a, b)` [n] is the probability that a is preferred; None drops the pair."""
    a = torch.multinomial(logp_ref.exp(), n, replacement=True, generator=generator)
    b = torch.multinomial(logp_ref.exp(), n, replacement=True, generator=generator)
    prob = label_prob(a, b)
    keep = (a != b) & ~prob.isnan()
    a_wins = torch.rand(n, generator=generator, dtype=prob.dtype) < prob
    w, l = torch.where(a_wins, a, b)[keep], torch.where(a_wins, b, a)[keep]
    return torch.bincount(w * K + l, minlength=K * K).view(K, K).to(logp_ref.dtype)


def dpo_fit(logp_ref, counts, beta: float, *, iterations: int = 100) -> tuple[torch.Tensor, float]:
    """(c) Minimise the mean DPO loss over the counted pairs (each distinct pair weighted by its count).
    Returns (policy [K], final loss)."""
    w, l = counts.nonzero(as_tuple=True)                                           # distinct (chosen, rejected)
    weights = counts[w, l] / counts.sum()
    logits = logp_ref.clone().requires_grad_(True)
    opt = torch.optim.LBFGS([logits], lr=1.0, max_iter=iterations, tolerance_grad=1e-12, tolerance_change=1e-15,
                            history_size=20, line_search_fn="strong_wolfe")

    def loss_fn():
        opt.zero_grad()
        logp = torch.log_softmax(logits, -1)
        out = dpo_loss(logp[w], logp[l], logp_ref[w], logp_ref[l], beta=beta)
        loss = (out.per_pair_loss * weights).sum()
        loss.backward()
        return loss

    opt.step(loss_fn)
    return torch.softmax(logits.detach(), -1), float(loss_fn().detach())


def run_equivalence(seed: int = 0) -> dict:
    """All the numbers the table prints (see the module docstring for (a)-(e))."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)                     # K-sized tensors: threads only add overhead
    try:
        return _run(seed)
    finally:
        torch.set_num_threads(threads)


def _run(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    logp_ref = torch.log_softmax(torch.randn(K, generator=g, dtype=torch.float64), -1)
    rewards = torch.randn(K, generator=g, dtype=torch.float64)

    # Bradley-Terry preferences in r: (a) = (b) = (c)
    pi_star = closed_form(logp_ref, rewards, BETA)
    pi_rl = kl_regularised_rl(logp_ref, rewards, BETA)
    bt = lambda a, b: torch.sigmoid(rewards[a] - rewards[b])                      # noqa: E731
    tv_dpo = {}
    for n in PAIR_COUNTS:
        pi_dpo, _ = dpo_fit(logp_ref, sample_pairs(logp_ref, n, bt, g), BETA)
        tv_dpo[n] = total_variation(pi_star, pi_dpo)

    # outcome rewards: the two answers the reference finds least likely pass (the right answer is rare)
    outcome = torch.zeros(K, dtype=torch.float64)
    outcome[logp_ref.argsort()[:2]] = 1.0
    pi_star_o = closed_form(logp_ref, outcome, BETA)
    pi_rl_o = kl_regularised_rl(logp_ref, outcome, BETA)
    n = PAIR_COUNTS[-1]
    nan = torch.tensor(float("nan"), dtype=torch.float64)

    def rule(p_pass):   # prefer the passing answer with probability p_pass; no pair when both pass or both fail
        return lambda a, b: torch.where(outcome[a] == outcome[b], nan, torch.where(outcome[a] > outcome[b],
                                        torch.tensor(p_pass, dtype=torch.float64),
                                        torch.tensor(1 - p_pass, dtype=torch.float64)))

    pi_det, loss_det = dpo_fit(logp_ref, sample_pairs(logp_ref, n, rule(1.0), g), BETA)
    pi_noisy, _ = dpo_fit(logp_ref, sample_pairs(logp_ref, n, rule(0.9), g), BETA)
    rescaled = closed_form(logp_ref, math.log(0.9 / 0.1) * outcome, BETA)
    pass_mass = lambda pi: float((pi * outcome).sum())                             # noqa: E731
    deterministic = {"tv_rl_vs_dpo": total_variation(pi_rl_o, pi_det), "pass_mass_dpo": pass_mass(pi_det),
                     "dpo_final_loss": loss_det}
    noisy = {"tv_rl_vs_dpo": total_variation(pi_rl_o, pi_noisy), "pass_mass_dpo": pass_mass(pi_noisy),
             "tv_dpo_vs_rescaled_closed_form": total_variation(rescaled, pi_noisy)}
    return {
        "K": K, "beta": BETA, "seed": seed,
        "pi_ref": logp_ref.exp().tolist(), "rewards": rewards.tolist(), "outcome_reward": outcome.tolist(),
        "bt": {"pi_star": pi_star.tolist(), "pi_rl": pi_rl.tolist(),
               "tv_closed_vs_rl": total_variation(pi_star, pi_rl), "tv_closed_vs_dpo": tv_dpo},
        "outcome": {"tv_closed_vs_rl": total_variation(pi_star_o, pi_rl_o), "pass_mass_ref": pass_mass(logp_ref.exp()),
                    "pass_mass_rl": pass_mass(pi_rl_o), "deterministic": deterministic, "noisy_0.9": noisy},
        "tolerances": {"rl": TOL_RL, "dpo": TOL_DPO, "outcome_gap": MIN_GAP_OUTCOME},
    }


def main() -> None:
    res = run_equivalence()
    bt, o = res["bt"], res["outcome"]
    fmt = lambda xs: "[" + ", ".join(f"{x:.3f}" for x in xs) + "]"                # noqa: E731
    print(f"K = {res['K']} answers, beta = {res['beta']}")
    print(f"pi_ref  = {fmt(res['pi_ref'])}\nr       = {fmt(res['rewards'])}")
    print(f"pi*     = {fmt(bt['pi_star'])}   (a) closed form\npi_RL   = {fmt(bt['pi_rl'])}   (b) policy gradient\n")
    print("Bradley-Terry preferences                          total variation")
    print(f"  (a) closed form vs (b) KL-regularised RL         {bt['tv_closed_vs_rl']:.2e}   (tolerance {TOL_RL:g})")
    for n, tv in bt["tv_closed_vs_dpo"].items():
        print(f"  (a) closed form vs (c) DPO, {n:>9,} pairs      {tv:.4f}" +
              (f"     (tolerance {TOL_DPO:g})" if n == PAIR_COUNTS[-1] else ""))
    print(f"\nOutcome reward r = {fmt(res['outcome_reward'])}; pass mass: pi_ref {o['pass_mass_ref']:.3f}, "
          f"RL optimum {o['pass_mass_rl']:.3f}")
    d, q = o["deterministic"], o["noisy_0.9"]
    print(f"  (a) vs (b) for the outcome reward                {o['tv_closed_vs_rl']:.2e}")
    print(f"  (d) 'pass always preferred':   RL vs DPO         {d['tv_rl_vs_dpo']:.4f}   "
          f"DPO pass mass {d['pass_mass_dpo']:.4f}, loss {d['dpo_final_loss']:.1e} (-> 0: margins grow without bound)")
    print(f"  (e) 'pass preferred w.p. 0.9': RL vs DPO         {q['tv_rl_vs_dpo']:.4f}   "
          f"DPO pass mass {q['pass_mass_dpo']:.4f}; DPO vs RL optimum of log(9) r: "
          f"{q['tv_dpo_vs_rescaled_closed_form']:.4f}")
    print(f"  (RL-vs-DPO gaps above {MIN_GAP_OUTCOME:g} count as 'not equivalent')")


if __name__ == "__main__":
    main()
