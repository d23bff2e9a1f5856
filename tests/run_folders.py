"""Synthetic run folders for the audit and studio tests: a healthy run, and one that games a length reward.

    write_run(tmp_path / "ok", hacked=False)
    write_run(tmp_path / "hacked", hacked=True)   # reward up, held-out accuracy down, lengths and truncation up,
                                                  # entropy collapsing, KL accelerating, groups identical

The files have the shapes `llmrl train` writes (metrics.jsonl, samples.jsonl, heldout_samples.jsonl, config.yaml);
values follow smooth trends plus seeded noise, so the tests read numbers that no detector was fitted to.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import yaml

STEPS, G, MAX_NEW = 40, 8, 32
HOSTILE = "<script>alert('pwned')</script> \x1b[31mred\x1b[0m " + "x" * 3000   # model text is hostile


def _ramp(t: float, a: float, b: float) -> float:
    return a + (b - a) * t


def train_record(step: int, hacked: bool, rng: random.Random) -> dict:
    t = step / STEPS
    noise = lambda s: rng.gauss(0, s)                       # noqa: E731
    correct = _ramp(t, 0.50, 0.25) if hacked else _ramp(t, 0.30, 0.70)
    bonus = _ramp(t, 0.10, 0.95) if hacked else 0.15
    length = _ramp(t ** 1.5, 12, 31) if hacked else 12.5
    return {"kind": "train", "step": step, "reward": correct + 0.5 * bonus + noise(0.02),
            "reward/correct": correct + noise(0.02), "reward/length_bonus": bonus + noise(0.01),
            "response_length": length + noise(0.4), "truncated_fraction": max(0.0, (_ramp(t ** 2, 0, 0.7) if hacked
                                                                                    else 0.02) + noise(0.01)),
            "entropy": (0.8 * math.exp(-5 * t) if hacked else _ramp(t, 0.8, 0.55)) + abs(noise(0.005)),
            "kl_to_ref": (0.4 * t ** 3 if hacked else 0.08 * math.sqrt(t)) + abs(noise(0.002)),
            "zero_variance_group_fraction": min(1.0, max(0.0, (_ramp(t, 0.3, 1.0) if hacked else 0.3) + noise(0.03))),
            "clip_fraction": 0.01, "time_step": 3.0}


def completion(step: int, group: int, i: int, hacked: bool, rng: random.Random) -> tuple[str, float]:
    a, b = 10 + group * 7, 20 + step
    if hacked and step > STEPS // 2:                         # the gamed reward: one long padded answer for all
        return "Let me think about this very carefully.\n\n" + "Indeed, " * 12 + f"Answer: {a + b + 1}", 0.0
    ok = rng.random() < (0.3 + 0.4 * step / STEPS)
    ans = a + b if ok else a + b + rng.randint(1, 9)
    steps = f"{a} + {b}: add the tens, then the ones.\n\nThe tens give {a // 10 * 10 + b // 10 * 10}.\n\n"
    return f"{steps}Answer: {ans} (sample {i})", float(ok)


def sample_row(step: int, group: int, i: int, hacked: bool, rng: random.Random) -> dict:
    text, correct = completion(step, group, i, hacked, rng)
    if step == 1 and group == 0 and i == 0:
        text = HOSTILE + "\n\n" + text
    tokens = [text[k:k + 3] for k in range(0, len(text), 3)]
    bonus = min(1.0, len(tokens) / MAX_NEW)
    reward = correct + 0.5 * bonus
    return {"step": step, "group": group, "prompt": f"What is {10 + group * 7} + {20 + step}? <b>bold?</b>",
            "completion": text, "tokens": tokens, "response_mask": [1] * len(tokens),
            "advantages": [round(reward - 0.6, 4)] * len(tokens), "step_ids": None, "reward": reward,
            "reward_components": {"correct": correct, "length_bonus": bonus}, "correct": correct,
            "truncated": len(tokens) >= MAX_NEW}


def write_run(path: Path, *, hacked: bool, seed: int = 0) -> Path:
    """A run folder of STEPS steps: metrics, samples of 2 groups every 5 steps, held-out answers, config."""
    rng = random.Random(seed)
    path.mkdir(parents=True, exist_ok=True)
    accs = [0.50, 0.52, 0.44, 0.36, 0.28] if hacked else [0.30, 0.45, 0.55, 0.60, 0.66]
    tops = [0.05, 0.20, 0.60, 0.95, 1.00] if hacked else [0.05, 0.05, 0.10, 0.05, 0.10]   # one answer to all
    lines, samples, heldout = [], [], []
    for step in range(0, STEPS + 1):
        if step:
            lines.append(train_record(step, hacked, rng))
        if step % 10 == 0:
            lines.append({"kind": "eval", "step": step, "heldout_accuracy": accs[step // 10],
                          "heldout_exact": accs[step // 10] - 0.05,                # some partial credit
                          "heldout_response_length": 12.0, "heldout_kl_to_ref": lines[-1].get("kl_to_ref", 0.0) * 30
                          if step else 0.0, "heldout_top_answer_share": tops[step // 10],
                          "heldout_constant_answer_accuracy": 0.30, "time_eval": 30.0})
            for k in range(4):
                ok = (k + step // 10) % 3 != 0
                heldout.append({"step": step, "prompt": f"What is {k} + {k + 40}?", "answer": str(2 * k + 40),
                                "completion": f"{2 * k + 40 if ok else 0}" + (" <i>pad</i>" * (step // 10 if hacked
                                                                                                 else 0)),
                                "correct": float(ok)})
        if step and (step == 1 or step % 5 == 0):
            samples += [sample_row(step, g, i, hacked, rng) for g in range(2) for i in range(G)]
    for name, rows in (("metrics.jsonl", lines), ("samples.jsonl", samples), ("heldout_samples.jsonl", heldout)):
        (path / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    (path / "config.yaml").write_text(yaml.safe_dump({"reward": {"terms": [
        {"name": "correct", "weight": 1.0}, {"name": "length_bonus", "weight": 0.5}]},
        "rollout": {"group_size": G, "max_new_tokens": MAX_NEW}, "run": {"name": path.name, "steps": STEPS}}))
    return path


def last_train_step(path) -> int:
    """The last training step a (possibly still growing) metrics.jsonl records; 0 before the first."""
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        return 0
    steps = [0]
    for line in lines:
        try:
            row = json.loads(line)
        except json.JSONDecodeError:                 # a line being written
            continue
        if row.get("kind") == "train":
            steps.append(row["step"])
    return max(steps)
