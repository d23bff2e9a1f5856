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

import math
from dataclasses import dataclass

import torch

from llmrl.registry import Registry


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


# ----------------------------------------------------------------------------- the corrections, one registry
#
# Beside the token-level TIS above, the corrections of the 2025 literature, each a weight [N, T] (detached) that
# multiplies each token's policy-gradient term; r_t = pi_old / mu per token, rho_i = prod_t r_t per sequence (over
# the chosen tokens), C = rollout.tis_cap, alpha = rollout.mismatch_low:
#
#     tis_token   min(r_t, C)                                    token TIS (Yao et al. 2025): today's default
#     tis_seq     min(rho_i, C) on every token of i              sequence-level TIS: unbiased for the sequence
#                                                                likelihood ratio, truncated
#     mis_token   r_t * 1[r_t <= C]                              masked IS (Liu, Li et al. 2025, "When speed kills
#     mis_seq     rho_i * 1[rho_i <= C]                          stability"): a token / sequence beyond the cap is
#                                                                dropped instead of truncated, so no biased weight
#     icepop      r_t * 1[alpha <= r_t <= C]                      IcePop (Ling Team 2025, Ring-1T, arXiv 2510.18855):
#                                                                a two-sided mask; tokens the engines disagree on
#                                                                either way lose their gradient
#     geo_seq     min(exp(mean_t log r_t), C) on every token     the geometric-mean (length-normalised) sequence
#                                                                ratio, truncated: GSPO's ratio, for the mismatch
#
# Every one is 1 where mu = pi_old (the native sampler: no mismatch).

MISMATCH: Registry = Registry("mismatch correction")


def _sequence_log_ratio(logp_policy, logp_sampler, mask, *, mean: bool) -> torch.Tensor:
    """sum (or mean) over the chosen tokens of log(pi_old / mu) -> [N, 1]."""
    chosen = mask.bool()
    log_r = torch.where(chosen, logp_policy - logp_sampler, torch.zeros_like(logp_policy))
    total = log_r.sum(-1, keepdim=True)
    return total / chosen.sum(-1, keepdim=True).clamp(min=1) if mean else total


@MISMATCH.register("tis_token")
def tis_token(logp_policy, logp_sampler, mask, *, cap: float, low: float = 0.5) -> torch.Tensor:
    return truncated_is_weight(logp_policy, logp_sampler, cap=cap)


@MISMATCH.register("tis_seq")
def tis_seq(logp_policy, logp_sampler, mask, *, cap: float, low: float = 0.5) -> torch.Tensor:
    log_rho = _sequence_log_ratio(logp_policy, logp_sampler, mask, mean=False)
    return torch.exp(log_rho.clamp(max=math.log(cap))).expand_as(logp_policy).detach()


@MISMATCH.register("mis_token")
def mis_token(logp_policy, logp_sampler, mask, *, cap: float, low: float = 0.5) -> torch.Tensor:
    log_r = (logp_policy - logp_sampler).detach()
    return torch.where(log_r <= math.log(cap), torch.exp(log_r.clamp(max=math.log(cap))), torch.zeros_like(log_r))


@MISMATCH.register("mis_seq")
def mis_seq(logp_policy, logp_sampler, mask, *, cap: float, low: float = 0.5) -> torch.Tensor:
    log_rho = _sequence_log_ratio(logp_policy, logp_sampler, mask, mean=False).detach()
    w = torch.where(log_rho <= math.log(cap), torch.exp(log_rho.clamp(max=math.log(cap))), torch.zeros_like(log_rho))
    return w.expand_as(logp_policy)


@MISMATCH.register("icepop")
def icepop(logp_policy, logp_sampler, mask, *, cap: float, low: float = 0.5) -> torch.Tensor:
    log_r = (logp_policy - logp_sampler).detach()
    keep = (log_r >= math.log(low)) & (log_r <= math.log(cap))
    return torch.where(keep, torch.exp(log_r.clamp(math.log(low), math.log(cap))), torch.zeros_like(log_r))


@MISMATCH.register("geo_seq")
def geo_seq(logp_policy, logp_sampler, mask, *, cap: float, low: float = 0.5) -> torch.Tensor:
    log_s = _sequence_log_ratio(logp_policy, logp_sampler, mask, mean=True)
    return torch.exp(log_s.clamp(max=math.log(cap))).expand_as(logp_policy).detach()


@dataclass(frozen=True)
class Correction:
    """The correction rollout.mismatch names, with its bounds: weight = Correction(...)(logp_policy, logp_sampler,
    mask) [N, T]."""
    name: str = "tis_token"
    cap: float = 2.0
    low: float = 0.5

    def __post_init__(self):
        MISMATCH.get(self.name)
        if not self.cap >= 1.0 or not 0 < self.low <= 1.0:
            raise ValueError(f"mismatch correction {self.name}: needs cap >= 1 and 0 < low <= 1; got {self}")

    def __call__(self, logp_policy, logp_sampler, mask) -> torch.Tensor:
        return MISMATCH.get(self.name)(logp_policy, logp_sampler, mask, cap=self.cap, low=self.low)
