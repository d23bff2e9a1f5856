"""SAPO: Soft Adaptive Policy Optimization (Qwen team, Gao et al. 2025, arXiv 2511.20347) — a smooth gate instead of a clip.

Notation: N sequences, T response tokens; `mask` [N, T] is 1 on tokens the policy chose; r = pi / pi_old per token.

Nothing is clipped or masked: each token's ratio passes through a sigmoid gate centred at r = 1,

    f_tau(r) = (4 / tau) * sigmoid(tau (r - 1))          per-token loss = -f_tau(r_t) A_t
    gradient   d f / d log pi = 4 sigmoid(z) (1 - sigmoid(z)) r,   z = tau (r - 1)

so at r = 1 the gradient is exactly A grad log pi (the policy gradient), and it decays smoothly (never to exactly 0)
as r moves away, faster for larger tau. Negative-advantage tokens get their own, typically larger, temperature
(tau_neg) because pushing a token down spreads mass over the whole vocabulary. The form follows the authors'
reference code in verl (`compute_policy_loss_sapo`); tau_pos = tau_neg = 1 are its defaults, not tuned here.
`clip_low` / `clip_high` are not used. `clip_fraction` reports the share of tokens whose gate slope fell below
half the on-policy one (a soft analogue of a clip, for the logs only).
"""

from __future__ import annotations

import torch

from llmrl.objectives.policy import OBJECTIVES, BatchCounts, ObjectiveOutput, aggregate, no_dual_clip, regularizers


def soft_gate(ratio: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
    """f_tau(r) = (4 / tau) sigmoid(tau (r - 1)), elementwise [N, T] -> [N, T]."""
    return torch.sigmoid(tau * (ratio - 1.0)) * (4.0 / tau)


@OBJECTIVES.register("sapo")
def sapo_objective(
    logp: torch.Tensor,              # [N, T]
    logp_old: torch.Tensor,          # [N, T]
    advantages: torch.Tensor,        # [N, T]
    mask: torch.Tensor,              # [N, T]
    counts: BatchCounts,
    *,
    logp_ref: torch.Tensor | None = None,
    entropy: torch.Tensor | None = None,
    is_weight: torch.Tensor | None = None,
    clip_low: float = 0.2,           # unused
    clip_high: float = 0.2,
    dual_clip: float | None = None,
    kl_coef: float = 0.0,
    kl_estimator: str = "k3",
    entropy_coef: float = 0.0,
    aggregation: str = "seq-mean-token-mean",
    tau_pos: float = 1.0,
    tau_neg: float = 1.0,
) -> ObjectiveOutput:
    """SAPO loss (module docstring) + the shared KL and entropy terms. Metrics: `clip_fraction` (tokens whose gate
    slope is below half the on-policy slope), and those of `regularizers`."""
    no_dual_clip("sapo", dual_clip)
    if not (tau_pos > 0 and tau_neg > 0):
        raise ValueError(f"SAPO temperatures must be > 0; got tau_pos={tau_pos}, tau_neg={tau_neg}")
    tau = torch.where(advantages > 0, torch.full_like(advantages, tau_pos), torch.full_like(advantages, tau_neg))
    ratio = torch.exp(logp - logp_old)
    pg = -soft_gate(ratio, tau) * advantages
    if is_weight is not None:
        pg = pg * is_weight.detach()
    sig = torch.sigmoid(tau * (ratio.detach() - 1.0))
    damped = 4 * sig * (1 - sig) * ratio.detach() < 0.5
    losses = {"loss_policy": aggregate(pg, mask, aggregation, counts)}
    metrics = {"clip_fraction": aggregate(damped.float(), mask, "token-mean", counts).detach()}
    reg_losses, reg_metrics = regularizers(logp, logp_old, mask, counts, logp_ref=logp_ref, entropy=entropy,
                                           kl_coef=kl_coef, kl_estimator=kl_estimator, entropy_coef=entropy_coef,
                                           aggregation=aggregation)
    return ObjectiveOutput(losses=losses | reg_losses, metrics=metrics | reg_metrics)
