"""GSPO: Group Sequence Policy Optimization (Zheng et al. 2025, arXiv 2507.18071) — clip a sequence-level ratio.

Notation: N sequences, T response tokens; `mask` [N, T] is 1 on tokens the policy chose, |y_i| = sum_t mask_it.

The importance ratio of sequence i is the length-normalised (geometric-mean) likelihood ratio

    s_i = (pi(y_i | x) / pi_old(y_i | x)) ^ (1 / |y_i|) = exp( (1 / |y_i|) sum_t log(pi(y_it) / pi_old(y_it)) )

and it is clipped per SEQUENCE, not per token: every token of a sequence whose s_i left [1 - eps_low, 1 + eps_high]
in the direction its advantage pushes loses its gradient together (the paper's eps are tiny: 3e-4 / 4e-4).
This is the paper's token form, GSPO-token, which admits per-token advantages:

    s_it = sg(s_i) * pi(y_it) / sg(pi(y_it))               (value s_i; d s_it / d theta = s_i grad log pi(y_it))
    per-token loss = -min(s_it A_it, clip(s_it, 1 - eps_low, 1 + eps_high) A_it)

With one advantage per sequence (GRPO) and `seq-mean-token-mean` aggregation, its gradient is the paper's GSPO
gradient: -(1 / N) sum_i s_i A_i (1 / |y_i|) sum_t grad log pi(y_it) over the unclipped sequences. The other
aggregations weigh the same per-token terms as they do for ppo_clip. Masked positions (tool output) count neither
in s_i nor in |y_i|. On one on-policy pass s_i = 1 and GSPO is the policy gradient of its aggregation.
"""

from __future__ import annotations

import torch

from llmrl.objectives.policy import OBJECTIVES, BatchCounts, ObjectiveOutput, aggregate, no_dual_clip, regularizers


def sequence_log_ratio(
    logp: torch.Tensor,       # [N, T]
    logp_old: torch.Tensor,   # [N, T]
    mask: torch.Tensor,       # [N, T]
) -> torch.Tensor:
    """log s_i = mean over the chosen tokens of log(pi / pi_old) -> [N] (0 for a row with no chosen token)."""
    chosen = mask.bool()
    log_r = torch.where(chosen, logp - logp_old, torch.zeros_like(logp))   # not `* mask`: junk may be inf
    return log_r.sum(-1) / chosen.sum(-1).clamp(min=1)


@OBJECTIVES.register("gspo")
def gspo_objective(
    logp: torch.Tensor,              # [N, T]
    logp_old: torch.Tensor,          # [N, T]
    advantages: torch.Tensor,        # [N, T]
    mask: torch.Tensor,              # [N, T]
    counts: BatchCounts,
    *,
    logp_ref: torch.Tensor | None = None,
    entropy: torch.Tensor | None = None,
    is_weight: torch.Tensor | None = None,
    clip_low: float = 3e-4,
    clip_high: float = 4e-4,
    dual_clip: float | None = None,
    kl_coef: float = 0.0,
    kl_estimator: str = "k3",
    entropy_coef: float = 0.0,
    aggregation: str = "seq-mean-token-mean",
) -> ObjectiveOutput:
    """GSPO-token loss (module docstring) + the shared KL and entropy terms. `is_weight` multiplies each token's
    term after the clip, as in ppo_clip. Metrics: `clip_fraction` = the share of tokens in sequences whose ratio was
    clipped (a token share, as every objective's, so it adds up over micro-batches), and those of `regularizers`."""
    no_dual_clip("gspo", dual_clip)
    log_s = sequence_log_ratio(logp.detach(), logp_old, mask)                       # [N]
    s_tok = torch.exp(log_s[:, None] + logp - logp.detach())                        # [N, T]: value s_i
    unclipped = s_tok * advantages
    clipped = s_tok.clamp(1.0 - clip_low, 1.0 + clip_high) * advantages
    pg = -torch.minimum(unclipped, clipped)
    if is_weight is not None:
        pg = pg * is_weight.detach()
    seq_clipped = ((clipped < unclipped) & mask.bool()).any(-1, keepdim=True)    # [N, 1]
    losses = {"loss_policy": aggregate(pg, mask, aggregation, counts)}
    metrics = {"clip_fraction": aggregate(seq_clipped.expand_as(pg).float(), mask, "token-mean", counts).detach()}
    reg_losses, reg_metrics = regularizers(logp, logp_old, mask, counts, logp_ref=logp_ref, entropy=entropy,
                                           kl_coef=kl_coef, kl_estimator=kl_estimator, entropy_coef=entropy_coef,
                                           aggregation=aggregation)
    return ObjectiveOutput(losses=losses | reg_losses, metrics=metrics | reg_metrics)
