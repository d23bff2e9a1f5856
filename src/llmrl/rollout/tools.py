"""Tools a model may call during a multi-turn episode, by name. One signature for all:

    tool(arguments: str) -> str      # the text the model wrote after `NAME:`, in; the observation text, out

A tool never raises for anything the model wrote: bad input gives a short string starting with "error:"
(the episode loop counts outputs that start so as `tool_errors`).

The call format (taught by `system_prompt`, which lists each tool's docstring's first line, and by
`demonstration`, one worked exchange shown before each prompt). The model writes a call and the environment
answers inline, inside the same assistant turn:

    model:        ... <tool>calculator: 12*7</tool>
    environment:  \\n<result>84</result>\\n
    model:        Answer: 84<EOS>

A turn ends when the model's text ends a call (`CALL_END`, a stop string of the sampler) or at EOS; a turn
with no call is the answer. The call is the text between the last `<tool>` and the `</tool>` that ended the
turn, split at the first `:` into the tool's name and its arguments.
"""

from __future__ import annotations

import ast
import math
import operator
import re

from llmrl.registry import Registry
from llmrl.sandbox import SandboxUnavailable

TOOLS = Registry("tool")

CALL_START, CALL_END = "<tool>", "</tool>"
RESULT_START, RESULT_END = "\n<result>", "</result>\n"
MAX_OUTPUT_CHARS = 400          # a tool's output is cut to this before it is wrapped (the loop also caps tokens)


def parse_call(text: str) -> tuple[str, str] | None:
    """The (name, arguments) of the call that ends `text` (a turn that stopped on `</tool>`), or None if no call.
    A `</tool>` without a `<tool>` before it gives ("", "") — a malformed call the loop answers with an error."""
    end = text.rfind(CALL_END)
    if end < 0:
        return None
    start = text.rfind(CALL_START, 0, end)
    if start < 0:
        return "", ""
    name, _, arguments = text[start + len(CALL_START):end].partition(":")
    return name.strip(), arguments.strip()


def run_call(name: str, arguments: str, tools: dict) -> str:
    """The output of one call, as text (an unknown or failing tool gives "error: ...")."""
    if name not in tools:
        return f"error: unknown tool {name!r}; tools: {', '.join(sorted(tools))}"
    try:
        out = str(tools[name](arguments))
    except SandboxUnavailable:        # not the model's doing: no sandbox here, so no model code runs at all
        raise
    except Exception as e:            # a tool should not raise; if one does, the episode goes on
        out = f"error: {type(e).__name__}: {e}"
    return out if len(out) <= MAX_OUTPUT_CHARS else out[:MAX_OUTPUT_CHARS - 3] + "..."


def observation_text(output: str) -> str:
    """The text appended after a call: the tool's output wrapped in <result> tags."""
    return f"{RESULT_START}{output}{RESULT_END}"


def resolve_tools(names: list[str]) -> dict:
    """Tool names -> {name: function}; an unknown or repeated name is a ValueError that lists the valid ones."""
    if len(set(names)) != len(names):
        raise ValueError(f"rollout.tools lists a tool twice: {names}")
    unknown = [n for n in names if n not in TOOLS]
    if unknown:
        raise ValueError(f"rollout.tools: unknown tool(s) {unknown}; valid: {', '.join(TOOLS.names())}")
    return {n: TOOLS.get(n) for n in names}


def system_prompt(names: list[str]) -> str:
    """The default system prompt of a tool task: the call format, one line per tool (its docstring's first).

    Each line shows the tool's own call (`<tool>calculator: EXPRESSION</tool>`), not a `NAME` placeholder:
    SmolLM2-135M invents tool names from a placeholder far more often."""
    lines = [f"- {TOOLS.get(n).__doc__.strip().splitlines()[0]}" for n in names]
    return ("You have tools. To use one, write its call and stop; the result comes back as <result>OUTPUT</result>. "
            "Then give the answer. Tools:\n" + "\n".join(lines))


_DEMO_CALLS = {"calculator": "12*7", "python": "print(12*7)"}    # each computes 84


def demonstration(names: list[str]) -> list[dict]:
    """One worked exchange (a user message and the assistant's call, result and answer) with the first of `names`
    that has one, as chat messages to put before each prompt; [] if none has. Small models copy it."""
    name = next((n for n in names if n in _DEMO_CALLS), None)
    if name is None:
        return []
    reply = f"{CALL_START}{name}: {_DEMO_CALLS[name]}{CALL_END}{observation_text('84')}Answer: 84"
    return [{"role": "user", "content": "What is 12 * 7? End your response with 'Answer: <number>'."},
            {"role": "assistant", "content": reply}]


