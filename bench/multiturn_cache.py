"""Multi-turn episodes with the KV cache kept across turns (rollout.turn_cache=true, rollout/turns.py) against the
path that re-prefills every turn's whole context (turn_cache=false), on the same config: a shortened
examples/tool_arithmetic.yaml (SmolLM2-135M-Instruct, calculator tool, 4 prompts x 8 samples, up to 3 turns).

    python bench/multiturn_cache.py                   # 3 steps each, new path then old, one process per run
    python bench/multiturn_cache.py --steps 3 --write # ... and rewrite its section of docs/benchmarks.md

Each run is its own process (`llmrl train`), so its peak RSS is its own (ru_maxrss of the process). Reported: the
sum of the training steps' times (rollout, reward, update), the rollout part of it, the held-out evaluations before
and after (the same multi-turn loop, 16 problems, greedy), the process's wall time, and its peak RSS. The two runs
sample differently (bf16 rounding differs between a prefill and a decode step), so their episodes differ.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import machine, markdown_table, write_section  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CHILD = """
import json, resource, sys, time
from llmrl.cli import main
t = time.perf_counter()
rc = main(sys.argv[1:])
print("BENCH " + json.dumps({"rc": rc, "wall": time.perf_counter() - t,
                             "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def run(cache: bool, steps: int, out: str) -> dict:
    name = f"turn_cache_{str(cache).lower()}"
    argv = ["train", str(ROOT / "examples" / "tool_arithmetic.yaml"), f"run.steps={steps}", "run.eval_every=0",
            "task.heldout_size=16", f"rollout.turn_cache={str(cache).lower()}", f"run.output_dir={out}",
            f"run.name={name}", "run.progress=false", "run.resume=never"]
    proc = subprocess.run([sys.executable, "-c", CHILD, *argv], capture_output=True, text=True, cwd=ROOT)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("BENCH ")), None)
    if proc.returncode != 0 or line is None:
        raise SystemExit(f"{name} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    result = json.loads(line[6:])
    rows = [json.loads(x) for x in (Path(out) / name / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["kind"] == "train"]
    evals = [r for r in rows if r["kind"] == "eval"]
    return {**result, "steps": len(train), "step_s": sum(r["time_step"] for r in train),
            "rollout_s": sum(r["time_rollout"] for r in train), "eval_s": sum(r["time_eval"] for r in evals),
            "reward": sum(r["reward"] for r in train) / len(train),
            "tool_calls": sum(r.get("tool_calls", 0) for r in train) / len(train),
            "turns": sum(r.get("turns", 0) for r in train) / len(train),
            "response_length": sum(r["response_length"] for r in train) / len(train)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--write", action="store_true", help="rewrite the section in docs/benchmarks.md")
    args = p.parse_args()
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as out:
        new = run(True, args.steps, out)          # the new path first: a failure shows at once
        old = run(False, args.steps, out)
    load_after = os.getloadavg()
    fmt = lambda r: [f"{r['step_s']:.0f}", f"{r['rollout_s']:.0f}", f"{r['eval_s']:.0f}", f"{r['wall']:.0f}",  # noqa
                     f"{r['peak_rss_mib']:.0f}", f"{r['turns']:.2f}", f"{r['tool_calls']:.2f}",
                     f"{r['response_length']:.1f}"]
    table = markdown_table(["turn_cache", "train steps s", "of which rollout s", "evaluations s", "process wall s",
                            "peak RSS MiB", "turns/row", "tool calls/row", "response tokens"],
                           [["false (re-prefill)", *fmt(old)], ["true (kept cache)", *fmt(new)]])
    speed = old["step_s"] / new["step_s"]
    body = (f"`python bench/multiturn_cache.py --steps {args.steps}` on {datetime.date.today()}, {machine()}. "
            f"Load average (1/5/15 min) {load_before[0]:.1f}/{load_before[1]:.1f}/{load_before[2]:.1f} before, "
            f"{load_after[0]:.1f}/{load_after[1]:.1f}/{load_after[2]:.1f} after: the machine was shared, so the "
            f"times are noisy. Each run is `llmrl train examples/tool_arithmetic.yaml run.steps={args.steps} "
            "task.heldout_size=16 rollout.turn_cache=...` in a process of its own.\n\n"
            f"{table}\n\nTraining steps: {speed:.2f}x faster with the kept cache; rollout "
            f"{old['rollout_s'] / new['rollout_s']:.2f}x; whole process {old['wall'] / new['wall']:.2f}x; peak RSS "
            f"{new['peak_rss_mib'] / old['peak_rss_mib']:.2f}x.")
    print(body)
    if args.write:
        write_section("multiturn_cache", "Multi-turn episodes: the KV cache kept across turns", body)


if __name__ == "__main__":
    main()
