"""Credit assignment: how much of an episode's reward each response token gets."""

from llmrl.credit.estimators import CREDIT, Credit, CreditInputs, assign_credit
from llmrl.credit.steps import segment_steps, step_boundaries, step_ids_for_batch

__all__ = ["CREDIT", "Credit", "CreditInputs", "assign_credit", "segment_steps", "step_boundaries",
           "step_ids_for_batch"]
