"""Environments written for OpenEnv (PyPI `openenv-core` 0.3): its reset/step/state protocol, in-process.

An OpenEnv environment is a subclass of `openenv.core.env_server.interfaces.Environment[Action, Observation, State]`
(the class an OpenEnv server wraps in HTTP/WebSocket; here it is called directly, no server, no client, no Docker):
`reset(seed=...) -> Observation`, `step(action) -> Observation` with `done` and `reward`, and `state`. An episode:

    obs = env.reset(seed=seed)
    while not obs.done:   reply = model's turn on observation_text(obs);  obs = env.step(Action(<text field>=reply))
    reward = the sum of the observations' `reward`s (None counts 0)

Text in and out: the action is the environment's Action class (from its generic parameters, or `action` in the
options) with its one required str field set to the model's reply (`action_field` names it otherwise); the
observation's text is its `observation_field` (default: the first str field among prompt, message, text,
observation, content). An observation that is not an `Observation`, or has no such text, is malformed: the episode
scores 0 and is counted. `reset` and `step` run in a worker thread, so one that hangs is timed out (its thread is
left behind).

    task = make_task("openenv", options={"env": "examples/envs/openenv_arith.py", "max_steps": 3})
"""

from __future__ import annotations

import asyncio
import importlib
import importlib.util
import typing
from pathlib import Path

from llmrl.envs.episodes import MalformedObservation, Truncated

TEXT_FIELDS = ("prompt", "message", "text", "observation", "content")


def _import(ref: str):
    """`path/to/file.py[:Name]` or `package.module[:Name]` -> (module, Name or None)."""
    target, _, name = ref.partition(":")
    if target.endswith(".py"):
        if not Path(target).is_file():
            raise FileNotFoundError(f"OpenEnv environment file not found: {target}")
        spec = importlib.util.spec_from_file_location(Path(target).stem, target)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    else:
        module = importlib.import_module(target)
    return module, name or None


def load_class(ref: str):
    """The Environment subclass `ref` names, or the one the module defines."""
    try:
        from openenv.core.env_server.interfaces import Environment
    except ImportError as e:
        raise ImportError("OpenEnv environments need openenv-core: pip install 'llmrl[envs]' "
                          "(or bash scripts/setup.sh)") from e
    module, name = _import(ref)
    if name:
        cls = getattr(module, name, None)
        if not (isinstance(cls, type) and issubclass(cls, Environment)):
            raise ValueError(f"{ref}: {name!r} is not an openenv Environment subclass")
        return cls
    found = [v for v in vars(module).values() if isinstance(v, type) and issubclass(v, Environment)
             and v is not Environment and v.__module__ == module.__name__]
    if len(found) != 1:
        raise ValueError(f"{ref}: defines {len(found)} Environment subclasses ({[c.__name__ for c in found]}); "
                         "name one as FILE.py:ClassName")
    return found[0]


def action_class(env_cls, override: str | None = None):
    """The Action type: `override` (a name in the env's module), else Environment[Action, ...]'s first argument."""
    from openenv.core.env_server.types import Action

    if override:
        cls = getattr(importlib.import_module(env_cls.__module__), override, None)
    else:
        cls = next((typing.get_args(b)[0] for c in env_cls.__mro__ for b in getattr(c, "__orig_bases__", ())
                    if typing.get_args(b)), None)
    if not (isinstance(cls, type) and issubclass(cls, Action)):
        raise ValueError(f"{env_cls.__name__}: cannot tell its Action class; give options.action")
    return cls


def text_field(action_cls, override: str | None = None) -> str:
    """The Action's text field: `override`, else its only str field other than metadata."""
    fields = {k: f for k, f in action_cls.model_fields.items() if k != "metadata"}
    if override:
        if override not in fields:
            raise ValueError(f"{action_cls.__name__} has no field {override!r}; fields: {sorted(fields)}")
        return override
    texts = [k for k, f in fields.items() if f.annotation is str]
    if len(texts) != 1:
        raise ValueError(f"{action_cls.__name__}: {len(texts)} str fields {texts}; name one with options.action_field")
    return texts[0]


def observation_text(obs, field: str | None = None) -> str:
    from openenv.core.env_server.types import Observation

    if not isinstance(obs, Observation):
        raise MalformedObservation(f"not an openenv Observation: {type(obs).__name__}")
    names = (field,) if field else TEXT_FIELDS
    for name in names:
        value = getattr(obs, name, None)
        if isinstance(value, str):
            return value
    raise MalformedObservation(f"{type(obs).__name__} has no text field among {list(names)}")


def episode(env_cls, env_options: dict, seed: int, *, action_cls, field: str, obs_field: str | None,
            max_steps: int):
    """The coroutine function play(turn) -> reward of one episode with a fresh `env_cls(**env_options)`."""
    async def play(turn) -> float:
        env = env_cls(**env_options)
        total = 0.0
        try:
            obs = await asyncio.to_thread(env.reset, seed=seed)
            for _ in range(max_steps):
                text = observation_text(obs, obs_field)
                if obs.done:
                    break
                try:
                    reply = await turn(text)
                except Truncated:
                    break
                obs = await asyncio.to_thread(env.step, action_cls(**{field: reply}))
                observation_text(obs, obs_field)             # malformed step output fails the episode
                total += float(obs.reward or 0.0)
            return total
        finally:
            env.close()
    return play
