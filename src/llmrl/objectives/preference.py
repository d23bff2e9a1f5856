"""Preference losses: DPO, conservative DPO, IPO, the Bradley-Terry reward-model loss, and the process-reward-model
step loss (binary cross-entropy at each step's last token).

Notation: P preference pairs; for each, a chosen response y_w and a rejected response y_l to the same prompt x.
Sequence log-probs are sums over the response tokens, log pi(y | x) = sum_t log pi(y_t | x, y_<t)
(`llmrl.train.dpo.pair_logps`); the recipe may pass per-token means instead (see `dpo_loss`).

    h        = [log pi(y_w|x) - log pi_ref(y_w|x)] - [log pi(y_l|x) - log pi_ref(y_l|x)]     log-ratio difference
    DPO      = -log sigma(beta h)                                  Rafailov et al. 2023, eq. 7
    cDPO     = -(1 - eps) log sigma(beta h) - eps log sigma(-beta h)  Mitchell 2023, "A note on DPO with noisy
                                                                   preferences": labels flipped with prob. eps
    IPO      = (h - 1 / (2 beta))^2                                Azar et al. 2023, eq. 17 (beta is their tau)
    BT       = -log sigma(r(x, y_w) - r(x, y_l))                   Bradley & Terry 1952; reward model of
                                                                   Ouyang et al. 2022, eq. 1 (one pair per term)
    PRM      = -[y log sigma(z) + (1 - y) log sigma(-z)]            per labelled step: z the logit at the step's last
                                                                   token, y its label in [0, 1] (Lightman et al. 2023)

The implicit reward of DPO is beta * log(pi / pi_ref) (Rafailov et al. 2023, section 5); the metrics report it.
The pair losses return a `PreferenceOutput`: the trainer sums the `loss_*` fields and logs the rest.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from llmrl.registry import Registry


@dataclass(frozen=True)
class PreferenceOutput:
    losses: dict[str, torch.Tensor]      # "loss_preference": scalar, mean over the P pairs
    metrics: dict[str, torch.Tensor]     # scalars (detached), means over the P pairs
    per_pair_loss: torch.Tensor          # [P] the unreduced loss (weighted sums, slow-loop checks)

    @property
    def total(self) -> torch.Tensor:
        return sum(self.losses.values())


# per-pair loss of the log-ratio difference: (h [P], *, beta, label_smoothing) -> [P]
PAIR_LOSSES: Registry[Callable[..., torch.Tensor]] = Registry("preference loss")


@PAIR_LOSSES.register("dpo")
def sigmoid_pair_loss(h: torch.Tensor, *, beta: float, label_smoothing: float) -> torch.Tensor:
    """DPO (eq. 7); with label_smoothing eps > 0 the conservative DPO of Mitchell 2023."""
    return -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)


@PAIR_LOSSES.register("ipo")
def ipo_pair_loss(h: torch.Tensor, *, beta: float, label_smoothing: float) -> torch.Tensor:
    """IPO (eq. 17): regress h onto 1 / (2 beta) instead of pushing it to infinity on deterministic labels."""
    if label_smoothing:
        raise ValueError("label_smoothing applies to kind 'dpo' only (IPO has no label-noise form)")
    return (h - 1 / (2 * beta)) ** 2


def _check_pairs(**tensors: torch.Tensor) -> None:
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    if len(set(shapes.values())) != 1 or len(next(iter(shapes.values()))) != 1:
        raise ValueError(f"expected 1-D tensors of the same shape [P], got {shapes}")


def dpo_loss(
    policy_chosen_logp: torch.Tensor,     # [P] log pi(y_w | x), carries gradient
    policy_rejected_logp: torch.Tensor,   # [P] log pi(y_l | x), carries gradient
    ref_chosen_logp: torch.Tensor,        # [P] log pi_ref(y_w | x)
    ref_rejected_logp: torch.Tensor,      # [P] log pi_ref(y_l | x)
    *,
    beta: float,
    label_smoothing: float = 0.0,
    kind: str = "dpo",
) -> PreferenceOutput:
    """DPO / conservative DPO / IPO loss of P pairs (see the module docstring for the equations).

    The loss uses whatever sequence log-probs it is given. Rafailov et al. and Azar et al. use sums over the
    response tokens; TRL (and the recipe here, by default) passes per-token means for IPO, because a squared
    loss on summed log-probs has a target 1/(2 beta) that does not scale with response length.
    """
    _check_pairs(policy_chosen_logp=policy_chosen_logp, policy_rejected_logp=policy_rejected_logp,
                 ref_chosen_logp=ref_chosen_logp, ref_rejected_logp=ref_rejected_logp)
    if beta <= 0 or not 0 <= label_smoothing < 0.5:
        raise ValueError(f"need beta > 0 and 0 <= label_smoothing < 0.5, got beta={beta}, "
                         f"label_smoothing={label_smoothing}")
    chosen_log_ratio = policy_chosen_logp - ref_chosen_logp            # [P]
    rejected_log_ratio = policy_rejected_logp - ref_rejected_logp      # [P]
    h = chosen_log_ratio - rejected_log_ratio                          # [P]
    per_pair = PAIR_LOSSES.get(kind)(h, beta=beta, label_smoothing=label_smoothing)
    chosen_reward = beta * chosen_log_ratio.detach()                   # [P] implicit rewards
    rejected_reward = beta * rejected_log_ratio.detach()
    return PreferenceOutput(
        losses={"loss_preference": per_pair.mean()},
        metrics={
            "preference_accuracy": (chosen_reward > rejected_reward).float().mean(),
            "reward_margin": (chosen_reward - rejected_reward).mean(),
            "chosen_reward": chosen_reward.mean(),
            "rejected_reward": rejected_reward.mean(),
            "chosen_logp": policy_chosen_logp.detach().mean(),
            "rejected_logp": policy_rejected_logp.detach().mean(),
        },
        per_pair_loss=per_pair,
    )


def bradley_terry_loss(
    chosen_reward: torch.Tensor,     # [P] r(x, y_w), carries gradient
    rejected_reward: torch.Tensor,   # [P] r(x, y_l), carries gradient
) -> PreferenceOutput:
    """Reward-model loss -log sigma(r_w - r_l): the negative log-likelihood of the label under Bradley-Terry."""
    _check_pairs(chosen_reward=chosen_reward, rejected_reward=rejected_reward)
    margin = chosen_reward - rejected_reward                           # [P]
    per_pair = -F.logsigmoid(margin)
    return PreferenceOutput(
        losses={"loss_preference": per_pair.mean()},
        metrics={
            "preference_accuracy": (margin.detach() > 0).float().mean(),
            "reward_margin": margin.detach().mean(),
            "chosen_reward": chosen_reward.detach().mean(),
            "rejected_reward": rejected_reward.detach().mean(),
        },
        per_pair_loss=per_pair,
    )


def step_bce_sum(
    logits: torch.Tensor,    # [K] the logit of "good" at each labelled step's last token, carries gradient
    labels: torch.Tensor,    # [K] labels in [0, 1]
) -> torch.Tensor:
    """The summed binary cross-entropy of K labelled steps (the trainer divides by the batch's step count, so that
    micro-batches add up to the batch mean)."""
    if logits.shape != labels.shape or logits.dim() != 1:
        raise ValueError(f"expected 1-D logits and labels of the same shape [K], got {tuple(logits.shape)} and "
                         f"{tuple(labels.shape)}")
    return F.binary_cross_entropy_with_logits(logits, labels, reduction="sum")


def step_metrics(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:   # [K], [K]
    """Mean BCE; step accuracy at threshold 0.5 (predicted good: P >= 0.5; good: label >= 0.5); the share of good
    steps (always answering the majority class scores max(share, 1 - share)); the mean P on good and on bad steps."""
    p, good = torch.sigmoid(logits), labels >= 0.5
    mean = lambda x: float(x.mean()) if x.numel() else float("nan")  # noqa: E731
    return {"loss_bce": float(F.binary_cross_entropy_with_logits(logits, labels)),
            "step_accuracy": mean(((p >= 0.5) == good).float()), "good_fraction": mean(good.float()),
            "p_good_steps": mean(p[good]), "p_bad_steps": mean(p[~good])}
