"""Data: tasks (prompt streams with reference answers and checkers)."""

from llmrl.data.tasks import TASKS, Example, Task, make_task, math_check

__all__ = ["TASKS", "Example", "Task", "make_task", "math_check"]

from llmrl.registry import import_all  # noqa: E402

import_all(__name__)   # every module of the package: each registers its pieces (a new one is a new file)
