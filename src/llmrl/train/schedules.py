"""Learning-rate schedules: the simplest constraint on how far one update moves the policy.

`lr_multiplier(step, ...)` is the factor on the base learning rate for the update with index `step`
(0 = the first update), in the form `torch.optim.lr_scheduler.LambdaLR` calls: it evaluates the function at 0
when built and at 1, 2, ... after each `scheduler.step()`.

    constant  1                                                  after warm-up
    linear    1 - progress                                       linear decay to 0 at `total`
    cosine    (1 + cos(pi * progress)) / 2                       Loshchilov & Hutter 2017 (SGDR), no restarts
    count     1 / (step + 1)                                     the seed's footnote 13: a running mean
    with progress = (step - warmup) / (total - warmup), and a linear warm-up (step + 1) / warmup before it
    (Goyal et al. 2017) for every schedule but `count`.

`count` is the step size of an iterative mean: with base lr 1, SGD on (theta - x_k)^2 / 2 gives
theta_{k+1} = theta_k + (x_k - theta_k) / (k + 1), which is exactly the mean of x_0..x_k, held in one number
instead of a list (Robbins & Monro 1951 step sizes: they sum to infinity, their squares do not). A base lr
other than 1 scales it. A warm-up would break the running mean, so `count` refuses one.
"""

from __future__ import annotations

import math
from typing import Callable

# name -> the multiplier after warm-up, from (step, progress): step 0-based, progress in [0, 1] (module docstring)
SCHEDULES: dict[str, Callable[[int, float], float]] = {
    "constant": lambda step, progress: 1.0,
    "linear": lambda step, progress: 1.0 - progress,
    "cosine": lambda step, progress: 0.5 * (1.0 + math.cos(math.pi * progress)),
    "count": lambda step, progress: 1.0 / (step + 1),
}
NO_WARMUP = ("count",)        # a warm-up would break the running mean


def lr_multiplier(step: int, *, schedule: str, warmup: int, total: int) -> float:
    """Multiplier of the base learning rate at update `step` (0-based): linear warm-up, then the schedule."""
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown learning-rate schedule {schedule!r}; valid: {', '.join(SCHEDULES)}")
    if warmup and schedule in NO_WARMUP:
        raise ValueError(f"schedule {schedule!r} is a running mean and takes no warm-up; got warmup={warmup}")
    if warmup and step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, max(0.0, (step - warmup) / max(1, total - warmup)))
    return SCHEDULES[schedule](step, progress)
