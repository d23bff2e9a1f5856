"""Data: tasks (prompt streams with reference answers and checkers)."""

from llmrl.data.tasks import TASKS, Example, Task, make_task, math_check

__all__ = ["TASKS", "Example", "Task", "make_task", "math_check"]
