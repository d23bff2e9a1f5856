"""DAPO's soft overlong punishment (Yu et al. 2025, arXiv 2503.14476): a length-aware reward term.

    R_len(y) =  0                                   |y| <= L_max - L_cache
                ((L_max - L_cache) - |y|) / L_cache  L_max - L_cache < |y| <= L_max
                -1                                  |y| > L_max

L_max = rollout.max_new_tokens, L_cache = rollout.overlong_buffer * L_max (at least 1 token): inside the last L_cache tokens the penalty grows
linearly from 0 to -1, so a response learns it is running long before it is cut (a cut response, |y| = L_max, gets
-1). It is added to the reward (weight rollout.overlong_weight) as the component `overlong`; it needs the token
length, which reward functions (text in, scores out) never see, so the sampling step adds it (train/sampling.py).
"""

from __future__ import annotations

from dataclasses import replace

import torch

from llmrl.rewards.score import RewardResult


def overlong_penalty(lengths: torch.Tensor, *, max_len: int, buffer: int) -> torch.Tensor:
    """R_len per sequence: lengths [N] (response tokens) -> [N] float32 in [-1, 0]."""
    if not 0 < buffer <= max_len:
        raise ValueError(f"overlong buffer must be in (0, max_new_tokens = {max_len}]; got {buffer}")
    free = max_len - buffer
    return ((free - lengths.float()) / buffer).clamp(-1.0, 0.0)


def with_overlong(rewards: RewardResult, lengths: torch.Tensor, *, max_len: int, buffer: int,
                  weight: float) -> RewardResult:
    """`rewards` with the soft overlong penalty added: total += weight * R_len, component `overlong` = R_len."""
    penalty = overlong_penalty(lengths, max_len=max_len, buffer=buffer)
    return replace(rewards, total=rewards.total + weight * penalty,
                   components={**rewards.components, "overlong": penalty})
