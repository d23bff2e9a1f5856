"""Environments written for other frameworks (verifiers, OpenEnv), run in-process through llmrl's multi-turn loop:
`task.name: verifiers | openenv` (envs/tasks.py), episodes in envs/episodes.py."""
