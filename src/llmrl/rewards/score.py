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

import contextlib
import logging
import math
import numbers
import signal
import threading
from dataclasses import dataclass, field

import torch

from llmrl.rewards.functions import REWARDS
from llmrl.sandbox import escape

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


class RewardTimeout(Exception):
    pass


@contextlib.contextmanager
def _time_limit(seconds: float | None):
    """Raise RewardTimeout in the body after `seconds` (main thread only: SIGALRM; elsewhere no limit)."""
    if not seconds or threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_alarm(signum, frame):
        raise RewardTimeout(f"took longer than {seconds:g} s")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _run(fn, completions: list[str], examples: list, options: dict,
         timeout_s: float | None = None) -> tuple[list[float], list[str]]:
    """One reward function on the batch: its values with failures set to 0, and the failures' descriptions.
    A function that hangs past `timeout_s` scores the whole batch 0 (it is not retried sample by sample)."""
    try:
        with _time_limit(timeout_s):
            return _clean(fn(completions, examples, **options), len(completions))
    except RewardTimeout as e:
        return [0.0] * len(completions), [f"timed out: {e}"] * len(completions)
    except Exception:
        pass
    out, errors = [], []
    for completion, ex in zip(completions, examples):  # find which samples it fails on
        try:
            with _time_limit(timeout_s):
                values, sample_errors = _clean(fn([completion], [ex], **options), 1)
        except Exception as e:
            values, sample_errors = [0.0], [f"raised {type(e).__name__}: {e}"]
        out.extend(values)
        errors.extend(sample_errors)
    return out, errors


@dataclass(frozen=True)
class Term:
    """One term of a (possibly hierarchical) reward: weight * gate * normalise(fn(completions))."""
    name: str
    weight: float = 1.0
    options: dict = field(default_factory=dict)
    gate: str | None = None          # another term's name: this term counts only where that term >= gate_threshold
    gate_threshold: float = 1.0
    normalize: str = "none"          # none | batch (z-score over the batch before weighting: sub-goals on one scale)
    timeout_s: float | None = 60.0   # a call that runs longer scores its batch 0


def _as_term(t) -> Term:
    if isinstance(t, Term):
        return t
    if isinstance(t, tuple):
        return Term(*t)
    return Term(**{k: getattr(t, k) for k in Term.__dataclass_fields__ if hasattr(t, k)})


def score(completions: list[str], examples: list, terms: list) -> RewardResult:
    """Weighted sum of reward functions, optionally gated and normalised per term (a hierarchical reward).

    terms: `Term`s, or (name, weight, options) tuples, or objects with those attributes (config RewardTerms);
    names distinct. `components` holds each term's raw score, so every sub-goal is logged on its own.
    """
    if len(completions) != len(examples):
        raise ValueError(f"score: {len(completions)} completions but {len(examples)} examples")
    terms = [_as_term(t) for t in terms]
    names = [t.name for t in terms]
    if len(set(names)) != len(names):
        raise ValueError(f"score: a reward function is listed twice in {names}")
    for t in terms:
        if t.gate is not None and t.gate not in names:
            raise ValueError(f"score: term {t.name!r} is gated on {t.gate!r}, which is not a term; terms: {names}")
    components, failures = {}, {}
    for t in terms:
        values, errors = _run(REWARDS.get(t.name), completions, examples, dict(t.options or {}), t.timeout_s)
        if errors:
            log.warning("reward function %r failed on %d of %d samples (scored 0): %s",
                        t.name, len(errors), len(completions), escape(errors[0], 300))  # may quote model text
        components[t.name] = torch.tensor(values, dtype=torch.float32)
        failures[t.name] = len(errors)
    return RewardResult(total=combine(components, terms), components=components, failures=failures)


def combine(components: dict[str, torch.Tensor], terms: list) -> torch.Tensor:
    """The weighted sum [N] of the terms' raw scores `components` (name -> [N]): each gated on its gate term's
    score and, with normalize: batch, z-scored over the N rows given (the whole batch: under torchrun the
    components of every rank are gathered first, `train.distributed.global_rewards`)."""
    terms = [_as_term(t) for t in terms]
    total = torch.zeros(len(next(iter(components.values()))), dtype=torch.float32)
    for t in terms:
        x = components[t.name]
        if t.normalize == "batch" and len(x) > 1:
            x = (x - x.mean()) / (x.std() + 1e-6)
        elif t.normalize not in ("none", "batch"):
            raise ValueError(f"score: term {t.name!r} normalize must be none or batch, got {t.normalize!r}")
        if t.gate is not None:
            x = x * (components[t.gate] >= t.gate_threshold).float()
        total += t.weight * x
    return total
