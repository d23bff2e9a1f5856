"""A small multi-turn environment written for verifiers (v1 API, `import verifiers.v1 as vf`), vendored here so it
runs offline: a taskset (the secret numbers) and an Env whose episode is a guessing game. The model guesses a number
from 1 to 20; the environment answers "Higher." or "Lower." until it is found or the guesses run out. The reward is
the task's own `@vf.reward`, read from the trace: 1 if some reply of the model names the secret, else 0.

Loaded the way verifiers loads a taskset (an importable module exporting its Taskset and Env subclasses through
`__all__`); in llmrl: `task: {name: verifiers, options: {env: examples/envs/vf_guess_number.py}}`.
"""

import random
import re

import verifiers.v1 as vf

__all__ = ["GuessTaskset", "GuessEnv"]

PROMPT = ("I picked a whole number from 1 to 20. Guess it: reply with one number only. I will say Higher or Lower. "
          "You have {tries} guesses.")


class GuessData(vf.TaskData):
    secret: int


def guessed(text: str) -> int | None:
    numbers = re.findall(r"-?\d+", text)
    return int(numbers[-1]) if numbers else None


class GuessTask(vf.Task[GuessData, vf.State, vf.TaskConfig]):
    @vf.reward
    async def found(self, task: GuessData, trace: vf.Trace) -> float:
        return 1.0 if any(guessed(m.content or "") == task.secret for m in trace.assistant_messages) else 0.0


class GuessTasksetConfig(vf.TasksetConfig):
    size: int = 200
    tries: int = 3


class GuessTaskset(vf.Taskset[GuessTask, GuessTasksetConfig]):
    def load(self):
        rng = random.Random(0)
        for i in range(self.config.size):
            secret = rng.randint(1, 20)
            yield GuessTask(GuessData(id=f"guess-{i}", prompt=PROMPT.format(tries=self.config.tries), secret=secret))


class GuessEnvConfig(vf.EnvConfig):
    agent: vf.AgentConfig = vf.AgentConfig()
    tries: int = 3


class GuessEnv(vf.Env[GuessEnvConfig]):
    async def run(self, task, agents):
        async with agents.agent.interaction(task) as game:
            segment = await game.turn()                       # a prompted task speaks first: the first guess
            for _ in range(self.config.tries - 1):
                if segment.terminated:
                    return
                guess = guessed(segment.last_reply)
                if guess == task.data.secret:
                    return
                hint = "Reply with one number." if guess is None else ("Higher." if guess < task.data.secret
                                                                          else "Lower.")
                segment = await game.turn(hint)
