"""Environments written for verifiers (PyPI `verifiers` 0.4, its v1 API: `import verifiers.v1 as vf`), in-process.

A verifiers environment is a taskset module (an importable module exporting a `vf.Taskset` subclass, and optionally
a `vf.Env` subclass, through `__all__`): verifiers' own loader (`loaders.load_environment`) builds it here, with the
config fields given in the task options. An episode is the environment's own `Env.run(task, agents)`; the `agents`
handed to it are llmrl's: a seat's `interaction(task)` yields an object whose `turn(message)` is one model turn of
llmrl's episode loop (envs/episodes.py) and returns verifiers' own `Segment`; `run(task)` is one such turn on the
task's prompt. Everything the model and the environment said is recorded on a real `vf.Trace` (message nodes,
the model's replies marked sampled), which the task then scores with its own `@vf.reward` functions
(`Task.score(trace)`, no runtime); the episode's reward is `trace.reward`.

    task = make_task("verifiers", options={"env": "examples/envs/vf_guess_number.py", "config": {"tries": 3}})

What is not supported, with an error that says so: environments that seat more than one agent (llmrl trains one
policy; a user simulator or a judge seat would need a second model), harness programs (a verifiers harness runs the
model behind an OpenAI-compatible endpoint inside a sandbox runtime: bash, claude_code, codex...; here the model's
turn is llmrl's own sampler), runtime-dependent rewards (skipped by verifiers itself when scoring without a runtime,
logged), and tool calls in verifiers' own tool-call format (the reply is plain text).
"""

from __future__ import annotations

import importlib
import sys
from contextlib import asynccontextmanager
from pathlib import Path

from llmrl.envs.episodes import Truncated

POLICY_SEAT_HINT = "llmrl runs one policy seat per episode"


def _module_id(env: str) -> str:
    """A file path (examples/envs/x.py) goes on sys.path and is imported by name, as verifiers imports tasksets."""
    p = Path(env)
    if p.suffix == ".py":
        if not p.is_file():
            raise FileNotFoundError(f"verifiers environment file not found: {env}")
        folder = str(p.resolve().parent)
        if folder not in sys.path:
            sys.path.insert(0, folder)
        return p.stem
    return env


def load_environment(env: str, taskset: dict | None = None, config: dict | None = None):
    """verifiers' own loading of the environment `env` (a taskset module id or a .py file), with config fields."""
    try:
        from verifiers.v1.utils import loaders
    except ImportError as e:
        raise ImportError("verifiers environments need the verifiers package: pip install 'llmrl[envs]' "
                          "(or bash scripts/setup.sh)") from e
    module = _module_id(env)
    importlib.import_module(module)                       # a clear ModuleNotFoundError for a bad name
    cfg = loaders.env_config_type(module)(taskset={"id": module, **(taskset or {})}, **(config or {}))
    return loaders.load_environment(cfg)


class _Interaction:
    """One seat's conversation: `turn` is a model turn of llmrl's loop; every message lands on `trace`."""

    def __init__(self, task, turn):
        import verifiers.v1 as vf
        from verifiers.v1.trace import AgentInfo, TraceTask

        self.task, self._turn, self.ended = task, turn, False
        self.trace = vf.Trace(task=TraceTask(type=type(task).__name__, data=task.data),
                              agent=AgentInfo(config=vf.AgentConfig()))

    def _add(self, message, sampled: bool = False) -> None:
        from verifiers.v1.graph import MessageNode

        parent = len(self.trace.nodes) - 1 if self.trace.nodes else None
        self.trace.nodes.append(MessageNode(parent=parent, message=message, sampled=sampled))

    async def turn(self, message=None):
        from verifiers.v1.agent import Segment
        from verifiers.v1.types import AssistantMessage, SystemMessage, UserMessage, content_text

        if message is None:                                  # a prompted task speaks first
            if self.trace.nodes:
                raise ValueError("turn() without a message after the opening turn")
            text, system = self.task.data.prompt_text, self.task.data.system_prompt
        else:
            text = message if isinstance(message, str) else "\n\n".join(
                content_text(m.content) for m in message if getattr(m, "role", "user") == "user")
            system = self.task.data.system_prompt if not self.trace.nodes else None
        if self.ended:
            raise Truncated("the episode already ended")
        if system and not self.trace.nodes:
            self._add(SystemMessage(content=system))
        self._add(UserMessage(content=text))
        try:
            reply = await self._turn(text, system=system) if system else await self._turn(text)
        except Truncated:
            self.ended = True
            return Segment(messages=[], terminated=True)
        self._add(AssistantMessage(content=reply), sampled=True)
        return Segment(messages=[AssistantMessage(content=reply)])


class _Seat:
    def __init__(self, name: str, agents: "_Agents"):
        self.name, self.agents, self.trainable = name, agents, True

    @asynccontextmanager
    async def interaction(self, task, **_):
        yield self.agents.open(self.name, task)

    async def run(self, task, **_):
        talk = self.agents.open(self.name, task)
        await talk.turn()
        return talk.trace


class _Agents:
    """The `agents` an Env's `run` sees: any seat name, but only one seat may talk (to llmrl's policy)."""

    def __init__(self, turn):
        self._turn, self.talk, self.seat = turn, None, None

    def __getattr__(self, name: str) -> _Seat:
        if name.startswith("_"):
            raise AttributeError(name)
        return _Seat(name, self)

    def open(self, seat: str, task) -> _Interaction:
        if self.talk is not None:
            raise ValueError(f"{POLICY_SEAT_HINT}; this environment opened a second one ({seat!r} after "
                             f"{self.seat!r})")
        self.seat, self.talk = seat, _Interaction(task, self._turn)
        return self.talk


def episode(env, task):
    """The coroutine function play(turn) -> reward of one episode of `task` in `env`."""
    async def play(turn) -> float:
        agents = _Agents(turn)
        await env.setup(agents)
        try:
            await env.run(task, agents)
        except Truncated:
            pass                                  # out of budget: score what was played
        if agents.talk is None:
            raise ValueError("the environment's episode never gave the model a turn")
        await task.score(agents.talk.trace)
        return agents.talk.trace.reward
    return play

