"""Tasks: where prompts and reference answers come from, and how an extracted answer is checked.

Built-ins: `arithmetic`, `jsonl`, `reasoning_gym:<dataset>`. A task gives an endless, seeded training
stream and a fixed held-out set the stream can never produce: a problem is held out iff the first byte of
the SHA-256 of its text is 0 mod 10 (~10%, `_is_heldout`), so the split does not depend on the seed, the
held-out set is the same in every run (evaluations compare across runs), and the two never overlap.

    task = make_task("arithmetic", options={"digits": 3, "ops": ["+", "*"]})
    ex = next(task.train_stream(seed=0))   # Example(prompt="What is 123 * 456? ...", answer="56088", ...)
    ex.check("56088", ex)                  # -> 1.0
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import random
import re
from dataclasses import dataclass, field, fields
from decimal import Decimal
from pathlib import Path
from typing import Callable, Iterator, Protocol


from llmrl.data.jsonl import read_jsonl
from llmrl.registry import Registry

log = logging.getLogger("llmrl.data")

# ---------------------------------------------------------------- checking answers

_NUMBER = re.compile(r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|[-+]?\.\d+")
_TEXT = re.compile(r"[A-Za-z][A-Za-z .,'\-]*")  # a word answer ("Paris", "True", "B"): compared as text


def answer_key(answer) -> str:
    """An answer as the collapse counts and answer balancing compare them: white space collapsed, case folded
    (`Answer: Yes` and `answer:  yes` are one)."""
    return " ".join(str(answer).split()).casefold()


def _normalise(s: str) -> str:
    """`answer_key` after dropping surrounding `$` and a trailing full stop: how a text answer is checked."""
    return answer_key(s.strip().strip("$").strip().rstrip("."))


def _as_math(s: str) -> str:
    """math_verify.parse reads plain numbers, but reads other plain text loosely ("2x+1" -> 2); wrap it in $."""
    s = s.strip()
    return s if "$" in s or "\\boxed" in s or _NUMBER.fullmatch(s) else f"${s}$"


def math_check(pred: str, ex: "Example") -> float:
    """1.0 if `pred` (an extracted answer) equals `ex.answer` as text or as mathematics (math_verify), else 0.0.

    Word answers are compared as text only (as LaTeX, "Paris" is a product of symbols and equals "sirap").
    math_verify runs without its signal-based timeouts: safe off the main thread, but with no time limit.
    """
    gold = ex.answer
    if _normalise(pred) == _normalise(gold):
        return 1.0
    if _TEXT.fullmatch(gold.strip()):
        return 0.0
    numbers = [_normalise(x).lstrip("+").replace(",", "") for x in (pred, gold)]
    if all(_NUMBER.fullmatch(x) for x in numbers):      # two plain numbers: their values (no sympy import)
        return 1.0 if Decimal(numbers[0]) == Decimal(numbers[1]) else 0.0
    import math_verify          # imported here: ~40 MB of sympy and parsers that a numeric task never needs

    try:
        gold_parsed = math_verify.parse(_as_math(gold), parsing_timeout=None)
        pred_parsed = math_verify.parse(_as_math(pred), parsing_timeout=None)
        if not gold_parsed or not pred_parsed:
            return 0.0
        return 1.0 if math_verify.verify(gold_parsed, pred_parsed, timeout_seconds=None) else 0.0
    except Exception:  # math_verify failing on odd input is a wrong answer, not a crash
        return 0.0


def number_check(pred: str, ex: "Example") -> float:
    """`math_check` for a task that asks for a computed number: the answer must be a number itself, so
    restating the question ("141 + 365" for 506), which math_verify would evaluate and accept, scores 0."""
    if not _NUMBER.fullmatch(pred.strip().strip("$").strip().rstrip(".").strip()):
        return 0.0
    return math_check(pred, ex)


@dataclass(frozen=True)
class Example:
    prompt: str                 # the user message (the chat template is applied later, by the model side)
    answer: str                 # reference answer, as text
    meta: dict = field(default_factory=dict)   # task-specific data
    check: Callable[[str, "Example"], float] = math_check  # scores an *extracted* answer: 1.0 right, 0.0 wrong


def full_credit(score: float) -> float:
    """1.0 for a check's full credit, 0.0 for anything less: a check may give partial credit (reasoning-gym's
    len(reference)/len(answer) for an answer that contains the reference), which never counts as a pass."""
    return 1.0 if score >= 1.0 else 0.0


class Task(Protocol):
    name: str

    def train_stream(self, seed: int) -> Iterator[Example]: ...  # endless; the same for the same seed

    def heldout(self, n: int) -> list[Example]: ...  # the first n held-out; never produced by train_stream


# factory(*, seed, options, train_path, heldout_path) -> Task. The built-ins keep held-out sets fixed across
# seeds and take the stream's seed in `train_stream`, so they do not use the factory `seed`.
TASKS = Registry("task")
GYM_PREFIX = "reasoning_gym:"


def make_task(name: str, *, seed: int = 0, options: dict | None = None,
              train_path: str | None = None, heldout_path: str | None = None) -> Task:
    """Build a task by name; every configuration error is raised here, before any training."""
    options = dict(options or {})
    if name.startswith(GYM_PREFIX):
        _no_files(name, train_path, heldout_path)
        return ReasoningGymTask(name[len(GYM_PREFIX):], options)
    factory = TASKS.get(name)
    return factory(seed=seed, options=options, train_path=train_path, heldout_path=heldout_path)


def _is_heldout(text: str) -> bool:
    return hashlib.sha256(text.encode()).digest()[0] % 10 == 0


def _first_distinct(draws: Iterator[Example | None], n: int, budget: int, what: str) -> list[Example]:
    """The first `n` distinct (by prompt) examples among `budget` draws; None draws count but are skipped."""
    chosen: dict[str, Example] = {}
    for ex in itertools.takewhile(lambda _: len(chosen) < n, itertools.islice(draws, budget)):
        if ex is not None:
            chosen.setdefault(ex.prompt, ex)
    if len(chosen) < n:
        raise ValueError(f"{what}: asked for {n} held-out examples, found only {len(chosen)} distinct ones")
    return list(chosen.values())


def _no_files(name: str, train_path, heldout_path) -> None:
    if train_path or heldout_path:
        raise ValueError(f"task {name!r} generates its own data; do not give train_path/heldout_path")


def _take_options(task: str, options: dict, defaults: dict) -> dict:
    unknown = sorted(set(options) - set(defaults))
    if unknown:
        raise ValueError(f"task {task!r}: unknown option(s) {unknown}; valid: {sorted(defaults)}")
    return {**defaults, **options}


# ---------------------------------------------------------------- arithmetic

_OPS = ("+", "-", "*")
_ARITH_PROMPT = "What is {}? End your response with 'Answer: <number>'."


def _evaluate(nums: list[int], ops: list[str]) -> int:
    """Value of nums[0] ops[0] nums[1] ... with the usual precedence (* before + and -)."""
    total, sign, product = 0, 1, nums[0]
    for op, x in zip(ops, nums[1:]):
        if op == "*":
            product *= x
        else:
            total, sign, product = total + sign * product, (1 if op == "+" else -1), x
    return total + sign * product


class ArithmeticTask:
    """Integer expressions of `terms` operands with exactly `digits` digits each, joined by `ops`."""

    def __init__(self, *, digits: int = 2, ops: list[str] = ("+",), terms: int = 2):
        for key, value, least in (("digits", digits, 1), ("terms", terms, 2)):
            if type(value) is not int or value < least:
                raise ValueError(f"arithmetic: {key} must be an integer >= {least}, got {value!r}")
        if isinstance(ops, str) or not ops or any(op not in _OPS for op in ops):
            raise ValueError(f"arithmetic: ops must be a non-empty list drawn from {list(_OPS)}, got {ops!r}")
        self.name, self.ops, self.terms = "arithmetic", sorted(set(ops)), terms
        self.options = {"digits": digits, "ops": self.ops, "terms": terms}
        self.lo, self.hi = 10 ** (digits - 1), 10 ** digits - 1   # 1-digit operands are 1..9

    def _example(self, nums: list[int], ops: list[str]) -> Example:
        expr = " ".join(itertools.chain.from_iterable(zip(map(str, nums), ops))) + f" {nums[-1]}"
        return Example(_ARITH_PROMPT.format(expr), str(_evaluate(nums, ops)), {"expression": expr}, check=number_check)

    def _examples(self, seed, split: str) -> Iterator[Example | None]:
        """Random problems: an Example if it falls in `split`, else None."""
        rng = random.Random(seed)
        while True:
            nums = [rng.randint(self.lo, self.hi) for _ in range(self.terms)]
            ex = self._example(nums, [rng.choice(self.ops) for _ in range(self.terms - 1)])
            yield ex if _is_heldout(ex.meta["expression"]) == (split == "heldout") else None

    def train_stream(self, seed: int) -> Iterator[Example]:
        return (ex for ex in self._examples(seed, "train") if ex is not None)

    def heldout(self, n: int) -> list[Example]:
        return _first_distinct(self._examples("arithmetic-heldout", "heldout"), n, 10_000 + 100 * n,
                               f"arithmetic with {self.options}")


@TASKS.register("arithmetic")
def _arithmetic(*, seed: int, options: dict, train_path: str | None, heldout_path: str | None) -> Task:
    _no_files("arithmetic", train_path, heldout_path)
    return ArithmeticTask(**_take_options("arithmetic", options, {"digits": 2, "ops": ["+"], "terms": 2}))


# ---------------------------------------------------------------- jsonl

def _read_jsonl(path: str) -> list[Example]:
    """Examples from a file of {"prompt": ..., "answer": ...} lines (other keys go to meta)."""
    return read_jsonl(path, "jsonl task", _example, empty="has no examples")


def _example(row, where: str) -> Example:
    for key in ("prompt", "answer"):
        if not isinstance(row, dict) or key not in row:
            raise ValueError(f"{where}: missing key {key!r} (each line must be a JSON object)")
    if not isinstance(row["prompt"], str):
        raise ValueError(f"{where}: 'prompt' must be a string")
    return Example(row.pop("prompt"), str(row.pop("answer")), row)


class JsonlTask:
    """Examples from files; without a held-out file, ~10% of the train file's prompts (by hash) are held out."""

    def __init__(self, train_path: str | None, heldout_path: str | None = None):
        if train_path is None:
            raise ValueError("jsonl task needs train_path (a file of {\"prompt\": ..., \"answer\": ...} lines)")
        self.name = "jsonl"
        examples = _read_jsonl(train_path)
        if heldout_path is None:
            self.train = [ex for ex in examples if not _is_heldout(ex.prompt)]
            self.held = [ex for ex in examples if _is_heldout(ex.prompt)]
        else:
            self.held = _read_jsonl(heldout_path)
            held_prompts = {ex.prompt for ex in self.held}
            self.train = [ex for ex in examples if ex.prompt not in held_prompts]
            if len(self.train) < len(examples):
                log.warning("jsonl task: dropped %d train examples whose prompt is in %s",
                            len(examples) - len(self.train), heldout_path)
        if not self.train:
            raise ValueError(f"jsonl task: no training examples left in {train_path} after holding out")

    def train_stream(self, seed: int) -> Iterator[Example]:
        rng = random.Random(seed)
        while True:  # shuffled epochs
            yield from rng.sample(self.train, len(self.train))

    def heldout(self, n: int) -> list[Example]:
        return _first_distinct(iter(self.held), n, len(self.held), "jsonl task")


