"""GSM8K (Cobbe et al. 2021, MIT licence: `gsm8k/LICENSE`), shipped with llmrl as package data in `gsm8k/`:
`train.jsonl` (7,473 problems) and `test.jsonl` (1,319), each line {"question": ..., "answer": ...} where the
answer is a worked solution ending in `#### <number>`.

    problems = read_gsm8k("test")          # [Example(prompt=question + instruction, answer="18", ...)]
    task = make_task("gsm8k")              # the training task: train split streamed, test split held out
    final_answer("... #### 1,200")         # -> "1200"

Each Example's `answer` is the number after `####` (commas removed); the worked solution is `meta["solution"]`
and the bare question `meta["question"]`. Checked with `math_check` (plain numbers by value, else math-verify).
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

from llmrl.data.jsonl import read_jsonl
from llmrl.data.tasks import Example, math_check

INSTRUCTION = "\nEnd your response with 'Answer: <number>'."
SPLITS = ("train", "test")
HOW_TO_GET = ("GSM8K ships inside llmrl (src/llmrl/data/gsm8k/); a broken install lacks it: reinstall llmrl "
              "(bash scripts/setup.sh), or put the openai/grade-school-math jsonl files there")


def data_path(split: str) -> Path:
    if split not in SPLITS:
        raise ValueError(f"gsm8k: split must be one of {list(SPLITS)}, got {split!r}")
    return Path(str(files("llmrl.data") / "gsm8k" / f"{split}.jsonl"))


def final_answer(solution: str) -> str:
    """The number after the last `####` of a GSM8K solution, commas removed."""
    if "####" not in solution:
        raise ValueError(f"gsm8k: a solution without '####': {solution[-80:]!r}")
    return solution.rsplit("####", 1)[1].strip().replace(",", "")


def read_gsm8k(split: str) -> list[Example]:
    """The split's problems as Examples, in file order; a missing file names its path and how to get it."""
    path = data_path(split)
    if not path.is_file():
        raise FileNotFoundError(f"gsm8k {split} data not found at {path}; {HOW_TO_GET}")

    def parse(row: dict, where: str) -> Example:
        try:
            question, solution = row["question"], row["answer"]
        except KeyError as e:
            raise ValueError(f"{where}: missing key {e}") from None
        meta = {"question": question, "solution": solution, "index": int(where.rsplit(":", 1)[1]) - 1}
        return Example(question + INSTRUCTION, final_answer(solution), meta, math_check)

    return read_jsonl(path, f"gsm8k {split}", parse)


class GSM8KTask:
    """GSM8K as a training task: the stream is the train split in shuffled epochs, the held-out set the first n
    problems of the test split (the `gsm8k` eval suite's problems, which the stream never produces)."""

    def __init__(self):
        self.name, self.options = "gsm8k", {}
        self.train, self.test = read_gsm8k("train"), read_gsm8k("test")

    def train_stream(self, seed: int):
        import random

        rng = random.Random(seed)
        while True:
            yield from rng.sample(self.train, len(self.train))

    def heldout(self, n: int) -> list[Example]:
        if not 1 <= n <= len(self.test):
            raise ValueError(f"gsm8k: heldout_size must be 1..{len(self.test)}, got {n}")
        return self.test[:n]


def _register():
    from llmrl.data.tasks import TASKS, _no_files, _take_options

    @TASKS.register("gsm8k")
    def _gsm8k(*, seed: int, options: dict, train_path: str | None, heldout_path: str | None):
        _no_files("gsm8k", train_path, heldout_path)
        _take_options("gsm8k", options, {})
        return GSM8KTask()


_register()
