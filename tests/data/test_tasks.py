"""Tasks: determinism, option validation, disjoint train/held-out splits, answer checking, input errors."""

import itertools
import json
import re

import pytest

from llmrl.data import TASKS, Example, make_task, math_check


def take(task, n, seed=0):
    return list(itertools.islice(task.train_stream(seed), n))


# ---------------------------------------------------------------- math_check

@pytest.mark.parametrize("gold, pred, expected", [
    ("57", "57", 1.0), ("57", "57.0", 1.0), ("57", "$57$", 1.0), ("57", "\\boxed{57}", 1.0),
    ("-4", "-4", 1.0), ("-4", "- 4", 1.0), ("0.5", "\\frac{1}{2}", 1.0), ("1000", "1,000", 1.0),
    ("57", "58", 0.0), ("-4", "4", 0.0), ("57", "57.5", 0.0), ("57", "", 0.0), ("57", "fifty", 0.0),
    ("2x+1", "2", 0.0),        # plain math_verify.parse would read the gold "2x+1" as 2
    ("Paris", "paris", 1.0), ("Paris", "sirap", 0.0),   # as LaTeX both would be the product p*a*r*i*s
])
def test_math_check(gold, pred, expected):
    assert math_check(pred, Example("q", gold)) == expected


def test_numbers_are_compared_without_math_verify(monkeypatch):
    """Two plain numbers are compared as values; math_verify (sympy) is imported only for anything else."""
    import sys

    monkeypatch.setitem(sys.modules, "math_verify", None)        # an import of it would now raise
    for gold, pred, want in [("57", "57.0", 1.0), ("1000", "1,000", 1.0), ("-4", "+4", 0.0), ("0.5", ".5", 1.0),
                             ("12", "12.01", 0.0)]:
        assert math_check(pred, Example("q", gold)) == want
    with pytest.raises(ImportError):
        math_check("\\frac{1}{2}", Example("q", "0.5"))


# ---------------------------------------------------------------- arithmetic

def test_arithmetic_is_deterministic_per_seed():
    task = make_task("arithmetic")
    assert take(task, 50, seed=1) == take(task, 50, seed=1)
    assert take(task, 50, seed=1) != take(task, 50, seed=2)
    assert task.heldout(20) == make_task("arithmetic", seed=5).heldout(20)
    assert task.heldout(10) == task.heldout(20)[:10]


@pytest.mark.parametrize("digits", [1, 2, 4])
def test_arithmetic_operands_have_exactly_digits_digits(digits):
    for ex in take(make_task("arithmetic", options={"digits": digits, "terms": 3}), 200):
        operands = re.findall(r"\d+", ex.meta["expression"])
        assert len(operands) == 3 and all(len(x) == digits for x in operands)


def test_arithmetic_ops_and_answers():
    examples = take(make_task("arithmetic", options={"ops": ["-", "*"], "terms": 3}), 300)
    used = {op for ex in examples for op in re.findall(r" ([-+*]) ", ex.meta["expression"])}
    assert used == {"-", "*"}
    for ex in examples:
        assert ex.answer == str(eval(ex.meta["expression"]))   # Python's precedence is the reference
        assert ex.prompt == f"What is {ex.meta['expression']}? End your response with 'Answer: <number>'."
        assert ex.check(ex.answer, ex) == 1.0 and ex.check(str(int(ex.answer) + 1), ex) == 0.0


def test_arithmetic_answer_must_be_the_number_not_the_question_restated():
    ex = make_task("arithmetic", seed=0, options={"digits": 3, "ops": ["+", "*"]}).heldout(1)[0]
    assert ex.check(ex.answer, ex) == 1.0 and ex.check(f"{int(ex.answer):,}.", ex) == 1.0
    assert ex.check(ex.meta["expression"], ex) == 0.0          # math_verify alone evaluates it and says equal
    assert ex.check(f"{ex.meta['expression']} = {ex.answer}", ex) == 0.0


def test_arithmetic_train_never_produces_heldout():
    task = make_task("arithmetic")   # 2-digit a + b: 8,100 problems, so 5,000 draws cover most of them
    held = {ex.prompt for ex in task.heldout(200)}
    assert len(held) == 200
    assert not held & {ex.prompt for ex in take(task, 5000)}


def test_arithmetic_heldout_larger_than_the_space_is_an_error():
    task = make_task("arithmetic", options={"digits": 1})
    with pytest.raises(ValueError, match="asked for 100 held-out examples, found only"):
        task.heldout(100)


@pytest.mark.parametrize("options, message", [
    ({"digit": 3}, r"unknown option\(s\) \['digit'\]; valid: \['digits', 'ops', 'terms'\]"),
    ({"ops": ["/"]}, "ops must be a non-empty list"),
    ({"ops": "+"}, "ops must be a non-empty list"),
    ({"digits": 0}, "digits must be an integer >= 1"),
    ({"terms": 1}, "terms must be an integer >= 2"),
])
def test_arithmetic_bad_options(options, message):
    with pytest.raises(ValueError, match=message):
        make_task("arithmetic", options=options)


def test_unknown_task_lists_valid_names():
    import llmrl.envs  # noqa: F401  (registers the environment tasks, as `llmrl train` does)

    with pytest.raises(KeyError, match="arithmetic, gsm8k, humaneval, jsonl, openenv, verifiers"):
        make_task("arithmatic")
    assert {"arithmetic", "jsonl"} <= set(TASKS.names())


