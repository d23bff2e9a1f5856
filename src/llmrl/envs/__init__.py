"""Environments written for other frameworks (verifiers, OpenEnv), run in-process through llmrl's multi-turn loop:
`task.name: verifiers | openenv` (envs/tasks.py), episodes in envs/episodes.py."""

from llmrl.envs import tasks as _tasks  # noqa: E402,F401  (registers the verifiers and openenv tasks)
