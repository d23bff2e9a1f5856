"""BFCL (the Berkeley Function Calling Leaderboard) as an eval suite, from the data the `bfcl-eval` package ships.

    make_suite("bfcl")                   # the AST-checked single-turn Python categories (2,351 problems)
    make_suite("bfcl:simple_python")     # one category

Each problem gives functions (JSON schemas) and a user request; the model is prompted as BFCL prompts a model
without native tool calling (its own system prompt, `system_prompt_pre_processing_chat_model`: the functions as
JSON, answer as `[func(arg=value), ...]`), the reply is decoded with BFCL's own `default_decode_ast_prompting`
and scored with BFCL's own `ast_checker` against the shipped possible answers. Everything is read from the
installed package: no network, no API.

Install: `pip install --no-deps bfcl-eval==2026.3.23` plus tree_sitter==0.21.3, tree-sitter-java==0.21.0 and
tree-sitter-javascript==0.21.4 (the `evals` extra; scripts/setup.sh does both). Without --no-deps bfcl-eval
pins numpy==1.26.4 (which verifiers, numpy>=2.1, refuses) and pulls every API client it can benchmark (openai,
anthropic, cohere, mistralai, google-genai, writer, qwen-agent, boto3), sentence-transformers and faiss: none of
which the AST check uses. Its module `constants.model_config` imports all those clients just to map model names
to handler classes; `ast_checker` reads that map only to know whether a model rewrote "." in function names to
"_" (OpenAI-style APIs do; a prompted local model does not). So before importing the checker this module puts a
stand-in `bfcl_eval.constants.model_config` in `sys.modules` with that one entry for "llmrl", unless the real
module is already importable.

The Java and JavaScript AST categories are left out (they need BFCL's type converters for string-typed answers;
not wired up here), as are the multi-turn, agentic, irrelevance (no call expected: a separate check) and
executable categories.
"""

from __future__ import annotations

import copy
import json
import sys
import types
from dataclasses import dataclass

from llmrl.data.tasks import Example
from llmrl.evals.suites import SUITES, Suite

CATEGORIES = ("simple_python", "multiple", "parallel", "parallel_multiple",
              "live_simple", "live_multiple", "live_parallel", "live_parallel_multiple")
MODEL_NAME = "llmrl"
VERSION = "2026.3.23"
INSTALL_HINT = (f"the bfcl suite needs the bfcl-eval package: pip install --no-deps bfcl-eval=={VERSION} "
                "tree_sitter==0.21.3 tree-sitter-java==0.21.0 tree-sitter-javascript==0.21.4 "
                "(or bash scripts/setup.sh)")


@dataclass(frozen=True)
class _ModelConfig:
    underscore_to_dot: bool = False


def _bfcl():
    """BFCL's modules, imported with the stand-in model table (see the module docstring)."""
    try:
        import bfcl_eval  # noqa: F401
    except ImportError as e:
        raise FileNotFoundError(INSTALL_HINT) from e
    name = "bfcl_eval.constants.model_config"
    if name not in sys.modules:
        try:
            __import__(name)
        except ImportError:          # an API client it imports is missing: the --no-deps install
            stub = types.ModuleType(name)
            stub.MODEL_CONFIG_MAPPING = {MODEL_NAME: _ModelConfig()}
            sys.modules[name] = stub
    from bfcl_eval import utils
    from bfcl_eval.constants import eval_config
    from bfcl_eval.constants.enums import Language
    from bfcl_eval.eval_checker.ast_eval import ast_checker
    from bfcl_eval.model_handler import utils as handler_utils

    return types.SimpleNamespace(utils=utils, config=eval_config, Language=Language, checker=ast_checker,
                                 handler=handler_utils)


def _read(path) -> list[dict]:
    if not path.is_file():
        raise FileNotFoundError(f"bfcl data not found at {path}; {INSTALL_HINT}")
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def load_category(category: str) -> list[Example]:
    """One category's problems: meta holds BFCL's entry (functions with its language hint) and possible answers."""
    b = _bfcl()
    prefix = b.config.VERSION_PREFIX                                      # "BFCL_v4"
    entries = _read(b.config.PROMPT_PATH / f"{prefix}_{category}.json")
    entries = b.utils.add_language_specific_hint_to_function_doc(entries)
    answers = {a["id"]: a["ground_truth"] for a in _read(b.config.POSSIBLE_ANSWER_PATH / f"{prefix}_{category}.json")}
    out = []
    for e in entries:
        turn = e["question"][0]
        user = next((m["content"] for m in reversed(turn) if m["role"] == "user"), "")
        meta = {"id": e["id"], "category": category, "functions": e["function"], "turn": turn,
                "ground_truth": answers[e["id"]]}
        out.append(Example(user, json.dumps(answers[e["id"]]), meta))
    return out


def messages(ex: Example) -> list[dict]:
    """BFCL's prompt for a prompted (not natively tool-calling) chat model: its system prompt with the functions."""
    b = _bfcl()
    return b.handler.system_prompt_pre_processing_chat_model(copy.deepcopy(ex.meta["turn"]),
                                                            ex.meta["functions"], ex.meta["id"])


def decode(completion: str):
    """BFCL's decoding of a prompted reply into [{func: {arg: value}}], or None when it is not one."""
    b = _bfcl()
    try:
        calls = b.handler.default_decode_ast_prompting(completion)
    except Exception:                       # not Python call syntax: BFCL counts it as a failed decode
        return None
    return calls if b.utils.is_function_calling_format_output(calls) else None


def check_one(completion: str, ex: Example) -> float:
    calls = decode(completion)
    if calls is None:
        return 0.0
    b = _bfcl()
    try:
        result = b.checker.ast_checker(ex.meta["functions"], calls, ex.meta["ground_truth"], b.Language.PYTHON,
                                       ex.meta["category"], MODEL_NAME)
    except Exception:                       # the checker failing on odd output is a wrong answer
        return 0.0
    return 1.0 if result["valid"] else 0.0


def score(completions: list[str], examples: list[Example]) -> list[float]:
    return [check_one(c, ex) for c, ex in zip(completions, examples, strict=True)]


def vote_key(completion: str, ex: Example) -> str | None:
    calls = decode(completion)
    return None if calls is None else json.dumps(calls, sort_keys=True, default=str)


@SUITES.register("bfcl")
def _suite(arg: str | None):

    if arg is not None and arg not in CATEGORIES:
        raise ValueError(f"bfcl: unknown category {arg!r}; valid: {', '.join(CATEGORIES)}")
    chosen = (arg,) if arg else CATEGORIES
    examples = [ex for c in chosen for ex in load_category(c)]
    return Suite(f"bfcl:{arg}" if arg else "bfcl", examples, score, 128, messages=messages, answer_key=vote_key,
                 source=f"bfcl-eval {VERSION} package data: {', '.join(chosen)}")
