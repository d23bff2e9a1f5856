"""KL to a reference policy: per-token estimators, the KL-in-reward penalty, and the controllers of its weight beta.

Notation: N sequences, T response tokens; `mask` [N, T] is 1 on tokens the policy chose; r = pi / pi_ref at the
chosen token, so log r = logp - logp_ref. The seed's constraint is `Objective = Reward - beta * KL(new || original)`.

Estimators of KL(pi || pi_ref) from a token x ~ pi (Schulman 2020, "Approximating KL divergence"):

    k1 = log r                    unbiased value, high variance, can be negative
    k2 = (log r)^2 / 2            biased value (E[k2] != KL), low variance, >= 0
    k3 = 1/r - 1 + log r          unbiased value, >= 0 (GRPO's choice, Shao et al. 2024)

A KL term can sit in two places, and the estimator that gives the right gradient differs between them.
Results on one state (a categorical pi with logits as parameters, x ~ pi, pi_ref fixed), proven EXACTLY in
tests/objectives/test_kl_gradients.py by summing over actions weighted by pi (no sampling); "g_rev" = grad KL(pi || pi_ref)
(the seed's constraint), "g_fwd" = grad KL(pi_ref || pi):

    placement                                         k1              k2                    k3
    LOSS, pathwise          E[grad k(x)]              0 (wrong)       g_rev (right)         g_fwd (forward KL)
    REWARD, score function  E[k(x) grad log pi(x)]    g_rev (right)   neither (wrong)       g_rev - g_fwd (wrong)
    both                    grad E_pi[k(x)]           g_rev           grad E[k2] != g_rev   g_rev

So KL in the reward wants k1 (`kl_in_reward`; Ziegler et al. 2019), and KL in the loss wants k2 for the seed's
reverse-KL gradient. GRPO's k3 in the loss descends the forward KL(pi_ref || pi) instead: a valid regulariser, but
a different (mass-covering) one. Zhang et al. 2025, "On the design of KL-regularized policy gradient algorithms
for LLM reasoning" (arXiv 2505.17508), derive the weights that make each variant exact, off-policy included.

Deviation for sequences: a per-token term in the loss differentiates only through its own token, so k2-in-loss
gives the gradient of sum_t KL(pi(.|s_t) || pi_ref(.|s_t)) with the visited states s_t held fixed; the gradient
of the sequence-level KL also moves the state distribution, which only the reward placement captures, and only
when the credit estimator passes the penalty of later tokens back to earlier ones (reward-to-go, gamma = 1).
Off-policy (samples from pi_old != pi) the same results hold once each term is weighted by the detached ratio
pi / pi_old, since E_old[(pi / pi_old) f] = E_pi[f]: the loss term does so (`policy.off_policy_kl`; exact
in tests/objectives/test_kl_gradients.py), and on one on-policy pass the weight is exactly 1.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

KL_ESTIMATORS = ("k1", "k2", "k3")


def kl_estimate(logp: torch.Tensor, logp_ref: torch.Tensor, kind: str) -> torch.Tensor:
    """Per-token estimate of KL(pi || pi_ref) from tokens sampled from pi: [N, T], [N, T] -> [N, T]; see the table."""
    log_ratio = logp - logp_ref
    if kind == "k1":
        return log_ratio
    if kind == "k2":
        return 0.5 * log_ratio ** 2
    if kind == "k3":
        return torch.expm1(-log_ratio) + log_ratio
    raise ValueError(f"unknown KL estimator {kind!r}; valid: {', '.join(KL_ESTIMATORS)}")


def kl_in_reward(
    logp_old: torch.Tensor,   # [N, T] under the policy that sampled the tokens
    logp_ref: torch.Tensor,   # [N, T] under the reference policy
    mask: torch.Tensor,       # [N, T]
    beta: float,
) -> torch.Tensor:
    """Per-token reward -beta * k1 = -beta * log(pi_old / pi_ref) on chosen tokens, 0 elsewhere -> [N, T].

    Ziegler et al. 2019, eq. 2 (`R(x, y) = r(x, y) - beta log(pi(y|x) / rho(y|x))`), spread over the tokens as
    in Stiennon et al. 2020. Pass it to a credit estimator as `token_rewards`; it is a reward, so no gradient
    flows through it (detached). k1 is the estimator whose score-function gradient is the KL gradient (table above).
    """
    penalty = -beta * (logp_old - logp_ref).detach()
    return torch.where(mask.bool(), penalty, torch.zeros_like(penalty))   # not `* mask`: inf * 0 is nan


@dataclass
class FixedKLController:
    """A constant beta."""
    value: float

    def update(self, current_kl: float, n_steps: int) -> None:
        """Does nothing: beta is fixed (the signature matches AdaptiveKLController)."""

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        self.value = float(state["value"])


@dataclass
class AdaptiveKLController:
    """Ziegler et al. 2019, sec. 2.2: a proportional controller that steers the measured KL toward `target`.

        e = clip((KL - target) / target, -0.2, 0.2)
        beta <- beta * (1 + K * e),   K = n_steps / horizon

    `n_steps` is how much experience the measurement covers (Ziegler et al. count episodes, with K_beta = 0.1 at
    their batch size); `horizon` is how many such steps a full correction takes. Near the fixed point of a
    KL = c / beta toy the update is beta <- beta + K (beta* - beta): geometric convergence at rate 1 - K.
    """
    value: float      # beta now
    target: float     # the KL per sequence (or per token, matching what `update` is fed) to steer toward
    horizon: float    # steps over which the error is corrected

    def __post_init__(self):
        if self.target <= 0 or self.horizon <= 0 or self.value <= 0:
            raise ValueError(f"AdaptiveKLController needs value, target and horizon > 0; got {self}")

    def update(self, current_kl: float, n_steps: int) -> None:
        error = min(max((current_kl - self.target) / self.target, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        self.value, self.target, self.horizon = float(state["value"]), float(state["target"]), float(state["horizon"])
