"""Standard evaluations: named suites (gsm8k, humaneval, bfcl, arithmetic, reasoning_gym:<dataset>) run on a model,
scored as pass@k / maj@k, with a decontamination check against a training stream. `llmrl eval --suite ...`."""

from llmrl.evals.suites import SUITES, Suite, make_suite

__all__ = ["SUITES", "Suite", "make_suite"]

from llmrl.registry import import_all  # noqa: E402

import_all(__name__)   # each module registers its suites (bfcl.py: bfcl)
