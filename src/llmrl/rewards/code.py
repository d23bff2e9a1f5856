"""Code rewards: run the completion's Python against the example's tests in the sandbox.

    code_tests(completions, examples, timeout_s=5.0) -> [fraction of the example's tests passed, ...]

What the example gives (`meta`):
    tests         a list of test statements (`"assert add(1, 2) == 3"`), each one test; they call the functions
                  the completion defines, by name
    or, HumanEval-style:
    tests         a test program defining `check(candidate)`, with `entry_point` the name of the function under
                  test; each top-level statement of check's body that mentions `candidate` is one test, the
                  others (imports, setup) run in order without counting
    prompt_code   optional code the completion continues (a function signature and docstring): the program is
                  prompt_code + the completion's code, or the code alone, or prompt_code + the code indented,
                  whichever compiles first (a body continuation, a whole function, a body without indentation)

The code is the last ```python (or ```py, or bare ```) fenced block of the completion, else the whole completion.

Trust boundary. The tests do not run in the candidate's process, so a completion cannot fake a pass: not by
printing the harness's result lines, exiting early, monkeypatching builtins or `AssertionError`, returning an
object whose `__eq__` is always True, nor by reading the tests out of memory. Inside the sandbox the harness
process (`code_harness.py`: `_harness_main`, trusted: our code and the dataset's tests) starts the candidate in a
fresh interpreter (`_child_main`) that never sees the tests; each call of a candidate function from a test is sent there, and its
result comes back as plain data (None, bool, int, float, complex, str, bytes and lists, tuples, dicts, sets of
them), which the test then compares in the harness. Only the harness writes the sandbox's stdout. The cost: tests
can only pass such values to and from the candidate (not functions, generators or class instances), which covers
HumanEval and assert-style tests. A test that hangs or crashes the candidate fails alone: the candidate is
restarted for the next test, within the overall budget.

Reward: passed / tests, times (1 - style_weight * style_penalty - efficiency_weight * time_penalty), where
style_penalty = min(1, lint issues / 5) (lines over 100 characters, unused imports and local variables, bare
`except:`; pyflakes is not a dependency) and time_penalty = min(1, seconds spent inside candidate calls /
time_budget_s). Both weights default to 0. Each failing sample is logged on "llmrl.rewards.code" with its reason;
`last_failures` holds the reasons of the last call (None where every test passed). A reason quotes what the
candidate's code raised or printed, so it is escaped (`llmrl.sandbox.escape`: one line, control characters shown,
length capped) before it is kept or logged. Where no sandbox layer can start, `code_tests` raises
`SandboxUnavailable` rather than run the code (`llmrl doctor` says what is missing).
"""

from __future__ import annotations

import ast
import builtins
import functools
import json
import logging
import os
import re
from concurrent.futures import ThreadPoolExecutor

from llmrl.data.tasks import Example
from llmrl.rewards.code_harness import _harness_program
from llmrl.rewards.functions import REWARDS
from llmrl.sandbox import escape, run_python

log = logging.getLogger("llmrl.rewards.code")

last_failures: list[str | None] = []  # per sample of the last code_tests call: why it lost reward, or None

_FENCE = re.compile(r"```[ \t]*(python3?|py)?[ \t]*\r?\n(.*?)(?:```|\Z)", re.S | re.I)


def extract_code(completion: str) -> str:
    """The last fenced python (or unlabelled) block, an unclosed last fence running to the end; else everything."""
    blocks = [m.group(2) for m in _FENCE.finditer(completion)]
    return blocks[-1] if blocks else completion


def _indent(code: str) -> str:
    return "".join("    " + line if line.strip() else line for line in code.splitlines(keepends=True))


def _humaneval_tests(test_program: str) -> list[dict]:
    """The statements of `check(candidate)`'s body: those that mention `candidate` count as tests."""
    module = ast.parse(test_program)
    check = next((n for n in module.body if isinstance(n, ast.FunctionDef) and n.name == "check"), None)
    if check is None:
        raise ValueError("the HumanEval test program defines no check(candidate)")
    steps = []
    for stmt in check.body:
        names = {n.id for n in ast.walk(stmt) if isinstance(n, ast.Name)}
        steps.append({"src": ast.unparse(stmt), "counts": "candidate" in names})
    return steps


def _names_read(tests: list[str]) -> set[str]:
    """Names the tests read, but not Python's builtins: the candidate's may not stand in for `len` or `abs`."""
    names = set()
    for t in tests:
        try:
            names |= {n.id for n in ast.walk(ast.parse(t)) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)}
        except SyntaxError:
            pass  # that test fails when it runs
    return names - set(dir(builtins))


