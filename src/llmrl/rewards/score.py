"""Score a batch of completions with a weighted sum of reward functions, containing their failures.

    result = score(completions, examples, [("correct", 1.0, {}), ("format", 0.1, {})])
    result.total                  # [N] float32: sum of weight * component
    result.components["format"]   # [N] float32, unweighted
    result.failures["format"]     # samples scored 0 because the function failed on them

A reward function's fault never stops training: if it raises on the batch it is retried one sample at a time
so only the failing samples get 0; a NaN/inf or non-number value gives 0 for that sample; a return of the
wrong length gives 0 for the whole batch. Each failing function is logged once per call, with its error.
"""

from __future__ import annotations

import logging
import math
import numbers
from dataclasses import dataclass

import torch

from llmrl.rewards.functions import REWARDS

log = logging.getLogger("llmrl.rewards")
# math_verify warns on every parse that its signal timeouts are off (they cannot run off the main thread).
logging.getLogger("math_verify").setLevel(logging.ERROR)


@dataclass
class RewardResult:
    total: torch.Tensor                     # [N] float32, sum of weight * component
    components: dict[str, torch.Tensor]     # name -> [N] float32, unweighted
    failures: dict[str, int]                # name -> number of samples scored 0 because the function failed


def _clean(values, n: int) -> tuple[list[float], list[str]]:
    """`values` as n floats, and a description of each sample that had to be set to 0."""
    if isinstance(values, torch.Tensor):
        values = values.tolist()
    try:
        values = list(values)
    except TypeError:
        return [0.0] * n, [f"returned {type(values).__name__}, not a list"] * n
    if len(values) != n:
        return [0.0] * n, [f"returned {len(values)} values for {n} completions"] * n
    out, errors = [], []
    for v in values:
        if isinstance(v, torch.Tensor) and v.numel() == 1:
            v = v.item()
        if isinstance(v, numbers.Real) and math.isfinite(v):
            out.append(float(v))
        else:
            out.append(0.0)
            errors.append(f"returned {v!r}")
    return out, errors


def _run(fn, completions: list[str], examples: list, options: dict) -> tuple[list[float], list[str]]:
    """One reward function on the batch: its values with failures set to 0, and the failures' descriptions."""
    try:
        return _clean(fn(completions, examples, **options), len(completions))
    except Exception:
        pass
    out, errors = [], []
    for completion, ex in zip(completions, examples):  # find which samples it fails on
        try:
            values, sample_errors = _clean(fn([completion], [ex], **options), 1)
        except Exception as e:
            values, sample_errors = [0.0], [f"raised {type(e).__name__}: {e}"]
        out.extend(values)
        errors.extend(sample_errors)
    return out, errors


def score(completions: list[str], examples: list, terms: list[tuple[str, float, dict]]) -> RewardResult:
    """Weighted sum of reward functions. terms: (registered name, weight, options) each, names distinct."""
    if len(completions) != len(examples):
        raise ValueError(f"score: {len(completions)} completions but {len(examples)} examples")
    names = [name for name, _, _ in terms]
    if len(set(names)) != len(names):
        raise ValueError(f"score: a reward function is listed twice in {names}")
    total = torch.zeros(len(completions), dtype=torch.float32)
    components, failures = {}, {}
    for name, weight, options in terms:
        values, errors = _run(REWARDS.get(name), completions, examples, dict(options or {}))
        if errors:
            log.warning("reward function %r failed on %d of %d samples (scored 0): %s",
                        name, len(errors), len(completions), errors[0])
        components[name] = torch.tensor(values, dtype=torch.float32)
        failures[name] = len(errors)
        total += weight * components[name]
    return RewardResult(total=total, components=components, failures=failures)
