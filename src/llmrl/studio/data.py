"""What the studio shows and labels, read from run folders and `llmrl pairs` files.

    runs = [load_run_folder(p) for p in paths]
    pair_items(runs, pair_files)      # two completions of a prompt to choose between
    step_items(runs, pair_files)      # a response split into reasoning steps by `llmrl.credit.steps`
    filter_samples(run.samples, SampleFilter(step=10, min_reward=0.5))

Every item has an idempotency key made from its content alone (prompt and texts, not where it was found), so the
same two completions are one item however often they appear, and a label is never written twice for it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from llmrl.credit.steps import segment_steps
from llmrl.report.html import read_jsonl


@dataclass(frozen=True)
class RunFolder:
    name: str
    path: Path
    train: list[dict]              # "kind": "train" lines of metrics.jsonl
    evals: list[dict]              # "kind": "eval" lines
    samples: list[dict]            # samples.jsonl: sampled completions with per-token advantages
    heldout: list[dict]            # heldout_samples.jsonl: greedy held-out answers at each evaluation
    metrics: list[dict] = field(default_factory=list)   # every line of metrics.jsonl (for the curves)


@dataclass(frozen=True)
class PairItem:
    key: str                       # "pair:<hash of prompt and the two texts, order-free>"
    prompt: str | list             # text, or chat messages
    a: str | list                  # shown left (a response text, or one assistant message)
    b: str | list                  # shown right
    source: str                    # where it came from, for the labeller and the written line


@dataclass(frozen=True)
class StepItem:
    key: str                       # "steps:<hash of prompt, response and segmenter>"
    prompt: str
    steps: list[str]               # consecutive pieces of the response: "".join(steps) is the response
    source: str


def _rows(path: Path) -> list[dict]:
    return read_jsonl(path)[0] if path.is_file() else []


def load_run_folder(path: str | Path) -> RunFolder:
    """A run folder written by `llmrl train` (metrics.jsonl required; samples and held-out answers optional)."""
    path = Path(path)
    if not (path / "metrics.jsonl").is_file():
        raise FileNotFoundError(f"{path} has no metrics.jsonl: not a run folder written by `llmrl train`")
    metrics = _rows(path / "metrics.jsonl")
    return RunFolder(name=path.name, path=path, metrics=metrics,
                     train=[r for r in metrics if r.get("kind", "train") == "train"],
                     evals=[r for r in metrics if r.get("kind") == "eval"],
                     samples=_rows(path / "samples.jsonl"), heldout=_rows(path / "heldout_samples.jsonl"))


def text_of(value) -> str:
    """A prompt or response as text: a string as is, chat messages as `role: content` lines."""
    if isinstance(value, list):
        return "\n".join(f"{m.get('role', '?')}: {m.get('content', '')}" if isinstance(m, dict) else str(m)
                         for m in value)
    return "" if value is None else str(value)


def response_text(value) -> str:
    """A response as text: one assistant message's content, or the text."""
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], dict):
        return str(value[0].get("content", ""))
    return text_of(value)


def _digest(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, ensure_ascii=False, sort_keys=True).encode()).hexdigest()[:24]


def make_pair(prompt, x, y, source: str) -> PairItem:
    """A pair item; which text is A is fixed by the key, so every tab and every restart shows the same sides."""
    key = "pair:" + _digest(prompt, sorted([json.dumps(x, sort_keys=True), json.dumps(y, sort_keys=True)]))
    a, b = (x, y) if int(key[-1], 16) % 2 == 0 else (y, x)
    return PairItem(key, prompt, a, b, source)


def groups_of(samples: list[dict]) -> dict[tuple[int, int], list[dict]]:
    """(step, group) -> the rows of that group, in file order."""
    out: dict[tuple[int, int], list[dict]] = {}
    for s in samples:
        out.setdefault((_int(s.get("step")), _int(s.get("group"))), []).append(s)
    return out


