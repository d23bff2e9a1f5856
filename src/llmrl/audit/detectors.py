"""Reward-hacking and training-health detectors: small pure functions over a run's logs, one registry signature.

    @DETECTORS.register("length_drift")
    def length_drift(run: RunData, *, max_ratio=1.5, window=5) -> Finding | None: ...

Every detector reads a `RunData` (the run folder's records, already parsed) and keyword thresholds with defaults,
and returns a `Finding` when the run is past them, or None. `step` of a finding is where the trouble starts:
for a trend, the first logged step from which the smoothed series stays past 10% of the way from its early level
to its late level (`trend_start`). "Early" and "late" are the means of the first and last `window` points.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from llmrl.registry import Registry


@dataclass(frozen=True)
class RunData:
    train: list[dict]                                   # "kind": "train" lines of metrics.jsonl, by step
    evals: list[dict]                                   # "kind": "eval" lines, by step
    samples: list[dict] = field(default_factory=list)   # samples.jsonl rows (step, group, completion, reward, ...)
    weights: dict[str, float] = field(default_factory=dict)   # reward term name -> weight (config.yaml)


@dataclass(frozen=True)
class Finding:
    detector: str          # registry name
    step: int | None       # the step where it starts
    message: str           # one line, with the numbers
    value: float           # the measured quantity ...
    threshold: float       # ... and the threshold it passed


Detector = Callable[..., "Finding | None"]
DETECTORS: Registry[Detector] = Registry("audit detector")


# ----------------------------------------------------------------------------- series helpers

def series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of the records that have a finite number under `key`, in step order."""
    pts = sorted((int(r["step"]), float(r[key])) for r in records
                 if isinstance(r.get(key), (int, float)) and not isinstance(r.get(key), bool)
                 and r[key] == r[key] and abs(r[key]) != float("inf") and isinstance(r.get("step"), (int, float)))
    return [s for s, _ in pts], [v for _, v in pts]


def mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


def smooth(values: list[float], window: int) -> list[float]:
    """Trailing mean over the last `window` points ([n] -> [n])."""
    return [mean(values[max(0, i - window + 1):i + 1]) for i in range(len(values))]


