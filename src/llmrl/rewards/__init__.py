"""Rewards: answer extraction, reward functions by name, and their weighted, failure-contained sum."""

from llmrl.rewards.extract import extract_answer
from llmrl.rewards.functions import REWARDS
from llmrl.rewards.score import RewardResult, score

__all__ = ["REWARDS", "RewardResult", "score", "extract_answer"]
