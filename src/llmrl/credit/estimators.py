"""Advantage estimators: pure functions of tensors behind one registry with one signature.

    estimator(inputs: CreditInputs, **hyper_parameters) -> Credit

Every estimator reads the same `CreditInputs` and returns the same `Credit`, so the recipe calls
`assign_credit(name, inputs, **kw)` and never special-cases one. Notation: N sequences, T response
tokens; `response_mask` [N, T] is 1 on tokens the policy chose and 0 on padding and tool outputs, and
no estimator lets a masked position change any result. Masked positions in the middle of a row (tool
outputs in a multi-turn episode) are skipped as if they were not there: every per-token recursion runs
over the chosen tokens only.

    outcome baselines   broadcast, batch_mean, grpo, dr_grpo, rloo, reinforce_pp
    critic values       value_baseline, gae
    step-level credit   process (process rewards), vineppo (Monte-Carlo values of step prefixes)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from llmrl.registry import Registry


@dataclass(frozen=True)
class CreditInputs:
    scores: torch.Tensor                      # [N] outcome reward of each sequence
    response_mask: torch.Tensor               # [N, T] 1 = token the policy chose
    group_ids: torch.Tensor                   # [N] which prompt each sequence answers
    token_rewards: torch.Tensor | None = None  # [N, T] extra per-token rewards (e.g. -beta * KL, process rewards)
    values: torch.Tensor | None = None        # [N, T] critic values V(s_t)
    step_ids: torch.Tensor | None = None      # [N, T] reasoning-step index of each token (-1 = none)
    step_scores: torch.Tensor | None = None   # [N, S] score of each reasoning step (NaN = no such step)

    def __post_init__(self):
        N, T = self.response_mask.shape
        if self.scores.shape != (N,) or self.group_ids.shape != (N,):
            raise ValueError(f"scores {tuple(self.scores.shape)} and group_ids {tuple(self.group_ids.shape)} "
                             f"must be [N]={N} to match response_mask [N, T]={N, T}")
        for name in ("token_rewards", "values", "step_ids"):
            x = getattr(self, name)
            if x is not None and x.shape != (N, T):
                raise ValueError(f"{name} is {tuple(x.shape)}, expected [N, T]={N, T}")
        if self.step_scores is not None and (self.step_scores.dim() != 2 or self.step_scores.shape[0] != N):
            raise ValueError(f"step_scores is {tuple(self.step_scores.shape)}, expected [N, S] with N={N}")


@dataclass(frozen=True)
class Credit:
    advantages: torch.Tensor                  # [N, T] 0 at masked positions
    returns: torch.Tensor | None = None       # [N, T] regression targets for a critic, when there is one


CREDIT: Registry = Registry("credit estimator")


def assign_credit(name: str, inputs: CreditInputs, **hyper) -> Credit:
    return CREDIT.get(name)(inputs, **hyper)


# ----------------------------------------------------------------------------- helpers


def group_stats(x: torch.Tensor, group_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [N], group_ids [N] -> (mean [N], unbiased std [N], group size [N]) of each element's group."""
    _, idx, counts = torch.unique(group_ids, return_inverse=True, return_counts=True)
    sums = torch.zeros(len(counts), dtype=x.dtype).index_add_(0, idx, x)
    mean = sums / counts
    sq = torch.zeros(len(counts), dtype=x.dtype).index_add_(0, idx, (x - mean[idx]) ** 2)
    std = (sq / (counts - 1).clamp(min=1)).sqrt()
    return mean[idx], std[idx], counts[idx].to(x.dtype)


def broadcast_to_tokens(per_seq: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """per_seq [N] -> [N, T]: the same value on every chosen token, 0 elsewhere."""
    return per_seq[:, None] * response_mask


def sequence_returns(inputs: CreditInputs) -> torch.Tensor:
    """Outcome score plus the sum of any per-token rewards over chosen tokens -> [N]."""
    extra = 0.0 if inputs.token_rewards is None else (inputs.token_rewards * inputs.response_mask).sum(-1)
    return inputs.scores + extra


# ----------------------------------------------------------------------------- estimators


@CREDIT.register("broadcast")
def broadcast(inputs: CreditInputs) -> Credit:
    """The seed's basic approach: the whole episode reward to every token (REINFORCE, Williams 1992)."""
    R = sequence_returns(inputs)                                                  # [N]
    A = broadcast_to_tokens(R, inputs.response_mask)                              # [N, T]
    return Credit(advantages=A, returns=A)


@CREDIT.register("grpo")
def group_baseline(inputs: CreditInputs, *, normalize_std: bool = True, eps: float = 1e-6) -> Credit:
    """GRPO (Shao et al. 2024, eq. 3 outcome supervision): A_i = (R_i - mean_group R) / (std_group R + eps).

    With `normalize_std=False` this is the plain group-mean baseline (Dr. GRPO's advantage).
    A group whose rewards are all equal gets advantage 0 on every token.
    """
    R = sequence_returns(inputs)                                                  # [N]
    mean, std, _ = group_stats(R, inputs.group_ids)
    A = R - mean
    if normalize_std:
        A = A / (std + eps)
    return Credit(advantages=broadcast_to_tokens(A, inputs.response_mask), returns=broadcast_to_tokens(R, inputs.response_mask))