@TASKS.register("jsonl")
def _jsonl(*, seed: int, options: dict, train_path: str | None, heldout_path: str | None) -> Task:
    _take_options("jsonl", options, {})
    return JsonlTask(train_path, heldout_path)


# ---------------------------------------------------------------- reasoning-gym

_GYM_CHUNK = 1000  # items per generated reasoning-gym dataset; the stream moves to a fresh seed after each


def _seed_of(*parts) -> int:
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:4], "little")


@dataclass(frozen=True)
class _GymCheck:  # the dataset's own scorer, picklable (unlike a lambda)
    dataset: object

    def __call__(self, pred: str, ex: Example) -> float:
        return float(self.dataset.score_answer(answer=pred, entry=ex.meta["entry"]))


class ReasoningGymTask:
    """Any reasoning-gym dataset; `options` are its config fields (e.g. min_terms for basic_arithmetic)."""

    def __init__(self, dataset: str, options: dict):
        from reasoning_gym.factory import DATASETS as registered, create_dataset  # slow to import: only when used
        if dataset not in registered:
            raise ValueError(
                f"unknown reasoning-gym dataset {dataset!r}; e.g. {', '.join(sorted(registered)[:6])}; list all with "
                "python -c 'import reasoning_gym; print(sorted(reasoning_gym.factory.DATASETS))'")
        valid = sorted(f.name for f in fields(registered[dataset][1]) if f.name not in ("seed", "size"))
        unknown = sorted(set(options) - set(valid))
        if unknown:
            raise ValueError(f"task {GYM_PREFIX}{dataset}: unknown option(s) {unknown}; valid: {valid}")
        self.name, self.dataset, self.options, self._create = GYM_PREFIX + dataset, dataset, options, create_dataset
        self._checker = _GymCheck(self._chunk(_seed_of("check")))  # also validates the option values

    def _chunk(self, seed: int):
        try:
            return self._create(self.dataset, size=_GYM_CHUNK, seed=seed, **self.options)
        except (TypeError, AssertionError, ValueError) as e:
            raise ValueError(f"task {self.name}: bad options {self.options}: {e}") from e

    def _examples(self, split: str, seed: int) -> Iterator[Example | None]:
        """Successive chunks seeded from (`split`, `seed`): an Example if its question is in `split`, else None."""
        for k in itertools.count():
            for entry in self._chunk(_seed_of(split, seed, k)):
                if _is_heldout(entry["question"]) != (split == "heldout"):
                    yield None
                    continue
                prompt = entry["question"] + "\nEnd your response with 'Answer: <answer>'."
                yield Example(prompt, str(entry["answer"]), {"entry": entry}, self._checker)

    def train_stream(self, seed: int) -> Iterator[Example]:
        return (ex for ex in self._examples("train", seed) if ex is not None)

    def heldout(self, n: int) -> list[Example]:
        return _first_distinct(self._examples("heldout", 0), n, 20 * _GYM_CHUNK + 20 * n, f"task {self.name}")