# ---------------------------------------------------------------- jsonl

def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def test_jsonl_happy_path_with_hash_split(tmp_path):
    rows = [{"prompt": f"q{i}", "answer": i, "level": i % 3} for i in range(200)]
    task = make_task("jsonl", train_path=write_jsonl(tmp_path / "t.jsonl", rows))
    held = task.heldout(len(task.held))
    train = take(task, 400, seed=3)
    assert 5 <= len(held) <= 40                                   # ~10% of 200
    assert {ex.prompt for ex in held}.isdisjoint(ex.prompt for ex in train)
    assert {ex.prompt for ex in held} | {ex.prompt for ex in train} == {r["prompt"] for r in rows}
    ex = train[0]
    assert ex.answer == ex.prompt[1:] and ex.meta == {"level": int(ex.answer) % 3}
    assert train == take(task, 400, seed=3) and train != take(task, 400, seed=4)
    n_train = 200 - len(held)
    assert sorted(e.prompt for e in train[:n_train]) == sorted(e.prompt for e in train[n_train:2 * n_train])  # epochs


def test_jsonl_heldout_file_drops_its_prompts_from_train(tmp_path):
    train_path = write_jsonl(tmp_path / "t.jsonl", [{"prompt": p, "answer": "1"} for p in "abcd"])
    heldout_path = write_jsonl(tmp_path / "h.jsonl", [{"prompt": p, "answer": "1"} for p in "bx"])
    task = make_task("jsonl", train_path=train_path, heldout_path=heldout_path)
    assert [ex.prompt for ex in task.heldout(2)] == ["b", "x"]
    assert {ex.prompt for ex in take(task, 30)} == {"a", "c", "d"}
    with pytest.raises(ValueError, match="asked for 3 held-out examples, found only 2"):
        task.heldout(3)


@pytest.mark.parametrize("rows, message", [
    ([{"prompt": "a", "answer": "1"}, "{not json"], r"t\.jsonl:2: not valid JSON"),
    ([{"prompt": "a", "answer": "1"}, "", {"answer": "1"}], r"t\.jsonl:3: missing key 'prompt'"),
    ([{"prompt": "a"}], r"t\.jsonl:1: missing key 'answer'"),
    (["[1, 2]"], r"t\.jsonl:1: missing key 'prompt'"),
    ([{"prompt": 3, "answer": "1"}], r"t\.jsonl:1: 'prompt' must be a string"),
    (["", "  "], r"t\.jsonl has no examples"),
])
def test_jsonl_bad_input_errors(tmp_path, rows, message):
    path = write_jsonl(tmp_path / "t.jsonl", rows)
    with pytest.raises(ValueError, match=message):
        make_task("jsonl", train_path=path)


def test_jsonl_missing_files_and_options(tmp_path):
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "nope.jsonl"))):
        make_task("jsonl", train_path=str(tmp_path / "nope.jsonl"))
    with pytest.raises(ValueError, match="needs train_path"):
        make_task("jsonl")
    path = write_jsonl(tmp_path / "t.jsonl", [{"prompt": "a", "answer": "1"}])
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['shuffle'\]"):
        make_task("jsonl", train_path=path, options={"shuffle": True})
    with pytest.raises(ValueError, match="generates its own data"):
        make_task("arithmetic", train_path=path)


# ---------------------------------------------------------------- reasoning-gym

def test_reasoning_gym_basic_arithmetic():
    task = make_task("reasoning_gym:basic_arithmetic", options={"max_terms": 3})
    assert task.name == "reasoning_gym:basic_arithmetic"
    train = take(task, 300)
    held = task.heldout(30)
    assert len({ex.prompt for ex in held}) == 30
    assert not {ex.prompt for ex in held} & {ex.prompt for ex in train}
    assert train == take(task, 300) and held == task.heldout(30)
    for ex in train[:20] + held[:5]:
        assert ex.prompt == ex.meta["entry"]["question"] + "\nEnd your response with 'Answer: <answer>'."
        assert ex.check(ex.answer, ex) == 1.0
        assert ex.check(str(int(ex.answer) + 1), ex) < 1.0


def test_reasoning_gym_errors():
    with pytest.raises(ValueError, match=r"unknown reasoning-gym dataset 'basic_arithmatic'; e\.g\. .*list all with"):
        make_task("reasoning_gym:basic_arithmatic")
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['min_term'\]; valid: .*'min_terms'"):
        make_task("reasoning_gym:basic_arithmetic", options={"min_term": 2})
    with pytest.raises(ValueError, match="min_terms must be positive"):
        make_task("reasoning_gym:basic_arithmetic", options={"min_terms": 0})


def test_reasoning_gym_small_space_is_still_disjoint():
    tiny = {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1, "operators": ["+"],
            "allow_negation": False, "allow_parentheses": False}     # ~100 distinct questions in all
    task = make_task("reasoning_gym:basic_arithmetic", options=tiny)
    held = {ex.prompt for ex in task.heldout(5)}
    assert not held & {ex.prompt for ex in take(task, 2000)}          # 2,000 draws see every train question
    with pytest.raises(ValueError, match="asked for 500 held-out examples, found only"):
        task.heldout(500)
