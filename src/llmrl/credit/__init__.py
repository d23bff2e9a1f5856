"""Credit assignment: how much of an episode's reward each response token gets."""

from llmrl.credit.estimators import CREDIT, Credit, CreditInputs, assign_credit
from llmrl.credit.steps import segment_steps, step_boundaries, step_ids_for_batch

__all__ = ["CREDIT", "Credit", "CreditInputs", "assign_credit", "segment_steps", "step_boundaries",
           "step_ids_for_batch"]

from llmrl.registry import import_all  # noqa: E402

import_all(__name__)   # every module of the package: each registers its pieces (a new one is a new file)
