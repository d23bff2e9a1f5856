#!/usr/bin/env bash
# The published eval table (docs/benchmarks.md): SmolLM2-135M-Instruct on the standard suites, greedy pass@1, with
# the limits below (a shared 2-core CPU could not run the full sets in one session), then the README's main job
# (examples/main_arithmetic.yaml) and the same suites on its weights, then the same after a GSM8K run.
#   bash bench/eval_table.sh            # the limits below
#   FULL=1 bash bench/eval_table.sh     # every problem: arithmetic 200, bfcl 2351, humaneval 164, gsm8k 1319
set -euo pipefail
cd "$(dirname "$0")/.."
L=.venv/bin/llmrl
OUT=${OUT:-runs/eval_table}
mkdir -p "$OUT"
lim() { [ -n "${FULL:-}" ] && echo "" || echo "--limit $1"; }
suites() {   # MODEL PREFIX: one suite at a time, each to its own JSON
  $L eval --model "$1" --suite arithmetic $(lim 200) --batch-size 32 --threads 2 --no-progress --out "$2.json"
  $L eval --model "$1" --suite bfcl $(lim 80) --batch-size 32 --threads 2 --no-progress --out "$2.json"
  $L eval --model "$1" --suite gsm8k $(lim 50) --batch-size 25 --threads 1 --no-progress --out "$2_gsm8k.json"
  $L eval --model "$1" --suite humaneval $(lim 41) --batch-size 21 --threads 1 --no-progress --out "$2_humaneval.json"
}
suites smollm2-135m-instruct "$OUT/base"
[ -d runs/main_arithmetic/final ] || $L train examples/main_arithmetic.yaml run.eval_every=0 run.progress=false
suites runs/main_arithmetic "$OUT/main_arithmetic"
# a GSM8K run: the example's settings for 20 training minutes
[ -d runs/gsm8k_run/final ] || $L train examples/gsm8k.yaml run.name=gsm8k_run run.time_limit_minutes=20 \
  run.eval_every=0 run.progress=false
suites runs/gsm8k_run "$OUT/gsm8k_run"
