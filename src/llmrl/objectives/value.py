"""The critic's regression loss, with PPO-style value clipping.

    loss_value = 1/2 * max((V - R)^2, (V_clip - R)^2),  V_clip = V_old + clip(V - V_old, -eps_v, eps_v)

(the clipped value loss of the PPO reference implementation, openai/baselines ppo2; Schulman et al. 2017
train V by plain regression — the clip is the implementation detail most LLM PPO code keeps).
Notation: N sequences, T response tokens, `mask` [N, T] 1 = a token the policy chose.
"""

from __future__ import annotations

import torch

from llmrl.objectives.policy import BatchCounts, ObjectiveOutput, aggregate


def clipped_value_loss(
    values: torch.Tensor,       # [N, T] V(s_t) under the critic being trained (carries gradient)
    values_old: torch.Tensor,   # [N, T] V(s_t) when the rollout was made
    returns: torch.Tensor,      # [N, T] regression targets
    mask: torch.Tensor,         # [N, T]
    counts: BatchCounts,
    *,
    clip: float | None = 0.2,
    coef: float = 0.5,
    aggregation: str = "token-mean",
) -> ObjectiveOutput:
    err = (values - returns) ** 2
    if clip is None:
        per_token, clipped = err, torch.zeros_like(err, dtype=torch.bool)
    else:
        v_clip = values_old + (values - values_old).clamp(-clip, clip)
        err_clip = (v_clip - returns) ** 2
        per_token, clipped = torch.maximum(err, err_clip), err_clip > err
    loss = 0.5 * aggregate(per_token, mask, aggregation, counts)
    return ObjectiveOutput(
        losses={"loss_value": coef * loss},
        metrics={"value_loss": loss.detach(),
                 "value_clip_fraction": aggregate(clipped.float(), mask, "token-mean", counts).detach()},
    )


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """1 - Var[R - V] / Var[R] over chosen tokens: 1 = perfect critic, 0 = no better than a constant."""
    m = mask.bool()
    r, v = returns[m], values[m]
    var_r = r.var(unbiased=False)
    return 1 - (r - v).var(unbiased=False) / var_r if var_r > 0 else torch.tensor(float("nan"), device=r.device)
