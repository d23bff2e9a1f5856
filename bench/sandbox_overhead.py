"""What running a completion in the sandbox costs: median wall time of a trivial program (`assert 1 + 1 == 2`),
bare, in the sandbox with no optional layer, with every layer, and as one `code_tests` test (the harness plus
the candidate's own interpreter).

    python bench/sandbox_overhead.py --runs 100          # writes its section of docs/benchmarks.md
    python bench/sandbox_overhead.py --runs 5 --no-write  # a quick check
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import markdown_table, write_section  # noqa: E402

from llmrl.data.tasks import Example  # noqa: E402
from llmrl.rewards.code import code_tests  # noqa: E402
from llmrl.rewards.sandbox import LAYERS, _interpreter, _privileged, run_python  # noqa: E402

PROGRAM = "assert 1 + 1 == 2"


def timed(fn, runs: int) -> tuple[float, float]:
    """(median, 90th percentile) seconds of fn() over `runs` calls, after one warm-up call."""
    fn()
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    times.sort()
    return statistics.median(times), times[min(len(times) - 1, int(0.9 * len(times)))]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=100)
    p.add_argument("--no-write", action="store_true", help="print only; leave docs/benchmarks.md alone")
    args = p.parse_args()
    interpreter = _interpreter(_privileged())[0]

    def bare():
        subprocess.run([interpreter, "-s", "-S", "-B", "-c", PROGRAM], check=True)

    def sandboxed(disable=()):
        res = run_python(PROGRAM, disable=disable)
        assert res.status == "ok", res

    example = Example("", "", {"tests": ["assert 1 + 1 == 2"]})

    def as_test():
        assert code_tests(["x = 1"], [example], workers=1) == [1.0]

    optional = [x for x in LAYERS if x not in ("process_group", "output_cap")]
    rows = []
    for name, fn in [("bare interpreter (subprocess.run)", bare),
                     ("run_python, optional layers off", lambda: sandboxed(optional)),
                     ("run_python, all layers", sandboxed),
                     ("code_tests, one assert", as_test)]:
        median, p90 = timed(fn, args.runs)
        rows.append([name, median * 1e3, p90 * 1e3])
        print(f"{name:36s} median {median * 1e3:7.1f} ms   p90 {p90 * 1e3:7.1f} ms", flush=True)
    if args.no_write:
        return
    body = (f"Wall time of `{PROGRAM}` over {args.runs} runs each (after one warm-up), one at a time, with "
            f"`{interpreter}`; as root, so every layer is active in the last two rows (see "
            "`llmrl/rewards/sandbox.py`). `code_tests` adds the harness and the candidate's own interpreter.\n\n")
    body += markdown_table(["what", "median ms", "p90 ms"], rows)
    write_section("sandbox", "Sandbox overhead per completion", body)


if __name__ == "__main__":
    main()