def _int(v) -> int:
    return int(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else -1


def _reward(s: dict) -> float:
    r = s.get("reward")
    return float(r) if isinstance(r, (int, float)) else 0.0


def run_pairs(run: RunFolder, per_group: int = 2) -> list[PairItem]:
    """Up to `per_group` pairs of distinct completions per logged group: best vs worst reward, then the next."""
    out = []
    for (step, group), rows in sorted(groups_of(run.samples).items()):
        distinct = list({str(s.get("completion", "")): s for s in sorted(rows, key=_reward, reverse=True)}.values())
        for i in range(min(per_group, len(distinct) // 2)):
            hi, lo = distinct[i], distinct[-1 - i]
            out.append(make_pair(hi.get("prompt", ""), str(hi.get("completion", "")), str(lo.get("completion", "")),
                                 f"{run.name} step {step} group {group}"))
    return out


def file_pairs(path: Path) -> list[PairItem]:
    """The candidates of an `llmrl pairs` file (or any pairs JSONL), each shown as an unlabelled A/B pair."""
    from llmrl.data.pairs import load_pairs

    return [make_pair(p.prompt, p.chosen, p.rejected, f"{path.name} line {i}")
            for i, p in enumerate(load_pairs(path), 1)]


def pair_items(runs: list[RunFolder], pair_files: list[Path], per_group: int = 2) -> list[PairItem]:
    """Every pair to label, in a fixed order (runs, then files), each key once."""
    items = [p for run in runs for p in run_pairs(run, per_group)] + [p for f in pair_files for p in file_pairs(f)]
    return list({p.key: p for p in reversed(items)}.values())[::-1]


def split_steps(tokens: list[str], mask: list[int], mode: str, pattern: str | None = None) -> list[str]:
    """Token texts -> step texts with the step segmenter; tokens in no step (tool outputs) stay with the step
    before them (or the first one), so "".join(steps) == "".join(tokens)."""
    ids = segment_steps(tokens, mask, mode=mode, pattern=pattern)
    steps: list[str] = []
    current = None
    for tok, sid in zip(tokens, ids):
        if sid >= 0 and sid != current:
            current = sid
            steps.append("")
        if not steps:
            steps.append("")
        steps[-1] += tok
    return [s for s in steps if s] if any(steps) else []


def _step_item(prompt, tokens: list[str], mask: list[int], mode: str, pattern: str | None, source: str):
    if not isinstance(prompt, str) or not "".join(tokens).strip():
        return None
    steps = split_steps(tokens, mask, mode, pattern)
    if not steps:
        return None
    return StepItem("steps:" + _digest(prompt, "".join(tokens), mode, pattern), prompt, steps, source)


def step_items(runs: list[RunFolder], pair_files: list[Path], mode: str = "blank_line",
               pattern: str | None = None) -> list[StepItem]:
    """Every response to label step by step: run samples (their logged tokens), then both responses of each pair
    in `pair_files` (split by character). Chat-message prompts are skipped (the PRM data takes text prompts)."""
    items = []
    for run in runs:
        for (step, group), rows in sorted(groups_of(run.samples).items()):
            for i, s in enumerate(rows):
                toks = s.get("tokens") if isinstance(s.get("tokens"), list) else list(str(s.get("completion", "")))
                toks = [str(t) for t in toks]
                mask = s.get("response_mask") if isinstance(s.get("response_mask"), list) else [1] * len(toks)
                mask = [int(m) for m in mask[:len(toks)]] + [1] * (len(toks) - len(mask))
                items.append(_step_item(s.get("prompt"), toks, mask, mode, pattern,
                                        f"{run.name} step {step} group {group} sample {i}"))
    for path in pair_files:
        for pair in file_pairs(path):
            for text in map(response_text, (pair.a, pair.b)):
                items.append(_step_item(pair.prompt, list(text), [1] * len(text), mode, pattern, pair.source))
    return list({it.key: it for it in reversed([i for i in items if i is not None])}.values())[::-1]


# ----------------------------------------------------------------------------- the rollout browser's filters

@dataclass(frozen=True)
class SampleFilter:
    step: int | None = None
    min_reward: float | None = None
    max_reward: float | None = None
    component: str | None = None          # a reward component's name ...
    min_component: float | None = None    # ... and its range
    max_component: float | None = None
    min_length: int | None = None         # response tokens the policy chose
    max_length: int | None = None
    truncated: bool | None = None         # cut at max_new_tokens (None: either)


def sample_length(s: dict) -> int:
    """Tokens the policy chose (mask 1) in a logged sample; the token count when there is no mask."""
    toks = s.get("tokens") if isinstance(s.get("tokens"), list) else []
    mask = s.get("response_mask") if isinstance(s.get("response_mask"), list) else [1] * len(toks)
    return sum(1 for m in mask[:len(toks)] if m) + max(0, len(toks) - len(mask))


def _within(v, lo, hi) -> bool:
    return v is not None and (lo is None or v >= lo) and (hi is None or v <= hi)


def keep_sample(s: dict, f: SampleFilter) -> bool:
    comps = s.get("reward_components") if isinstance(s.get("reward_components"), dict) else {}
    comp = comps.get(f.component) if f.component else None
    return ((f.step is None or _int(s.get("step")) == f.step)
            and (f.min_reward is None and f.max_reward is None or _within(s.get("reward"), f.min_reward, f.max_reward))
            and (not f.component or _within(comp, f.min_component, f.max_component))
            and _within(sample_length(s), f.min_length, f.max_length)
            and (f.truncated is None or s.get("truncated") is f.truncated))


def filter_samples(samples: list[dict], f: SampleFilter) -> dict[tuple[int, int], list[dict]]:
    """(step, group) -> the group's samples that pass `f`, groups with none left out; latest step first."""
    groups = groups_of([s for s in samples if keep_sample(s, f)])
    return dict(sorted(groups.items(), key=lambda kv: (-kv[0][0], kv[0][1])))
