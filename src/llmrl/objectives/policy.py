"""Policy-gradient objective with its constraints: PPO clipping, KL to a reference, loss aggregation.

Notation: N sequences, T response tokens; `mask` [N, T] is 1 on tokens the policy chose.
Every function returns tensors and named outputs; the trainer sums the `loss_*` fields of an
`ObjectiveOutput` and logs the rest.

    gradient:     E[ grad log pi(a|s) * A ]                       (REINFORCE, Williams 1992)
    clipped:      min(r A, clip(r, 1 - eps_low, 1 + eps_high) A)   (PPO, Schulman et al. 2017, eq. 7;
                                                                    asymmetric bounds as in DAPO, Yu et al. 2025)
    dual clip:    max(min(r A, clip(r) A), c A) where A < 0         (Ye et al. 2020, eq. 5)
    KL in loss:   beta * sg(pi / pi_old) * KL_est(pi || pi_ref) per token  (k1/k2/k3, Schulman 2020 "Approximating
                                                                    KL"; the detached ratio: `off_policy_kl`)
    KL in reward: -beta * log(pi_old / pi_ref) per token            (Ziegler et al. 2019; `kl.kl_in_reward`)
    TIS weight:   w * (clipped loss) per token, w = min(pi_old / mu, C) (Yao et al. 2025; `mismatch.truncated_is_weight`)

Every objective in this package (ppo_clip here; gspo, cispo, dppo, sapo, each in its own file) has the signature
of `ppo_clip_objective` and adds the same `regularizers`; they differ only in the policy-gradient term.

Which KL estimator gives the right gradient in which placement is worked out in `llmrl.objectives.kl`;
`kl_estimate` and `KL_ESTIMATORS` live there and are re-exported here.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from llmrl.objectives.kl import KL_ESTIMATORS, kl_estimate, kl_in_reward  # noqa: F401  (re-exported)
from llmrl.registry import Registry

AGGREGATIONS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")


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

    The bias each one puts into the policy gradient (x = -r A per token; "weight" = d loss / d x of one token):
    - token-mean: weight 1 / #tokens, the same for every token, so a sequence counts in proportion to its length:
      longer sequences get more weight, and the batch's mix of lengths changes the scale of every step.
    - seq-mean-token-mean: weight 1 / (#seqs * len_i). Every sequence counts the same, so each token of a short
      answer is pushed 1/len_i harder: short wrong answers are penalised more strongly per token and long wrong
      answers less, which rewards rambling when wrong (the length bias Liu et al. 2025, Dr. GRPO, point out); for
      right answers it favours short ones.
    - seq-mean-token-sum: weight 1 / #seqs. The unbiased Monte-Carlo policy gradient of the per-sequence return
      (Williams 1992); its variance grows with the response length.
    - seq-mean-token-sum-norm: weight 1 / (#seqs * max_len), a constant: the unbiased gradient up to a constant
      factor (Dr. GRPO), with a scale that no longer depends on the lengths the batch happens to hold.
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


def dual_clipped(
    loss: torch.Tensor,         # [N, T] per-token PPO loss -min(r A, clip(r) A) from `clipped_surrogate`
    advantages: torch.Tensor,   # [N, T]
    *,
    dual_clip: float,           # c > 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dual-clip PPO (Ye et al. 2020, "Mastering complex control in MOBA games", eq. 5) -> (loss, where capped) [N, T].

    For A < 0 the objective is max(min(r A, clip(r) A), c A). With our loss = -objective that is
    min(loss, -c A) = min(loss, c |A|): a huge ratio on a bad token can no longer make the loss grow without bound,
    and where the cap is active the token's gradient is 0. Tokens with A >= 0 are unchanged.
    """
    if not dual_clip > 1.0:
        raise ValueError(f"dual_clip must be > 1 (Ye et al. 2020); got {dual_clip}")
    cap = -dual_clip * advantages
    capped = (advantages < 0) & (loss > cap)
    return torch.where(capped, cap, loss), capped


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
    is_weight: torch.Tensor | None = None,  # [N, T] detached truncated IS weight of the sampling engine (None = 1)
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    dual_clip: float | None = None,
    kl_coef: float = 0.0,
    kl_estimator: str = "k3",
    entropy_coef: float = 0.0,
    aggregation: str = "token-mean",
) -> ObjectiveOutput:
    """Clipped policy gradient + optional KL-to-reference loss + optional entropy bonus.

    With a large clip range this is plain REINFORCE with importance ratios against the sampling policy.
    `dual_clip` = c > 1 caps the loss of negative-advantage tokens at c |A| (`dual_clipped`).
    `is_weight` multiplies each token's policy-gradient term (after the clips): the truncated importance weight
    pi_old / mu of a rollout sampled by another engine (`llmrl.objectives.mismatch`); None leaves it unchanged.
    The KL-to-reference term is weighted by sg(pi / pi_old) (`off_policy_kl`: unbiased when data is reused).
    Metrics: `clip_fraction`, `dual_clip_fraction` (with dual_clip), and those of `regularizers`.
    """
    pg, clipped = clipped_surrogate(logp, logp_old, advantages, clip_low=clip_low, clip_high=clip_high)
    metrics = {"clip_fraction": aggregate(clipped.float(), mask, "token-mean", counts).detach()}
    if dual_clip is not None:
        pg, capped = dual_clipped(pg, advantages, dual_clip=dual_clip)
        metrics["dual_clip_fraction"] = aggregate(capped.float(), mask, "token-mean", counts).detach()
    if is_weight is not None:
        pg = pg * is_weight.detach()
    losses = {"loss_policy": aggregate(pg, mask, aggregation, counts)}
    reg_losses, reg_metrics = regularizers(logp, logp_old, mask, counts, logp_ref=logp_ref, entropy=entropy,
                                           kl_coef=kl_coef, kl_estimator=kl_estimator, entropy_coef=entropy_coef,
                                           aggregation=aggregation)
    return ObjectiveOutput(losses=losses | reg_losses, metrics=metrics | reg_metrics)


