"""Rewards: answer extraction, reward functions by name, and their weighted, failure-contained sum."""

from llmrl.rewards import code  # noqa: F401  (registers code_tests)
from llmrl.rewards import learned  # noqa: F401  (registers reward_model, judge, monte_carlo)
from llmrl.rewards.extract import extract_answer
from llmrl.rewards.functions import REWARDS
from llmrl.rewards.score import RewardResult, Term, score

__all__ = ["REWARDS", "RewardResult", "Term", "score", "extract_answer"]