def _spec(code: str, ex: Example, timeout_s: float, test_timeout_s: float | None, style: bool) -> dict:
    """What the harness needs for one completion (JSON, sent on its stdin)."""
    meta = ex.meta
    prefix = meta.get("prompt_code") or ""
    sources = [prefix + code, code, prefix + _indent(code)] if prefix else [code]
    tests = meta.get("tests")
    if isinstance(tests, str):  # HumanEval: check(candidate) with an entry point
        entry = meta["entry_point"]
        steps = _humaneval_tests(tests)
        setup, proxies, aliases = prefix + "\n" + tests, [entry], {"candidate": entry}
    elif isinstance(tests, (list, tuple)) and all(isinstance(t, str) for t in tests):
        steps = [{"src": t, "counts": True} for t in tests]
        setup, proxies, aliases = "", sorted(_names_read(tests)), {}
    else:
        raise ValueError("code_tests: the example's meta['tests'] must be a list of test statements, or a "
                         "HumanEval test program (str) with meta['entry_point']")
    return {"sources": list(dict.fromkeys(sources)), "style_source": code if style else None, "setup": setup,
            "proxies": proxies, "aliases": aliases, "steps": steps, "deadline_s": timeout_s,
            "test_timeout_s": test_timeout_s or timeout_s}


@REWARDS.register("code_tests")
def code_tests(completions: list[str], examples: list[Example], *, timeout_s: float = 5.0,
               test_timeout_s: float | None = None, memory_mb: int = 512, style_weight: float = 0.0,
               efficiency_weight: float = 0.0, time_budget_s: float = 1.0, workers: int | None = None) -> list[float]:
    """Fraction of the example's tests the completion's code passes, run in the sandbox (see the module docstring).

    timeout_s: wall-clock budget for all of one completion's tests; test_timeout_s: for one test (default: all of
    timeout_s); memory_mb: address space per process; workers: completions run at once (default: CPU count).
    """
    for name, w in (("style_weight", style_weight), ("efficiency_weight", efficiency_weight)):
        if not 0.0 <= w <= 1.0:
            raise ValueError(f"code_tests: {name} must be in [0, 1], got {w}")
    if timeout_s <= 0 or time_budget_s <= 0:
        raise ValueError("code_tests: timeout_s and time_budget_s must be > 0")
    specs = [_spec(extract_code(c), ex, timeout_s, test_timeout_s, style_weight > 0)
             for c, ex in zip(completions, examples, strict=True)]
    # Built here, once, before any worker thread: inspect.getsource parses with `ast`, which CPython 3.11 does not
    # make safe to run from two threads at once ("AST constructor recursion depth mismatch").
    program = _harness_program()
    run = functools.partial(_score_one, program=program, timeout_s=timeout_s, memory_mb=memory_mb,
                            style_weight=style_weight, efficiency_weight=efficiency_weight,
                            time_budget_s=time_budget_s)
    n_workers = max(1, min(len(specs), workers or os.cpu_count() or 1))
    if n_workers == 1:
        results = [run(s) for s in specs]
    else:
        with ThreadPoolExecutor(n_workers) as pool:
            results = list(pool.map(run, specs))
    last_failures[:] = [why for _, why in results]
    for i, (_, why) in enumerate(results):
        if why is not None:
            log.info("code_tests: sample %d: %s", i, why)
    return [r for r, _ in results]


code_tests.runs_model_code = True   # the CLI checks that a sandbox layer can start before training


def _score_one(spec: dict, *, program: str, timeout_s, memory_mb, style_weight, efficiency_weight,
               time_budget_s):
    """(reward, why it is below the maximum or None) for one completion."""
    counted = [i for i, step in enumerate(spec["steps"]) if step["counts"]]
    if not counted:
        return 0.0, "the example has no tests"
    res = run_python(program, stdin=json.dumps(spec), timeout_s=timeout_s + 2.0, cpu_s=timeout_s + 2.0,
                     memory_mb=memory_mb, max_procs=16, max_output_bytes=1_000_000)
    events = []
    for line in res.stdout.splitlines():  # only the harness writes here, never the candidate
        try:
            events.append(json.loads(line))
        except ValueError:
            pass
    results = {e["i"]: e for e in events if e.get("event") == "test"}
    done = next((e for e in events if e.get("event") == "done"), None)
    style = next((e for e in events if e.get("event") == "style"), None)
    passed = sum(1 for i in counted if results.get(i, {}).get("passed"))
    reward = passed / len(counted)
    reasons = [f"test {i}: {results[i]['reason']}" for i in counted if i in results and not results[i]["passed"]]
    if done is None:  # the harness did not finish (the candidate killed it, or the sandbox did): the rest failed
        reasons.insert(0, f"sandbox {res.status}: {res.reason or 'the harness ended early'}")
    elif done.get("error"):
        reasons = [done["error"]]
    penalty = 0.0
    if style_weight and style is not None:
        penalty += style_weight * min(1.0, len(style["issues"]) / 5)
        if style["issues"]:
            reasons.append("style: " + "; ".join(style["issues"][:3]))
    if efficiency_weight and done is not None:
        penalty += efficiency_weight * min(1.0, done["call_s"] / time_budget_s)
    if not reasons:
        return reward * (1.0 - penalty), None
    return reward * (1.0 - penalty), escape(f"{passed}/{len(counted)} tests passed: " + " | ".join(reasons[:3]), 600)
