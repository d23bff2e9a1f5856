"""Preference pairs on disk: one JSON object a line, each with `prompt`, `chosen` and `rejected` (other keys are kept
in `meta`), and the split of held-out prompts.

    {"prompt": "What is 2 + 2?", "chosen": "4", "rejected": "5"}                                  plain text
    {"prompt": [{"role": "user", "content": "What is 2 + 2?"}],                                   chat messages
     "chosen": [{"role": "assistant", "content": "4"}], "rejected": [{"role": "assistant", "content": "5"}]}

A text prompt is one user message. A chat prompt is the conversation so far; a chat response is the assistant's
continuation: exactly one assistant message (its content is what the policy is scored on). Pairs are built from a
task by sampling the policy in `llmrl.train.pairs.build_pairs_from_task` (`llmrl pairs`).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path

from llmrl.data.jsonl import read_jsonl

Messages = list[dict]


@dataclass(frozen=True)
class PreferencePair:
    prompt: str | Messages       # a user message, or the conversation so far
    chosen: str | Messages       # the preferred response (text, or one assistant message)
    rejected: str | Messages     # the dispreferred response
    meta: dict = field(default_factory=dict)   # provenance (e.g. the task's answer and the two scores)


def _check_messages(value, key: str, where: str, *, response: bool) -> None:
    if not isinstance(value, list) or not value:
        raise ValueError(f"{where}: {key!r} must be a string or a non-empty list of {{role, content}} messages")
    for i, m in enumerate(value):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise ValueError(f"{where}: {key}[{i}] must be a message {{\"role\": str, \"content\": str}}, got {m!r}")
    if response and (len(value) != 1 or value[0]["role"] != "assistant"):
        raise ValueError(f"{where}: {key!r} as messages must be exactly one assistant message, "
                         f"got roles {[m['role'] for m in value]}")


def _pair(row, where: str) -> PreferencePair:
    if not isinstance(row, dict):
        raise ValueError(f"{where}: each line must be a JSON object with prompt, chosen, rejected")
    for key in ("prompt", "chosen", "rejected"):
        if key not in row:
            raise ValueError(f"{where}: missing key {key!r} (need prompt, chosen, rejected)")
        if not isinstance(row[key], str):
            _check_messages(row[key], key, where, response=key != "prompt")
    return PreferencePair(row.pop("prompt"), row.pop("chosen"), row.pop("rejected"), row)


def load_pairs(path: str | Path) -> list[PreferencePair]:
    """Pairs from a JSONL file (format in the module docstring); every error names file:line."""
    return read_jsonl(path, "preference pairs", _pair)


def save_pairs(pairs: list[PreferencePair], path: str | Path) -> Path:
    """Write pairs as JSONL (`load_pairs` reads them back equal)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as fh:
        for p in pairs:
            fh.write(json.dumps({**p.meta, "prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected}) + "\n")
    return path


def split_heldout(pairs: list, fraction: float, seed: int) -> tuple[list, list]:
    """(train, held-out): hold out the items of a random `fraction` of the distinct prompts (at least one prompt
    when fraction > 0 and there are two or more), so no held-out prompt is ever trained on. Items are anything with
    a `prompt` (pairs here)."""
    prompts = sorted({json.dumps(p.prompt, sort_keys=True) for p in pairs})
    random.Random(seed).shuffle(prompts)
    n_held = 0 if fraction <= 0 or len(prompts) < 2 else max(1, round(fraction * len(prompts)))
    held = set(prompts[:n_held])
    is_held = [json.dumps(p.prompt, sort_keys=True) in held for p in pairs]
    return [p for p, h in zip(pairs, is_held) if not h], [p for p, h in zip(pairs, is_held) if h]
