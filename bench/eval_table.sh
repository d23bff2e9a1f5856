#!/usr/bin/env bash
# The published eval table (docs/benchmarks.md): SmolLM2-135M-Instruct before training, and after the README's
# main job (examples/main_arithmetic.yaml), on the standard suites, greedy pass@1.
#   bash bench/eval_table.sh                 # LIMITS below (a 2-core CPU cannot run the full sets in a session)
#   FULL=1 bash bench/eval_table.sh          # every problem: gsm8k 1319, humaneval 164, bfcl 2351, arithmetic 200
set -euo pipefail
cd "$(dirname "$0")/.."
L=.venv/bin/llmrl
OUT=${OUT:-runs/eval_table}
mkdir -p "$OUT"
lim() { [ -n "${FULL:-}" ] && echo "" || echo "--limit $1"; }
suites() {   # MODEL RESULTS_JSON: one suite at a time, each written to the JSON as it ends
  for s in "arithmetic:200" "bfcl:160" "humaneval:82" "gsm8k:100"; do
    $L eval --model "$1" --suite "${s%%:*}" $(lim "${s##*:}") --batch-size 32 --threads 2 --no-progress --out "$2"
  done
}
suites smollm2-135m-instruct "$OUT/base.json"
[ -d runs/main_arithmetic/final ] || $L train examples/main_arithmetic.yaml run.eval_every=0 run.progress=false
suites runs/main_arithmetic "$OUT/main_arithmetic.json"
$L eval --compare "$OUT/base.json" "$OUT/main_arithmetic.json"