# ---------------------------------------------------------------- calculator

_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}
_UNARY = {ast.USub: operator.neg, ast.UAdd: operator.pos}
MAX_INPUT_CHARS, MAX_NODES, MAX_EXPONENT, MAX_DIGITS = 200, 64, 1000, 100


class CalculatorError(ValueError):
    pass


def _check_size(x):
    if isinstance(x, int) and x.bit_length() > MAX_DIGITS * 3.33:    # about 10**MAX_DIGITS
        raise CalculatorError(f"result too large (over {MAX_DIGITS} digits)")
    if isinstance(x, float) and not math.isfinite(x):
        raise CalculatorError("result is not finite")
    return x


def _power(base, exponent):
    if abs(exponent) > MAX_EXPONENT:
        raise CalculatorError(f"exponent too large (|exponent| > {MAX_EXPONENT})")
    if exponent > 0 and abs(base) > 1 and exponent * math.log10(abs(base)) > MAX_DIGITS:
        raise CalculatorError(f"result too large (over {MAX_DIGITS} digits)")
    return base ** exponent


def _eval(node):
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return _check_size(node.value)
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _UNARY[type(node.op)](_eval(node.operand))
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _eval(node.left), _eval(node.right)
        if isinstance(node.op, ast.Pow):
            value = _power(left, right)
            if isinstance(value, complex):
                raise CalculatorError("result is complex")
        else:
            value = _BINARY[type(node.op)](left, right)
        return _check_size(value)
    raise CalculatorError(f"not allowed: {type(node).__name__} (numbers, + - * / // % ** and parentheses only)")


def _format(x) -> str:
    if isinstance(x, float) and x.is_integer() and abs(x) < 1e15:
        return str(int(x))
    return f"{x:.12g}" if isinstance(x, float) else str(x)


@TOOLS.register("calculator")
def calculator(arguments: str) -> str:
    """<tool>calculator: EXPRESSION</tool> evaluates arithmetic (+ - * / // % ** and parentheses)"""
    text = arguments.strip().rstrip("=").strip().replace("^", "**").replace("×", "*").replace("÷", "/")
    if not text:
        return "error: empty expression"
    if len(text) > MAX_INPUT_CHARS:
        return f"error: expression longer than {MAX_INPUT_CHARS} characters"
    try:
        tree = ast.parse(text, mode="eval")
        if sum(1 for _ in ast.walk(tree)) > MAX_NODES:
            return f"error: expression has more than {MAX_NODES} parts"
        return _format(_eval(tree.body))
    except CalculatorError as e:
        return f"error: {e}"
    except ZeroDivisionError:
        return "error: division by zero"
    except SyntaxError:
        return f"error: not an arithmetic expression: {text[:60]}"
    except (OverflowError, ValueError, TypeError, RecursionError, MemoryError) as e:
        return f"error: {type(e).__name__}: {e}"


# ---------------------------------------------------------------- python (sandboxed)

PYTHON_TIMEOUT_S, PYTHON_MEMORY_MB, PYTHON_MAX_OUTPUT_BYTES = 5.0, 512, 16_000
_FENCE = re.compile(r"^```(?:python|py)?\s*\n?|\n?```\s*$")


@TOOLS.register("python")
def python(arguments: str) -> str:
    """<tool>python: CODE</tool> runs a Python program and returns what it prints

    It runs in the same sandbox as `code_tests` (`llmrl.sandbox`); where none can start it raises
    SandboxUnavailable (which `run_call` lets through: the episode stops rather than run the code unsandboxed)."""
    from llmrl.sandbox import run_python

    code = _FENCE.sub("", arguments.strip())
    if not code.strip():
        return "error: no code"
    res = run_python(code, timeout_s=PYTHON_TIMEOUT_S, cpu_s=PYTHON_TIMEOUT_S, memory_mb=PYTHON_MEMORY_MB,
                     max_output_bytes=PYTHON_MAX_OUTPUT_BYTES)
    out = res.stdout.strip()
    if res.status == "ok":
        return out or "(no output)"
    # the code's own error line (e.g. "ZeroDivisionError: division by zero"), else the sandbox's reason
    last = next((line.strip() for line in reversed(res.stderr.splitlines()) if line.strip()), "")
    why = last if res.status == "error" and last else res.reason.split("; missing layers")[0]
    return f"error: {why}" + (f"\n{out}" if out else "")


python.runs_model_code = True   # the CLI checks that a sandbox layer can start before running episodes
