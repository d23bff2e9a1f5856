"""Credit assignment: how much of an episode's reward each response token gets."""

from llmrl.credit.estimators import CREDIT, Credit, CreditInputs, assign_credit

__all__ = ["CREDIT", "Credit", "CreditInputs", "assign_credit"]
