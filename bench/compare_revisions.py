"""Is a refactor slower? The llmrl arm of bench/compare_trl.py (its default GRPO step on SmolLM2-135M-Instruct,
the settings of the TRL comparison) run with two checkouts' code, in the order A B B A A B ... so that a machine's
drift hits both alike. Each run is the checkout's own `bench/compare_trl.py --worker llmrl_bf16` in a subprocess with
that checkout's `src` on PYTHONPATH: seconds per step (median after a warm-up step) and peak RSS.

    git worktree add /tmp/old 0b2017c
    python bench/compare_revisions.py /tmp/old . --rounds 3 --steps 11     # writes the "revisions" section
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import machine, markdown_table, write_section  # noqa: E402


def run_arm(checkout: Path, steps: int) -> dict:
    """One llmrl_bf16 run of `checkout`'s compare_trl.py worker: {step_s, tokens_per_s, peak_rss_mib, ...}."""
    with tempfile.TemporaryDirectory() as out:
        env = {**os.environ, "PYTHONPATH": str(checkout / "src")}
        subprocess.run([sys.executable, str(checkout / "bench" / "compare_trl.py"), "--worker", "llmrl_bf16",
                        "--steps", str(steps), "--out-dir", out], cwd=checkout, env=env, check=True,
                       capture_output=True, text=True)
        return json.loads((Path(out) / "llmrl_bf16.json").read_text())


def git_rev(checkout: Path) -> str:
    return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=checkout, capture_output=True,
                          text=True).stdout.strip() or str(checkout)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("a", type=Path, help="the first checkout (e.g. the code before a refactor)")
    p.add_argument("b", type=Path, help="the second checkout")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=11, help="steps per run (the first is warm-up)")
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args()
    a, b = args.a.resolve(), args.b.resolve()
    runs: dict[Path, list[dict]] = {a: [], b: []}
    for r in range(args.rounds):
        for checkout in ((a, b) if r % 2 == 0 else (b, a)):     # A B B A ...: a drifting machine hits both alike
            runs[checkout].append(run_arm(checkout, args.steps))
            print(f"round {r + 1} {git_rev(checkout)}: {runs[checkout][-1]['step_s']:.2f} s/step, "
                  f"{runs[checkout][-1]['peak_rss_mib']:.0f} MiB", flush=True)
    med = {c: (statistics.median(x["step_s"] for x in v), statistics.median(x["peak_rss_mib"] for x in v))
           for c, v in runs.items()}
    rows = [[git_rev(c), " ".join(f"{x['step_s']:.2f}" for x in runs[c]), f"{med[c][0]:.2f}", f"{med[c][1]:.0f}"]
            for c in (a, b)]
    body = (f"{machine()}\n\nThe llmrl arm of `bench/compare_trl.py` (default GRPO step, SmolLM2-135M-Instruct, "
            f"{args.steps} steps, the first a warm-up) with each checkout's code, alternating, {args.rounds} rounds.\n\n"
            + markdown_table(["code", "s/step each round", "median s/step", "median peak RSS MiB"], rows)
            + f"\n\nStep time {git_rev(b)} / {git_rev(a)}: {med[b][0] / med[a][0]:.3f}x; "
              f"peak RSS: {med[b][1] / med[a][1]:.3f}x.\n")
    print(body)
    if not args.no_write:
        write_section("revisions", "Refactor check: step time before and after (performance)", body)


if __name__ == "__main__":
    main()