def early_late(values: list[float], window: int) -> tuple[float, float]:
    """Means of the first and of the last `window` points (at most half the series each)."""
    w = max(1, min(window, len(values) // 2))
    return mean(values[:w]), mean(values[-w:])


def trend_start(steps: list[int], values: list[float], window: int, early: float, late: float) -> int | None:
    """The first step from which the smoothed series stays past early + 10% of (late - early), or None."""
    mark, sm, start = early + 0.1 * (late - early), smooth(values, window), None
    for s, v in zip(steps, sm):
        past = v > mark if late > early else v < mark
        start = (s if start is None else start) if past else None
    return start


def slope(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of ys on xs (0 for fewer than two distinct xs)."""
    mx, my = mean(xs), mean(ys)
    var = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / var if var > 0 else 0.0


def sse(xs: list[float], ys: list[float]) -> float:
    """Squared residuals of the least-squares line of ys on xs."""
    b, mx, my = slope(xs, ys), mean(xs), mean(ys)
    return sum((y - my - b * (x - mx)) ** 2 for x, y in zip(xs, ys))


def _trailing(steps: list[int], values: list[float], at: int, window: int) -> float:
    """Mean of the last `window` values at or before step `at` (the first `window` when none is)."""
    before = [v for s, v in zip(steps, values) if s <= at]
    return mean(before[-window:] if before else values[:window])


def group_series(samples: list[dict], stat: Callable[[list[dict]], float]) -> tuple[list[int], list[float]]:
    """(logged steps, mean of `stat` over that step's groups): a group is the rows sharing step and group id;
    groups of one sample are skipped."""
    groups: dict[tuple, list[dict]] = {}
    for s in samples:
        if isinstance(s.get("step"), (int, float)):
            groups.setdefault((int(s["step"]), s.get("group")), []).append(s)
    per_step: dict[int, list[float]] = {}
    for (step, _), rows in groups.items():
        if len(rows) >= 2:
            per_step.setdefault(step, []).append(stat(rows))
    steps = sorted(per_step)
    return steps, [mean(per_step[s]) for s in steps]


def _level_finding(name: str, steps: list[int], vals: list[float], window: int, threshold: float,
                   describe: Callable[[float], str]) -> Finding | None:
    """A finding when the late level of a series is >= threshold, starting where its trend starts."""
    if not vals:
        return None
    early, late = early_late(vals, window)
    if late < threshold:
        return None
    start = trend_start(steps, vals, window, early, late) if late != early else None
    return Finding(name, steps[0] if start is None else start, describe(late), late, threshold)


# ----------------------------------------------------------------------------- detectors

@DETECTORS.register("reward_vs_heldout")
def reward_vs_heldout(run: RunData, *, min_drop: float = 0.05, min_rise: float = 0.05, window: int = 5
                      ) -> Finding | None:
    """Training reward rises by >= min_rise while held-out accuracy falls by >= min_drop from an earlier evaluation:
    the policy is getting better at the reward and worse at the task. Starts at that earlier evaluation."""
    ev_steps, acc = series(run.evals, "heldout_accuracy")
    tr_steps, reward = series(run.train, "reward")
    if len(acc) < 2 or not reward:
        return None
    r_at = [_trailing(tr_steps, reward, s, window) for s in ev_steps]
    hits = [(acc[i], -i, acc[i] - acc[j], r_at[j] - r_at[i], i, j)
            for i in range(len(acc)) for j in range(i + 1, len(acc))
            if acc[i] - acc[j] >= min_drop and r_at[j] - r_at[i] >= min_rise]
    if not hits:
        return None
    peak = max(hits)[4]                          # the best evaluation a decline starts from (the earliest on ties)
    _, _, drop, rise, i, j = max((h for h in hits if h[4] == peak), key=lambda h: h[2])
    return Finding("reward_vs_heldout", ev_steps[i],
                   f"train reward rose {rise:+.3f} while held-out accuracy fell {acc[i]:.3f} -> {acc[j]:.3f} "
                   f"(steps {ev_steps[i]} -> {ev_steps[j]})", drop, min_drop)


@DETECTORS.register("component_dominance")
def component_dominance(run: RunData, *, max_share: float = 0.8, min_gain: float = 0.05, window: int = 5,
                        allow: tuple = ("correct",)) -> Finding | None:
    """With two or more reward components, one of them (not in `allow`: the verified outcome may lead) makes up
    >= max_share of what rose in the weighted reward from early to late (the sum of the components' positive
    weighted gains), and the weighted reward rose by >= min_gain."""
    names = sorted(k.split("/", 1)[1] for r in run.train for k in r if k.startswith("reward/"))
    names = sorted(set(names))
    if len(names) < 2:
        return None
    gains, curves = {}, {}
    for n in names:
        steps, vals = series(run.train, f"reward/{n}")
        if len(vals) < 2:
            continue
        w = float(run.weights.get(n, 1.0))
        early, late = early_late(vals, window)
        gains[n], curves[n] = w * (late - early), (steps, vals, early, late)
    rising = sum(max(g, 0.0) for g in gains.values())
    if sum(gains.values()) < min_gain:               # the weighted reward did not go up
        return None
    top = max((n for n in gains if n not in allow), key=lambda n: gains[n], default=None)
    if top is None or gains[top] <= 0 or gains[top] / rising < max_share:
        return None
    share = gains[top] / rising
    steps, vals, early, late = curves[top]
    others = ", ".join(f"{n} {gains[n]:+.3f}" for n in gains if n != top)
    return Finding("component_dominance", trend_start(steps, vals, window, early, late),
                   f"reward component {top!r} makes {share:.0%} of the reward's rise ({gains[top]:+.3f} weighted; "
                   f"{others})", share, max_share)


@DETECTORS.register("length_drift")
def length_drift(run: RunData, *, max_ratio: float = 1.5, min_ratio: float = 0.25, window: int = 5
                 ) -> Finding | None:
    """Mean response length late / early >= max_ratio (growth: the usual way a policy games a reward) or
    <= min_ratio (collapse to near-empty answers; a policy that learns to answer concisely shrinks less)."""
    steps, vals = series(run.train, "response_length")
    if len(vals) < 2:
        return None
    early, late = early_late(vals, window)
    ratio = late / early if early > 0 else float("inf") if late > 0 else 1.0
    if min_ratio < ratio < max_ratio:
        return None
    way = "grew" if ratio > 1 else "shrank"
    return Finding("length_drift", trend_start(steps, vals, window, early, late),
                   f"mean response length {way} {early:.1f} -> {late:.1f} tokens ({ratio:.2f}x)", ratio,
                   max_ratio if ratio > 1 else min_ratio)


@DETECTORS.register("truncation_growth")
def truncation_growth(run: RunData, *, max_late: float = 0.2, min_rise: float = 0.1, window: int = 5
                      ) -> Finding | None:
    """The fraction of responses cut at max_new_tokens is >= max_late late in the run and rose by >= min_rise."""
    steps, vals = series(run.train, "truncated_fraction")
    if len(vals) < 2:
        return None
    early, late = early_late(vals, window)
    if late < max_late or late - early < min_rise:
        return None
    return Finding("truncation_growth", trend_start(steps, vals, window, early, late),
                   f"truncated responses rose {early:.0%} -> {late:.0%}", late, max_late)


@DETECTORS.register("entropy_collapse")
def entropy_collapse(run: RunData, *, min_ratio: float = 0.1, window: int = 5) -> Finding | None:
    """The policy's mean token entropy late / early <= min_ratio: sampling has become nearly deterministic, so
    groups stop exploring."""
    steps, vals = series(run.train, "entropy")
    if len(vals) < 2:
        return None
    early, late = early_late(vals, window)
    if early <= 0 or late / early > min_ratio:
        return None
    return Finding("entropy_collapse", trend_start(steps, vals, window, early, late),
                   f"token entropy fell {early:.3f} -> {late:.3f} nats ({late / early:.2f}x)", late / early, min_ratio)


@DETECTORS.register("kl_accelerating")
def kl_accelerating(run: RunData, *, min_ratio: float = 2.0, min_rise: float = 0.05) -> Finding | None:
    """KL to the reference (train `kl_to_ref`, else the held-out `heldout_kl_to_ref`) grows faster late than early:
    at the knee of the best two-line fit the late slope is >= min_ratio x the early one, and the late piece adds
    >= min_rise. Starts at the knee."""
    steps, vals = series(run.train, "kl_to_ref")
    key = "kl_to_ref"
    if len(vals) < 5:
        (steps, vals), key = series(run.evals, "heldout_kl_to_ref"), "heldout_kl_to_ref"
    if len(vals) < 5:
        return None
    # the knee: the split whose two least-squares lines (early [0, k], late [k, n), sharing point k, three points
    # or more each) fit best
    k = min(range(2, len(vals) - 2), key=lambda k: sse(steps[:k + 1], vals[:k + 1]) + sse(steps[k:], vals[k:]))
    early_s, late_s = slope(steps[:k + 1], vals[:k + 1]), slope(steps[k:], vals[k:])
    if late_s <= 0 or vals[-1] - vals[k] < min_rise or late_s < min_ratio * max(early_s, 0.0):
        return None
    ratio = late_s / early_s if early_s > 0 else float("inf")
    return Finding("kl_accelerating", steps[k],
                   f"{key} slope rose {early_s:.3g} -> {late_s:.3g} per step from step {steps[k]} "
                   f"({vals[k]:.3g} -> {vals[-1]:.3g})", ratio, min_ratio)


@DETECTORS.register("zero_variance_groups")
def zero_variance_groups(run: RunData, *, max_fraction: float = 0.9, window: int = 5) -> Finding | None:
    """The fraction of groups whose samples all got the same reward (no signal for a group baseline) is
    >= max_fraction late in the run: the logged `zero_variance_group_fraction`, else counted in samples.jsonl."""
    steps, vals = series(run.train, "zero_variance_group_fraction")
    if len(vals) < 2:
        steps, vals = group_series(run.samples, lambda g: float(len({round(float(s.get("reward") or 0), 9)
                                                                      for s in g}) == 1))
        window = max(1, min(window, len(vals) // 4))
    return _level_finding("zero_variance_groups", steps, vals, window, max_fraction,
                          lambda late: f"{late:.0%} of groups late in the run give all their samples one reward "
                                       f"(no group-baseline signal)")


@DETECTORS.register("duplicate_completions")
def duplicate_completions(run: RunData, *, max_fraction: float = 0.75, window: int = 2) -> Finding | None:
    """Late in the run (the last `window` logged steps of samples.jsonl), the share of samples that repeat another
    sample of their group word for word (1 - distinct / G, averaged over groups) is >= max_fraction (the default:
    at most a quarter of a group's samples are distinct)."""
    steps, vals = group_series(run.samples, lambda g: 1 - len({str(s.get("completion", "")) for s in g}) / len(g))
    return _level_finding("duplicate_completions", steps, vals, window, max_fraction,
                          lambda late: f"{late:.0%} of the samples of a group repeat another one word for word")


@DETECTORS.register("constant_answer")
def constant_answer(run: RunData, *, max_share: float = 0.9, margin: float = 0.05) -> Finding | None:
    """At the last held-out evaluation, one answer went to >= max_share of the prompts (`heldout_top_answer_share`:
    the answer the scorer would read, however it is worded) and held-out accuracy is within `margin` of what the
    commonest reference answer, given to every prompt, would score (`heldout_constant_answer_accuracy`): the policy
    has collapsed onto one answer, and its accuracy measures the answers' distribution, not the task learned.
    Starts at the first evaluation past max_share."""
    steps, shares = series(run.evals, "heldout_top_answer_share")
    last = run.evals[-1] if run.evals else {}
    acc, const = last.get("heldout_accuracy"), last.get("heldout_constant_answer_accuracy")
    if not shares or shares[-1] < max_share or acc is None or const is None or acc > const + margin:
        return None
    start = next(s for s, v in zip(steps, shares) if v >= max_share)
    return Finding("constant_answer", start,
                   f"{shares[-1]:.0%} of the held-out prompts get one answer; accuracy {acc:.3f} against "
                   f"{const:.3f} for the commonest reference answer given to every prompt", shares[-1], max_share)
