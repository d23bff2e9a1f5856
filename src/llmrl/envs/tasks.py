"""Environments as tasks: `task.name: verifiers` or `openenv`, with the environment in `task.options.env`.

Each example is one environment episode to play: `meta["env"](g)` gives the coroutine function of its g-th sample
(envs/episodes.py runs them); the G samples of an example play the same task (verifiers) or the same seed
(OpenEnv), so a group baseline compares like with like. The held-out set follows the shared hash rule
(`tasks._is_heldout`) on the task's key (verifiers) or "NAME:seed" (OpenEnv), so it never enters the stream.

    make_task("verifiers", options={"env": "examples/envs/vf_guess_number.py", "config": {"tries": 3}})
    make_task("openenv", options={"env": "examples/envs/openenv_arith.py", "env_options": {"tries": 2}})
"""

from __future__ import annotations

import itertools
import random
from functools import partial

from llmrl.data.tasks import TASKS, Example, _is_heldout, _no_files, _take_options

ENV_TASKS = ("verifiers", "openenv")
TIMEOUT_S = 30.0


def _unscored(pred: str, ex: Example) -> float:
    """An environment is scored by its own reward (the episode's), not by an extracted answer."""
    return 0.0


class VerifiersTask:
    def __init__(self, env: str, taskset: dict, config: dict, timeout_s: float):
        from llmrl.envs import verifiers_env

        self.name, self.timeout_s = "verifiers", timeout_s
        self.env = verifiers_env.load_environment(env, taskset, config)
        self._episode = verifiers_env.episode
        self.bounded = self.env.taskset.bounded

    def _examples(self, split: str):
        for task in self.env.taskset:
            if _is_heldout(task.key) == (split == "heldout"):
                play = partial(_task_episode, self._episode, self.env, task)
                yield Example(task.data.prompt_text, "", {"env": play, "timeout_s": self.timeout_s,
                                                          "key": task.key}, _unscored)

    def train_stream(self, seed: int):
        if not self.bounded:
            yield from self._examples("train")
            return
        examples = list(self._examples("train"))
        if not examples:
            raise ValueError("verifiers task: the taskset has no training tasks left after holding out")
        rng = random.Random(seed)
        while True:
            yield from rng.sample(examples, len(examples))

    def heldout(self, n: int) -> list[Example]:
        """The first n held-out tasks (tasks may share a prompt: a game's secret is not in it)."""
        held = list(itertools.islice(self._examples("heldout"), n))
        if len(held) < n:
            raise ValueError(f"verifiers task: asked for {n} held-out tasks, the taskset holds out {len(held)}")
        return held


class OpenEnvTask:
    def __init__(self, env: str, env_options: dict, action: str | None, action_field: str | None,
                 observation_field: str | None, max_steps: int, timeout_s: float):
        from llmrl.envs import openenv_env

        self.name, self.ref = "openenv", env
        cls = openenv_env.load_class(env)
        act = openenv_env.action_class(cls, action)
        self._play = partial(openenv_env.episode, cls, dict(env_options), action_cls=act,
                             field=openenv_env.text_field(act, action_field), obs_field=observation_field,
                             max_steps=max_steps)
        self.timeout_s = timeout_s

    def _example(self, seed: int) -> Example:
        key = f"{self.ref}:{seed}"
        return Example(f"OpenEnv episode {key}", "", {"env": partial(_seed_episode, self._play, seed), "seed": seed,
                                                     "timeout_s": self.timeout_s}, _unscored)

    def train_stream(self, seed: int):
        rng = random.Random(seed)
        while True:
            s = rng.randrange(2**31)
            if not _is_heldout(f"{self.ref}:{s}"):
                yield self._example(s)

    def heldout(self, n: int) -> list[Example]:
        seeds = (s for s in itertools.count() if _is_heldout(f"{self.ref}:{s}"))
        return [self._example(s) for s in itertools.islice(seeds, n)]


def _seed_episode(play, seed: int, g: int):
    return play(seed)


def _task_episode(episode, env, task, g: int):
    return episode(env, task)


def _need_env(name: str, options: dict) -> None:
    if not options.get("env"):
        raise ValueError(f"task {name!r} needs options.env: the environment (a .py file or an importable module)")


@TASKS.register("verifiers")
def _verifiers(*, seed: int, options: dict, train_path: str | None, heldout_path: str | None):
    _no_files("verifiers", train_path, heldout_path)
    o = _take_options("verifiers", options, {"env": None, "taskset": {}, "config": {}, "timeout_s": TIMEOUT_S})
    _need_env("verifiers", o)
    return VerifiersTask(o["env"], o["taskset"], o["config"], float(o["timeout_s"]))


@TASKS.register("openenv")
def _openenv(*, seed: int, options: dict, train_path: str | None, heldout_path: str | None):
    _no_files("openenv", train_path, heldout_path)
    o = _take_options("openenv", options, {"env": None, "env_options": {}, "action": None, "action_field": None,
                                           "observation_field": None, "max_steps": 8, "timeout_s": TIMEOUT_S})
    _need_env("openenv", o)
    return OpenEnvTask(o["env"], o["env_options"], o["action"], o["action_field"], o["observation_field"],
                       int(o["max_steps"]), float(o["timeout_s"]))
