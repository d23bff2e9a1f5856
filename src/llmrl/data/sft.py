"""Supervised fine-tuning data: JSONL of demonstrations, and worked answers made from a task.

A line is either `{"prompt": ..., "completion": ...}` or chat `{"messages": [..., {"role": "assistant", ...}]}`,
whose last message (the assistant's) is the completion and the messages before it the prompt:

    rows = read_sft(path)                        # [SftExample(prompt: str | messages, completion: str)]
    rows = worked_examples(task, 2000, seed=0)   # correct worked answers: "47 + 38 = 85\nAnswer: 85"
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmrl.data.jsonl import read_jsonl


@dataclass(frozen=True)
class SftExample:
    prompt: Any        # a user message (str) or the chat messages before the completion
    completion: str    # the assistant's answer: the only tokens the loss is on


def worked_answer(ex) -> str:
    """A correct worked answer to a task example in the task's answer format: the expression and its value when
    the example has one (arithmetic), then the `Answer: <value>` line the reward reads."""
    expr = ex.meta.get("expression")
    return (f"{expr} = {ex.answer}\n" if expr else "") + f"Answer: {ex.answer}"


def worked_examples(task, n: int, seed: int = 0) -> list[SftExample]:
    """The first n training prompts of `task` (its train_stream(seed)) with their worked answers."""
    return [SftExample(ex.prompt, worked_answer(ex)) for ex in itertools.islice(task.train_stream(seed), n)]


def parse_sft(row: dict, where: str) -> SftExample:
    """One JSONL object -> SftExample; a clear error naming `where` otherwise."""
    if "messages" in row:
        msgs = row["messages"]
        if not isinstance(msgs, list) or len(msgs) < 2 or msgs[-1].get("role") != "assistant":
            raise ValueError(f"{where}: 'messages' must be a list ending in an assistant message after the prompt")
        return SftExample(msgs[:-1], str(msgs[-1]["content"]))
    if not isinstance(row.get("prompt"), str) or not isinstance(row.get("completion"), str):
        raise ValueError(f"{where}: expected string 'prompt' and 'completion' keys, or 'messages'; got keys "
                         f"{sorted(row)}")
    return SftExample(row["prompt"], row["completion"])


def read_sft(path: str | Path) -> list[SftExample]:
    return read_jsonl(path, "sft data", parse_sft, empty="has no examples")


def write_sft(rows: list[SftExample], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        for r in rows:
            obj = {"messages": [*r.prompt, {"role": "assistant", "content": r.completion}]} \
                if isinstance(r.prompt, list) else {"prompt": r.prompt, "completion": r.completion}
            fh.write(json.dumps(obj) + "\n")
    return path
