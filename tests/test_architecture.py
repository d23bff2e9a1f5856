"""The package's shape: layers point down, no import cycles, no function longer than a screenful or two.

The layers, lowest first (a module may import its own layer and the ones below, never above):

    base         registry, typed, cache, config, config_supervised, config_loader, presets
    data         tasks and their data
    compute      forward machinery: log-probs, packing, attention, the chunked head, fused ops, the lean decoder,
                 C kernels, execution settings, the heap
    models       loading, LoRA, value heads
    sandbox      running untrusted code
    rollout      samplers, engines, episodes, tools
    envs         environments written for verifiers and OpenEnv, run through their own episode loop
    rewards      reward functions, learned-reward inference
    credit       advantage estimators
    objectives   losses
    distributed  the torchrun runtime
    runio        run folders, checkpoints, metrics and their sinks
    train        the recipes and the trainers
    apps         report, evaluations, studio, audit: they read runs and call the trainers
    cli          the command line
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "llmrl"
LAYERS = [
    {"registry", "typed", "cache", "config", "config_supervised", "config_loader", "presets", "__init__"},
    {"data"},
    {"compute"},
    {"models"},
    {"sandbox"},
    {"rollout"},
    {"envs"},
    {"rewards"},
    {"credit"},
    {"objectives"},
    {"distributed"},
    {"runio"},
    {"train"},
    {"report", "evals", "studio", "audit", "doctor"},
    {"cli", "cli_supervised", "__main__"},
]
MAX_FUNCTION_LINES = 100


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """The llmrl modules `path` imports anywhere in its body (inside functions too: a lazy import is still a
    dependency), resolved to a module of the package."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in modules:
                t = t.rpartition(".")[0]
            if t.startswith("llmrl") and t != name:
                found.add(t)
    return found


def graph() -> dict[str, set[str]]:
    paths = sorted(SRC.rglob("*.py"))
    modules = {module_name(p) for p in paths}
    return {module_name(p): imports_of(p, modules) for p in paths}


def layer_of(module: str) -> int:
    top = module.split(".")[1] if "." in module else "__init__"
    for i, names in enumerate(LAYERS):
        if top in names:
            return i
    raise AssertionError(f"{module}: its top-level name {top!r} is in no layer of tests/test_architecture.py: "
                         "add it where it belongs")


def test_every_import_points_down_or_sideways():
    upward = [f"{a} (layer {layer_of(a)}) imports {b} (layer {layer_of(b)})"
              for a, deps in graph().items() for b in deps if layer_of(b) > layer_of(a)]
    assert not upward, "upward imports:\n" + "\n".join(upward)


def find_cycle(g: dict[str, set[str]]) -> list[str] | None:
    """A cycle of `g` as a list of nodes (first == last), or None."""
    state: dict[str, int] = {}             # 1: on the current path, 2: done
    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))

    def visit(node, path):
        state[node] = 1
        for nxt in sorted(g.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt] if nxt in path else [node, nxt, node]
            if nxt not in state:
                found = visit(nxt, path + [nxt])
                if found:
                    return found
        state[node] = 2
        return None

    for start in sorted(g):
        if start not in state:
            found = visit(start, [start])
            if found:
                return found
    return None


def test_no_import_cycle():
    cycle = find_cycle(graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_checks_catch_what_they_should():
    """The two checks above fail on the shapes they look for."""
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
    assert layer_of("llmrl.compute.packing") < layer_of("llmrl.rollout.sampler") < layer_of("llmrl.train.rl")
    with pytest.raises(AssertionError, match="no layer"):
        layer_of("llmrl.nowhere.module")


def long_functions(path: Path) -> list[str]:
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            n = node.end_lineno - node.lineno + 1
            if n > MAX_FUNCTION_LINES:
                out.append(f"{module_name(path)}.{node.name}: {n} lines")
    return out


def test_no_function_longer_than_a_limit():
    found = [f for p in sorted(SRC.rglob("*.py")) for f in long_functions(p)]
    assert not found, f"functions over {MAX_FUNCTION_LINES} lines:\n" + "\n".join(found)


def branches(fn: ast.AST) -> int:
    return sum(isinstance(n, (ast.If, ast.IfExp, ast.For, ast.While, ast.Try, ast.comprehension, ast.Match))
               for n in ast.walk(fn))


def test_the_recipe_reads_top_to_bottom():
    """train() and the RL step stay small: everything the config decides is decided in train/build.py."""
    tree = ast.parse((SRC / "train" / "rl.py").read_text())
    fns = {n.name: n for n in tree.body if isinstance(n, ast.FunctionDef)}
    for name in ("train", "rl_step"):
        fn = fns[name]
        assert fn.end_lineno - fn.lineno + 1 <= 100, name
        assert branches(fn) <= 10, f"{name}: {branches(fn)} branches"
