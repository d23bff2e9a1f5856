"""Rewards: answer extraction, reward functions by name, and their weighted, failure-contained sum."""

from llmrl.rewards.extract import extract_answer
from llmrl.rewards.functions import REWARDS
from llmrl.rewards.score import RewardResult, Term, score

__all__ = ["REWARDS", "RewardResult", "Term", "score", "extract_answer"]

from llmrl.registry import import_all  # noqa: E402

import_all(__name__)   # every module of the package: each registers its pieces (a new one is a new file)
