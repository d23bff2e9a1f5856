"""The training / inference log-prob mismatch, and its truncated importance-sampling (TIS) correction.

Notation: N sequences, T response tokens; `mask` [N, T] is 1 on tokens the policy chose.

An inference engine (vLLM) samples from mu, its own numerics of the policy (other kernels, bf16 weights, another
reduction order), while the trainer differentiates pi_theta. Even with the same weights mu != pi, so the rollout is
slightly off-policy. Yao et al. 2025 ("Your efficient RL framework secretly brings you off-policy RL training")
correct the policy-gradient term of each token by the importance weight of pi over mu, truncated at C:

    w_t = min(pi(a_t | s_t) / mu(a_t | s_t), C) = min(exp(logp_policy - logp_sampler), C)     (detached)

    per-token loss: w_t * (-min(r_t A_t, clip(r_t) A_t)),   r_t = pi_theta / pi_old,  pi_old = logp_policy

`logp_policy` is the trainer's policy recomputed on the sampled tokens before the update (so pi_old is the
trainer's, not the engine's: PPO's ratio measures only how far the update moved the policy), and truncation
bounds the variance a token that mu under-samples would add (TIS; TRL's `vllm_importance_sampling_cap`, verl's
`tis_imp_ratio_cap`). Only the upper side is truncated: w < 1 down-weights tokens mu over-samples.
"""

from __future__ import annotations

import torch


def truncated_is_weight(
    logp_policy: torch.Tensor,    # [N, T] under the trainer's policy (recomputed on the sampled tokens)
    logp_sampler: torch.Tensor,   # [N, T] under the engine that sampled them
    *,
    cap: float,                   # C >= 1
) -> torch.Tensor:
    """w = min(exp(logp_policy - logp_sampler), cap) [N, T], detached. Masked positions carry whatever their
    log-probs give; every loss masks them out."""
    if not cap >= 1.0:
        raise ValueError(f"the truncated importance-sampling cap must be >= 1 (Yao et al. 2025); got {cap}")
    return torch.exp(logp_policy - logp_sampler).clamp(max=cap).detach()


def mismatch_stats(
    logp_policy: torch.Tensor,    # [N, T]
    logp_sampler: torch.Tensor,   # [N, T]
    mask: torch.Tensor,           # [N, T]
    *,
    cap: float,
) -> dict[str, torch.Tensor]:
    """Scalars over the chosen tokens: mean and max |logp_policy - logp_sampler| (nats), and the fraction of
    tokens whose ratio pi / mu exceeds the cap (where the TIS weight is truncated)."""
    chosen = mask.bool()
    gap = (logp_policy - logp_sampler).abs()[chosen]
    ratio = torch.exp(logp_policy - logp_sampler)[chosen]
    if gap.numel() == 0:
        zero = torch.zeros((), device=gap.device)
        return {"mismatch_logp_abs_mean": zero, "mismatch_logp_abs_max": zero, "tis_truncated_fraction": zero}
    return {"mismatch_logp_abs_mean": gap.mean(), "mismatch_logp_abs_max": gap.max(),
            "tis_truncated_fraction": (ratio > cap).float().mean()}
