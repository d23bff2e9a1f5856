"""Step-labelled responses on disk, for process reward models (`llmrl prm`), one JSON a line:

    {"prompt": "What is 12 + 34?", "steps": ["12 + 34 = 46\\n\\n", "Answer: 46"], "labels": [1, 0.75]}

Steps are consecutive pieces of the response, separators included ("".join(steps) is the response); a label is 0,
1 or a probability. Labels are built without raters by `llmrl.train.prm.build_step_labels` (`llmrl prm-data`).
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

from llmrl.data.jsonl import read_jsonl
from llmrl.data.pairs import split_heldout


def _check_row(row, where: str) -> dict:
    if not isinstance(row, dict):
        raise ValueError(f"{where}: each line must be a JSON object with prompt, steps, labels")
    for key in ("prompt", "steps", "labels"):
        if key not in row:
            raise ValueError(f"{where}: missing key {key!r} (need prompt, steps, labels)")
    steps, labels = row["steps"], row["labels"]
    if not isinstance(row["prompt"], str):
        raise ValueError(f"{where}: 'prompt' must be a string, got {type(row['prompt']).__name__}")
    if not isinstance(steps, list) or not steps or not all(isinstance(s, str) and s for s in steps):
        raise ValueError(f"{where}: 'steps' must be a non-empty list of non-empty strings")
    if not isinstance(labels, list) or len(labels) != len(steps):
        n = len(labels) if isinstance(labels, list) else type(labels).__name__
        raise ValueError(f"{where}: 'steps' and 'labels' lengths differ ({len(steps)} steps, labels: {n})")
    for i, y in enumerate(labels):
        if isinstance(y, bool) or not isinstance(y, (int, float)) or not 0 <= y <= 1:
            raise ValueError(f"{where}: labels[{i}] must be 0, 1 or a probability in [0, 1], got {y!r}")
    return row


def load_step_labels(path: str | Path) -> list[dict]:
    """Step-labelled responses from a JSONL file (format in the module docstring); every error names file:line."""
    return read_jsonl(path, "step labels", _check_row)


def save_step_labels(rows: list[dict], path: str | Path) -> Path:
    """Write step-labelled responses as JSONL (`load_step_labels` reads them back equal)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as fh:
        for row in rows:
            first = {k: row[k] for k in ("prompt", "steps", "labels")}
            fh.write(json.dumps(first | row) + "\n")
    return path


def split_by_prompt(rows: list[dict], fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """(train, held-out) as `split_heldout` splits pairs: a random `fraction` of the prompts is held out whole."""
    train, held = split_heldout([SimpleNamespace(prompt=r["prompt"], row=r) for r in rows], fraction, seed)
    return [x.row for x in train], [x.row for x in held]
