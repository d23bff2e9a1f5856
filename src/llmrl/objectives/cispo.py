"""CISPO: Clipped IS-weight Policy Optimization (MiniMax-M1, arXiv 2506.13585) — clip the weight, keep
every token's gradient.

Notation: N sequences, T response tokens; `mask` [N, T] is 1 on tokens the policy chose; r = pi / pi_old per token.

PPO's clip zeroes the gradient of a token whose ratio left the clip range in the direction of its advantage; in
long reasoning those are often the rare "fork" tokens (however, wait, ...) that the update most needs. CISPO clips
the importance-sampling WEIGHT instead and stops its gradient, so the token still contributes a REINFORCE term:

    per-token objective  sg(clip(r_t, 1 - eps_low, 1 + eps_high)) * A_t * log pi(y_t)
    gradient             clip(r_t, 1 - eps_low, 1 + eps_high) * A_t * grad log pi(y_t)     (never zero unless A = 0)

The loss is written as -sg(clip(r)) * A * exp(log pi - sg(log pi)): the same gradient (d exp(x - sg x) / dx = 1 at
the point) with the value -clip(r) A, which reads as a surrogate in the logs. MiniMax-M1 aggregates by token
(`token-mean`) and sets no lower bound in practice (eps_low large: `clip_low: 1.0` makes the bound 0);
`clip_high` is the one they tune. Nothing is masked; `clip_fraction` counts the tokens whose weight was clipped.
"""

from __future__ import annotations

import torch

from llmrl.objectives.policy import OBJECTIVES, BatchCounts, ObjectiveOutput, aggregate, no_dual_clip, regularizers


def clipped_is_weight(
    logp: torch.Tensor,       # [N, T]
    logp_old: torch.Tensor,   # [N, T]
    *,
    clip_low: float,
    clip_high: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(sg(clip(r, 1 - clip_low, 1 + clip_high)) [N, T], where the clip was active [N, T] bool)."""
    ratio = torch.exp(logp.detach() - logp_old)
    weight = ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    return weight, weight != ratio


@OBJECTIVES.register("cispo")
def cispo_objective(
    logp: torch.Tensor,              # [N, T]
    logp_old: torch.Tensor,          # [N, T]
    advantages: torch.Tensor,        # [N, T]
    mask: torch.Tensor,              # [N, T]
    counts: BatchCounts,
    *,
    logp_ref: torch.Tensor | None = None,
    entropy: torch.Tensor | None = None,
    is_weight: torch.Tensor | None = None,
    clip_low: float = 1.0,
    clip_high: float = 4.0,
    dual_clip: float | None = None,
    kl_coef: float = 0.0,
    kl_estimator: str = "k3",
    entropy_coef: float = 0.0,
    aggregation: str = "token-mean",
) -> ObjectiveOutput:
    """CISPO loss (module docstring) + the shared KL and entropy terms; `is_weight` (the sampling engine's TIS
    weight) multiplies each token's term. Metrics: `clip_fraction` (tokens whose IS weight was clipped), and those
    of `regularizers`."""
    no_dual_clip("cispo", dual_clip)
    weight, clipped = clipped_is_weight(logp, logp_old, clip_low=clip_low, clip_high=clip_high)
    pg = -weight * advantages * torch.exp(logp - logp.detach())
    if is_weight is not None:
        pg = pg * is_weight.detach()
    losses = {"loss_policy": aggregate(pg, mask, aggregation, counts)}
    metrics = {"clip_fraction": aggregate(clipped.float(), mask, "token-mean", counts).detach()}
    reg_losses, reg_metrics = regularizers(logp, logp_old, mask, counts, logp_ref=logp_ref, entropy=entropy,
                                           kl_coef=kl_coef, kl_estimator=kl_estimator, entropy_coef=entropy_coef,
                                           aggregation=aggregation)
    return ObjectiveOutput(losses=losses | reg_losses, metrics=metrics | reg_metrics)
