"""Objectives: policy losses (one registry, one signature), KL estimators and controllers, value losses, TRPO,
mismatch corrections. Every module here is imported, so a new objective registers by being a file here."""

from llmrl.registry import import_all  # noqa: E402

import_all(__name__)   # every module of the package: each registers its pieces (a new one is a new file)
