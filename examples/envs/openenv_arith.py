"""A small multi-turn environment written for OpenEnv (openenv-core's Environment API), vendored here so it runs
offline, in-process (no server, no Docker): reset(seed) poses a sum of two 2-digit numbers; step(action) checks the
reply's last number; a wrong answer gets "Not quite: try again." and one more try. Reward 1 for a right answer on
the first try, 0.5 on the second, 0 otherwise. In llmrl: `task: {name: openenv, options: {env:
examples/envs/openenv_arith.py}}`. Served as OpenEnv serves any environment, it would be
`openenv.core.env_server.http_server.create_app(ArithEnvironment, ArithAction, ArithObservation)`.
"""

import random
import re
import uuid

from openenv.core.env_server.interfaces import Environment
from openenv.core.env_server.types import Action, Observation, State


class ArithAction(Action):
    message: str


class ArithObservation(Observation):
    prompt: str = ""


class ArithState(State):
    a: int = 0
    b: int = 0


class ArithEnvironment(Environment[ArithAction, ArithObservation, ArithState]):
    SUPPORTS_CONCURRENT_SESSIONS = True

    def __init__(self, tries: int = 2):
        super().__init__()
        self.tries = tries
        self._state = ArithState()

    def reset(self, seed=None, episode_id=None, **kwargs) -> ArithObservation:
        rng = random.Random(seed)
        self._state = ArithState(episode_id=episode_id or uuid.uuid4().hex, a=rng.randint(10, 99),
                                 b=rng.randint(10, 99))
        return ArithObservation(prompt=f"What is {self._state.a} + {self._state.b}? Reply with the number.")

    def step(self, action: ArithAction, timeout_s=None, **kwargs) -> ArithObservation:
        self._state.step_count += 1
        numbers = re.findall(r"-?\d+", action.message)
        right = bool(numbers) and int(numbers[-1]) == self._state.a + self._state.b
        if right:
            return ArithObservation(prompt="Correct.", done=True, reward=1.0 / self._state.step_count)
        done = self._state.step_count >= self.tries
        return ArithObservation(prompt="Not quite: try again." if not done else "Wrong.", done=done, reward=0.0)

    @property
    def state(self) -> ArithState:
        return self._state
