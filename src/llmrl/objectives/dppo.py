"""DPPO: Divergence Proximal Policy Optimization (Qi et al. 2026, "Rethinking the Trust Region in LLM
Reinforcement Learning", arXiv 2602.04879) — a trust region by a divergence mask instead of ratio clipping.

Notation: N sequences, T response tokens; `mask` [N, T] is 1 on tokens the policy chose; p = pi(y_t | s_t) and
p_old = pi_old(y_t | s_t) of the sampled token, r = p / p_old.

PPO's ratio clip judges a token by r alone, a one-sample proxy of how far the whole next-token distribution moved:
a rare token whose probability goes 0.001 -> 0.003 (r = 3) is clipped though the distribution barely moved, while
a common one going 0.9 -> 0.5 (r = 0.56) moves the distribution a lot yet sits near the clip range. DPPO masks a
token's gradient only when a divergence between pi_old(. | s_t) and pi(. | s_t) leaves a threshold delta AND the
update pushes it further out (the direction of A). What is implemented here is the paper's Binary approximation
(the divergence of the two-outcome distributions {sampled token, everything else}, a lower bound of the full one,
computable from p and p_old alone), in its two variants:

    Binary-TV:  D = p - p_old (signed);            keep if  A > 0: D <= delta_high    A < 0: D >= -delta_low
    Binary-KL:  D = KL(Bern(p_old) || Bern(p)) = p_old log(p_old / p) + (1 - p_old) log((1 - p_old) / (1 - p));
                keep if  A > 0: D <= delta_high or p <= p_old    A < 0: D <= delta_low or p >= p_old

    per-token loss = -M_t * sg(min(r_t, C)) * A_t * exp(log p - sg(log p))
    gradient       = -M_t * min(r_t, C) * A_t * grad log p        (the unclipped PPO gradient r A, masked)

with M_t the mask above (detached) and C (`ratio_cap`, 20 as in the authors' verl code) a truncation of the
importance ratio. The loss value is -M min(r, C) A, a surrogate (its gradient is what matters). The paper anchors
the trust region to the behaviour policy that sampled the tokens; here the anchor is `logp_old` (pi_old: the
trainer's own log-probs of the sampled tokens, which is the sampler's exactly with the native engine). The
Top-K approximation of the paper (which needs the top-K probabilities of both policies) is not implemented.
`clip_low` / `clip_high` are not used: the thresholds are `delta_low` / `delta_high` (objective.options), by default
0.1 for TV (the delta of a public rllm DPPO-TV recipe) and 0.02 for KL (about the binary KL of a 0.1 shift at
p = 0.5); these defaults are our choice, not values taken from the paper.
"""

from __future__ import annotations

import torch

from llmrl.objectives.policy import OBJECTIVES, BatchCounts, ObjectiveOutput, aggregate, no_dual_clip, regularizers

DIVERGENCES = ("tv", "kl")
DEFAULT_DELTA = {"tv": 0.1, "kl": 0.02}


def binary_kl(logp_old: torch.Tensor, logp: torch.Tensor) -> torch.Tensor:
    """KL(Bern(p_old) || Bern(p)) per token, from log-probabilities [N, T] -> [N, T] (>= 0). Probabilities are
    kept below 1 - 1e-6 so a token of probability 1 gives a finite divergence."""
    p_old, p = logp_old.exp().clamp(max=1 - 1e-6), logp.exp().clamp(max=1 - 1e-6)
    return p_old * (logp_old - logp) + (1 - p_old) * (torch.log1p(-p_old) - torch.log1p(-p))


def trust_region_mask(
    logp: torch.Tensor,         # [N, T] (detached)
    logp_old: torch.Tensor,     # [N, T]
    advantages: torch.Tensor,   # [N, T]
    *,
    divergence: str,
    delta_low: float,
    delta_high: float,
) -> torch.Tensor:
    """M [N, T] bool: True where the token keeps its gradient (module docstring)."""
    p, p_old = logp.exp(), logp_old.exp()
    if divergence == "tv":
        up_ok, down_ok = p - p_old <= delta_high, p - p_old >= -delta_low
    elif divergence == "kl":
        d = binary_kl(logp_old, logp)
        up_ok, down_ok = (d <= delta_high) | (p <= p_old), (d <= delta_low) | (p >= p_old)
    else:
        raise ValueError(f"unknown DPPO divergence {divergence!r}; valid: {', '.join(DIVERGENCES)}")
    return torch.where(advantages > 0, up_ok, down_ok)


@OBJECTIVES.register("dppo")
def dppo_objective(
    logp: torch.Tensor,              # [N, T]
    logp_old: torch.Tensor,          # [N, T]
    advantages: torch.Tensor,        # [N, T]
    mask: torch.Tensor,              # [N, T]
    counts: BatchCounts,
    *,
    logp_ref: torch.Tensor | None = None,
    entropy: torch.Tensor | None = None,
    is_weight: torch.Tensor | None = None,
    clip_low: float = 0.2,           # unused: DPPO's thresholds are delta_low / delta_high
    clip_high: float = 0.2,
    dual_clip: float | None = None,
    kl_coef: float = 0.0,
    kl_estimator: str = "k3",
    entropy_coef: float = 0.0,
    aggregation: str = "token-mean",
    divergence: str = "tv",
    delta_low: float | None = None,
    delta_high: float | None = None,
    ratio_cap: float = 20.0,
) -> ObjectiveOutput:
    """DPPO-Binary-TV / -KL loss (module docstring) + the shared KL and entropy terms; `is_weight` multiplies each
    token's term. Metrics: `clip_fraction` (tokens masked out of the trust region), and those of `regularizers`."""
    no_dual_clip("dppo", dual_clip)
    if divergence not in DIVERGENCES:
        raise ValueError(f"unknown DPPO divergence {divergence!r}; valid: {', '.join(DIVERGENCES)}")
    low = DEFAULT_DELTA[divergence] if delta_low is None else delta_low
    high = DEFAULT_DELTA[divergence] if delta_high is None else delta_high
    if not (low > 0 and high > 0 and ratio_cap >= 1):
        raise ValueError(f"DPPO needs delta_low, delta_high > 0 and ratio_cap >= 1; got {low}, {high}, {ratio_cap}")
    keep = trust_region_mask(logp.detach(), logp_old, advantages, divergence=divergence,
                             delta_low=low, delta_high=high)
    weight = torch.exp(logp.detach() - logp_old).clamp(max=ratio_cap) * keep
    pg = -weight * advantages * torch.exp(logp - logp.detach())
    if is_weight is not None:
        pg = pg * is_weight.detach()
    losses = {"loss_policy": aggregate(pg, mask, aggregation, counts)}
    metrics = {"clip_fraction": aggregate((~keep).float(), mask, "token-mean", counts).detach()}
    reg_losses, reg_metrics = regularizers(logp, logp_old, mask, counts, logp_ref=logp_ref, entropy=entropy,
                                           kl_coef=kl_coef, kl_estimator=kl_estimator, entropy_coef=entropy_coef,
                                           aggregation=aggregation)
    return ObjectiveOutput(losses=losses | reg_losses, metrics=metrics | reg_metrics)
