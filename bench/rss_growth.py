"""Where the resident set grows over a run: the RSS after each phase of each step of a real GRPO run.

Runs `llmrl.train.rl.train` on bench/compare_trl.py's settings and records the process's RSS after each step's
rollout, reference forward and update (the recipe's own functions, wrapped), then prints each phase's series and
how much each phase added over the run. Extra arguments are config overrides; allocator settings are environment
variables read at process start:

    python bench/rss_growth.py --steps 16
    python bench/rss_growth.py --steps 16 run.retain_heap=false
    ONEDNN_PRIMITIVE_CACHE_CAPACITY=0 python bench/rss_growth.py --steps 16
    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libjemalloc.so.2 python bench/rss_growth.py --steps 16

Prints only (no section in docs/benchmarks.md): it is a probe for an open question (compute/heap.py).
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare_trl import config  # noqa: E402

PHASES = ("rollout", "reference", "update")


def rss_mib() -> int:
    return int(re.search(r"VmRSS:\s+(\d+)", Path("/proc/self/status").read_text()).group(1)) // 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("overrides", nargs="*", help="config overrides, e.g. run.retain_heap=false")
    args = ap.parse_args()

    import llmrl.train.build as build
    import llmrl.train.rl as rl
    import llmrl.train.rules as rules
    import llmrl.train.stages as stages

    trace: dict[str, list[int]] = {p: [] for p in PHASES}

    def recorded(phase, fn, *, skip=lambda kw: False):
        def call(*a, **kw):
            out = fn(*a, **kw)
            if not skip(kw):
                trace[phase].append(rss_mib())
            return out
        return call

    collector = build.make_collector                     # held-out evaluation samples greedily: not a step
    build.make_collector = lambda *a, **kw: recorded("rollout", collector(*a, **kw),
                                                      skip=lambda kw: kw.get("temperature") == 0.0)
    stages.batched_logprobs = recorded("reference", stages.batched_logprobs)   # the native sampler: only the reference
    rules.policy_update = recorded("update", rules.policy_update)
    with tempfile.TemporaryDirectory() as out:
        rl.train(config(args.steps, "rss_growth", f"run.output_dir={out}", "run.progress=false", *args.overrides))
    for phase in PHASES:
        print(f"after each {phase}, MiB:", trace[phase])
    seq = [(p, v) for step in zip(*(trace[p] for p in PHASES)) for p, v in zip(PHASES, step)]   # in run order
    added = dict.fromkeys(PHASES, 0)
    for (_, before), (phase, now) in zip(seq[2:], seq[3:]):       # from the end of step 1 (its AdamW states)
        added[phase] += now - before
    print("MiB added after step 1, by phase:", added)


if __name__ == "__main__":
    main()
