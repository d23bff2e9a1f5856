"""Learning-rate schedules: hand values at given steps, and `count` as an iterative running mean."""

import dataclasses
import math

import pytest
import torch

from llmrl.config import OptimConfig
from llmrl.train.schedules import SCHEDULES, lr_multiplier


@pytest.mark.parametrize("schedule, step, want", [
    ("constant", 0, 1.0), ("constant", 7, 1.0),
    ("linear", 0, 1.0), ("linear", 5, 0.5), ("linear", 10, 0.0), ("linear", 12, 0.0),
    ("cosine", 0, 1.0), ("cosine", 5, 0.5), ("cosine", 10, 0.0), ("cosine", 12, 0.0),
    ("cosine", 2, 0.5 * (1 + math.cos(math.pi * 0.2))),
    ("count", 0, 1.0), ("count", 1, 0.5), ("count", 9, 0.1),
])
def test_hand_values_without_warmup(schedule, step, want):
    assert lr_multiplier(step, schedule=schedule, warmup=0, total=10) == pytest.approx(want, abs=1e-12)


@pytest.mark.parametrize("schedule, step, want", [
    ("constant", 0, 0.25), ("constant", 3, 1.0), ("constant", 4, 1.0),
    ("linear", 1, 0.5), ("linear", 4, 1.0), ("linear", 7, 0.5), ("linear", 10, 0.0),   # progress over 10 - 4 steps
    ("cosine", 2, 0.75), ("cosine", 4, 1.0), ("cosine", 7, 0.5), ("cosine", 10, 0.0),
])
def test_hand_values_with_warmup(schedule, step, want):
    assert lr_multiplier(step, schedule=schedule, warmup=4, total=10) == pytest.approx(want, abs=1e-12)


def test_count_schedule_sgd_is_the_running_mean():
    """SGD with lr 1 * 1/(k+1) on (theta - x_k)^2 / 2 keeps theta equal to the mean of x_0..x_k after every step."""
    xs = torch.randn(50, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 3 + 1
    theta = torch.nn.Parameter(torch.tensor(123.0, dtype=torch.float64))   # the start is forgotten after step 0
    opt = torch.optim.SGD([theta], lr=1.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: lr_multiplier(k, schedule="count", warmup=0, total=50))
    for k, x in enumerate(xs):
        opt.zero_grad()
        (0.5 * (theta - x) ** 2).backward()
        opt.step()
        sched.step()
        assert float(theta.detach()) == pytest.approx(float(xs[:k + 1].mean()), abs=1e-12)


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match="constant, linear, cosine, count"):
        lr_multiplier(0, schedule="step", warmup=0, total=10)
    with pytest.raises(ValueError, match="warm-up"):
        lr_multiplier(0, schedule="count", warmup=3, total=10)


def test_config_offers_exactly_the_registered_schedules():
    """optim.schedule's choices (checked when a config loads) and the table lr_multiplier reads name the same ones."""
    choices = {f.name: f.metadata for f in dataclasses.fields(OptimConfig)}["schedule"]["choices"]
    assert tuple(choices) == tuple(SCHEDULES) == ("constant", "linear", "cosine", "count")