def off_policy_kl(
    logp: torch.Tensor,          # [N, T] under the policy being trained (carries gradient)
    logp_old: torch.Tensor,      # [N, T] under the policy that sampled the tokens
    logp_ref: torch.Tensor,      # [N, T] under the reference policy
    kind: str,
) -> torch.Tensor:
    """Per-token KL-to-reference loss term of tokens sampled from pi_old: sg(pi / pi_old) * k(x) [N, T].

    A KL estimator in the loss is an expectation over x ~ pi, but a reused rollout (objective.epochs or
    minibatches > 1) was sampled from pi_old; E_old[sg(pi / pi_old) grad k(x)] = E_pi[grad k(x)], so the detached
    ratio makes the gradient the on-policy one (tests/objectives/test_kl_gradients.py proves it exactly). On one
    on-policy pass pi_old = sg(pi), the weight is exactly 1 and the term is unchanged bit for bit. The state distribution
    stays pi_old's (the usual PPO approximation: only the token-level ratio is corrected).
    """
    weight = torch.exp(logp.detach() - logp_old)
    return weight * kl_estimate(logp, logp_ref, kind)


def regularizers(
    logp: torch.Tensor,              # [N, T] (carries gradient)
    logp_old: torch.Tensor,          # [N, T]
    mask: torch.Tensor,              # [N, T]
    counts: BatchCounts,
    *,
    logp_ref: torch.Tensor | None,   # [N, T]
    entropy: torch.Tensor | None,    # [N, T]
    kl_coef: float,
    kl_estimator: str,
    entropy_coef: float,
    aggregation: str,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """What every policy objective adds beside its policy-gradient term -> (losses, metrics): the KL to the
    reference (`off_policy_kl`, weighted by sg(pi / pi_old)) and the entropy bonus as losses; as metrics
    `approx_kl_old` = k3 estimate of KL(pi_old || pi) (r - 1 - log r with r = pi / pi_old: unbiased and >= 0;
    Schulman 2020), `kl_to_ref` = k3 estimate of KL(pi || pi_ref), `entropy`."""
    losses: dict[str, torch.Tensor] = {}
    metrics = {"approx_kl_old": aggregate(kl_estimate(logp_old, logp.detach(), "k3"), mask, "token-mean", counts)}
    if logp_ref is not None:
        kl = aggregate(off_policy_kl(logp, logp_old, logp_ref, kl_estimator), mask, aggregation, counts)
        if kl_coef:
            losses["loss_kl_to_ref"] = kl_coef * kl
        metrics["kl_to_ref"] = aggregate(kl_estimate(logp.detach(), logp_ref, "k3"), mask, "token-mean", counts)
    if entropy is not None:
        ent = aggregate(entropy, mask, "token-mean", counts)
        if entropy_coef:
            losses["loss_entropy"] = -entropy_coef * aggregate(entropy, mask, aggregation, counts)
        metrics["entropy"] = ent.detach()
    return losses, metrics


def no_dual_clip(objective: str, dual_clip: float | None) -> None:
    """The objectives other than ppo_clip take `dual_clip` (the signature is shared) but have no dual clip."""
    if dual_clip is not None:
        raise ValueError(f"objective.dual_clip applies to ppo_clip only; {objective} has no dual clip "
                         f"(set objective.dual_clip=null)")
