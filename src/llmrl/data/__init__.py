"""Data: tasks (prompt streams with reference answers and checkers)."""

from llmrl.data.tasks import TASKS, Example, Task, make_task, math_check
from llmrl.data import humaneval  # noqa: F401,E402  (registers the humaneval task)
from llmrl.data import gsm8k  # noqa: F401,E402  (registers the gsm8k task)
from llmrl.envs import tasks as _env_tasks  # noqa: F401,E402  (registers the verifiers and openenv tasks)

__all__ = ["TASKS", "Example", "Task", "make_task", "math_check"]
