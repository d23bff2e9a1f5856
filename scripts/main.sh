#!/usr/bin/env bash
# The main job: set up, then a real GRPO run on SmolLM2-135M-Instruct (2-digit addition), with a before/after table.
# Extra arguments are config overrides, e.g.  bash scripts/main.sh run.steps=10
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/llmrl train examples/main_arithmetic.yaml "$@"
