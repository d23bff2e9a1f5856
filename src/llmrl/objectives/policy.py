"""Policy-gradient objective with its constraints: PPO clipping, KL to a reference, loss aggregation.

Notation: N sequences, T response tokens; `mask` [N, T] is 1 on tokens the policy chose.
Every function returns tensors and named outputs; the trainer sums the `loss_*` fields of an
`ObjectiveOutput` and logs the rest.

    gradient:     E[ grad log pi(a|s) * A ]                       (REINFORCE, Williams 1992)
    clipped:      min(r A, clip(r, 1 - eps_low, 1 + eps_high) A)   (PPO, Schulman et al. 2017, eq. 7;
                                                                    asymmetric bounds as in DAPO, Yu et al. 2025)
    KL in loss:   beta * KL_est(pi || pi_ref) per token            (k1/k2/k3, Schulman 2020 "Approximating KL")
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from llmrl.registry import Registry

AGGREGATIONS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")
KL_ESTIMATORS = ("k1", "k2", "k3")


@dataclass(frozen=True)
class BatchCounts:
    """Denominators of the whole optimizer batch, so micro-batching never changes the loss."""
    num_tokens: float      # chosen tokens in the batch
    num_seqs: float        # sequences in the batch
    max_len: float         # the constant length divisor of `seq-mean-token-sum-norm` (Dr. GRPO)

    @staticmethod
    def of(response_mask: torch.Tensor, max_len: int | None = None) -> "BatchCounts":
        return BatchCounts(float(response_mask.sum().clamp(min=1)), float(response_mask.shape[0]),
                           float(max_len or response_mask.shape[1]))


def aggregate(per_token: torch.Tensor, mask: torch.Tensor, mode: str, counts: BatchCounts) -> torch.Tensor:
    """per_token [N, T] -> scalar. Divides by batch-wide counts so micro-batch sums add up to the full-batch value.

    token-mean:              sum_it x / #tokens                 long answers weigh more per sequence
    seq-mean-token-mean:     mean_i (sum_t x / len_i)           GRPO paper; biased toward short wrong answers (Dr. GRPO)
    seq-mean-token-sum:      mean_i sum_t x                     unbiased REINFORCE; scale grows with length
    seq-mean-token-sum-norm: sum_it x / (#seqs * max_len)       Dr. GRPO: a constant divisor, no length bias
    """
    x = torch.where(mask.bool(), per_token, torch.zeros_like(per_token))   # not `* mask`: inf * 0 is nan
    if mode == "token-mean":
        return x.sum() / counts.num_tokens
    if mode == "seq-mean-token-mean":
        return (x.sum(-1) / mask.sum(-1).clamp(min=1)).sum() / counts.num_seqs
    if mode == "seq-mean-token-sum":
        return x.sum() / counts.num_seqs
    if mode == "seq-mean-token-sum-norm":
        return x.sum() / (counts.num_seqs * counts.max_len)
    raise ValueError(f"unknown loss aggregation {mode!r}; valid: {', '.join(AGGREGATIONS)}")


def kl_estimate(logp: torch.Tensor, logp_ref: torch.Tensor, kind: str) -> torch.Tensor:
    """Per-token estimate of KL(pi || pi_ref) from samples of pi. [N, T] -> [N, T].

    k1 = log r            unbiased value, high variance, can be negative     (r = pi / pi_ref)
    k2 = (log r)^2 / 2    biased, low variance; its gradient is the KL gradient in expectation
    k3 = (1/r) - 1 + log r  unbiased value, always >= 0 (GRPO's choice)
    """
    log_ratio = logp - logp_ref
    if kind == "k1":
        return log_ratio
    if kind == "k2":
        return 0.5 * log_ratio ** 2
    if kind == "k3":
        return torch.expm1(-log_ratio) + log_ratio
    raise ValueError(f"unknown KL estimator {kind!r}; valid: {', '.join(KL_ESTIMATORS)}")


def clipped_surrogate(
    logp: torch.Tensor,         # [N, T] under the policy being trained (carries gradient)
    logp_old: torch.Tensor,     # [N, T] under the policy that sampled the data
    advantages: torch.Tensor,   # [N, T]
    *,
    clip_low: float,
    clip_high: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token PPO loss -min(r A, clip(r) A) and a [N, T] bool of where the clip was active."""
    ratio = torch.exp(logp - logp_old)
    unclipped = ratio * advantages
    clipped = ratio.clamp(1.0 - clip_low, 1.0 + clip_high) * advantages
    loss = -torch.minimum(unclipped, clipped)
    return loss, clipped < unclipped


@dataclass
class ObjectiveOutput:
    losses: dict[str, torch.Tensor]                          # loss_* terms, summed by the trainer
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)  # detached scalars to log

    @property
    def total(self) -> torch.Tensor:
        return sum(self.losses.values())


OBJECTIVES: Registry = Registry("objective")


@OBJECTIVES.register("ppo_clip")
def ppo_clip_objective(
    logp: torch.Tensor,              # [N, T]
    logp_old: torch.Tensor,          # [N, T]
    advantages: torch.Tensor,        # [N, T]
    mask: torch.Tensor,              # [N, T]
    counts: BatchCounts,
    *,
    logp_ref: torch.Tensor | None = None,   # [N, T]
    entropy: torch.Tensor | None = None,    # [N, T]
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    kl_coef: float = 0.0,
    kl_estimator: str = "k3",
    entropy_coef: float = 0.0,
    aggregation: str = "token-mean",
) -> ObjectiveOutput:
    """Clipped policy gradient + optional KL-to-reference loss + optional entropy bonus.

    With a large clip range this is plain REINFORCE with importance ratios against the sampling policy.
    """
    pg, clipped = clipped_surrogate(logp, logp_old, advantages, clip_low=clip_low, clip_high=clip_high)
    losses = {"loss_policy": aggregate(pg, mask, aggregation, counts)}
    metrics = {"clip_fraction": aggregate(clipped.float(), mask, "token-mean", counts).detach()}
    log_ratio = (logp - logp_old).detach()
    metrics["approx_kl_old"] = aggregate(0.5 * log_ratio ** 2, mask, "token-mean", counts)
    if logp_ref is not None:
        per_token_kl = kl_estimate(logp, logp_ref, kl_estimator)
        kl = aggregate(per_token_kl, mask, aggregation, counts)
        if kl_coef:
            losses["loss_kl_to_ref"] = kl_coef * kl
        metrics["kl_to_ref"] = aggregate(kl_estimate(logp.detach(), logp_ref, "k3"), mask, "token-mean", counts)
    if entropy is not None:
        ent = aggregate(entropy, mask, "token-mean", counts)
        if entropy_coef:
            losses["loss_entropy"] = -entropy_coef * aggregate(entropy, mask, aggregation, counts)
        metrics["entropy"] = ent.detach()
    return ObjectiveOutput(losses=losses, metrics=metrics)
