"""What running a completion in the sandbox costs: median wall time of a trivial program (`assert 1 + 1 == 2`),
bare, through `run_python` in each sandbox mode that starts here (bwrap with every layer, bwrap without its
cgroup, the namespaces fallback), and as one `code_tests` test (the harness plus the candidate's own interpreter,
in the active mode). The machine's load average is measured before and after: the figures mean little on a busy
machine.

    python bench/sandbox_overhead.py --runs 100          # writes its section of docs/benchmarks.md
    python bench/sandbox_overhead.py --runs 5 --no-write  # a quick check
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import markdown_table, timed, write_section  # noqa: E402

from llmrl.data.tasks import Example  # noqa: E402
from llmrl.rewards.code import code_tests  # noqa: E402
from llmrl.sandbox import bwrap, run_python, status  # noqa: E402

PROGRAM = "assert 1 + 1 == 2"
TARGETS = {"run_python": 40.0, "code_tests": 70.0}   # ms, medians (issue 24)


def cases(mode: str | None) -> list[tuple[str, object]]:
    interpreter = bwrap.interpreter()

    def bare():
        subprocess.run([interpreter, "-s", "-S", "-B", "-c", PROGRAM], check=True)

    def sandboxed(mode, disable=()):
        res = run_python(PROGRAM, mode=mode, disable=disable)
        assert res.status == "ok", res

    example = Example("", "", {"tests": ["assert 1 + 1 == 2"]})

    def as_test():
        assert code_tests(["x = 1"], [example], workers=1) == [1.0]

    out = [("bare interpreter (subprocess.run)", bare)]
    if mode == "bwrap":
        out += [("run_python, bwrap (every layer)", lambda: sandboxed("bwrap")),
                ("run_python, bwrap without its cgroup", lambda: sandboxed("bwrap", ("cgroup",)))]
    if os.geteuid() == 0:
        out.append(("run_python, namespaces fallback", lambda: sandboxed("namespaces")))
    return out + [(f"code_tests, one assert ({mode})", as_test)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=100)
    p.add_argument("--no-write", action="store_true", help="print only; leave docs/benchmarks.md alone")
    args = p.parse_args()
    st = status()
    if st.mode is None:
        sys.exit(st.describe())
    load_before = os.getloadavg()
    rows = []
    for name, fn in cases(st.mode):
        median, p90 = timed(fn, args.runs)
        ratio = median * 1e3 / rows[0][1] if rows else 1.0       # the first case is the bare interpreter
        rows.append([name, median * 1e3, p90 * 1e3, ratio])
        print(f"{name:40s} median {median * 1e3:7.1f} ms   p90 {p90 * 1e3:7.1f} ms   {ratio:5.2f}x bare", flush=True)
    load_after = os.getloadavg()
    cores = os.cpu_count()
    busy = max(load_before[0], load_after[0]) > 0.5 * cores
    load = (f"Load average (1 min) {load_before[0]:.2f} before and {load_after[0]:.2f} after, on {cores} cores: "
            + ("a busy machine (other work shared the cores), so these are upper bounds." if busy else
               "a quiet machine."))
    print(load)
    if args.no_write:
        return
    body = (f"Wall time of `{PROGRAM}` over {args.runs} runs each (after one warm-up), one at a time, with "
            f"`{bwrap.interpreter()}`; as root, in the `{st.mode}` layer (`llmrl doctor`: "
            f"{', '.join(st.layers)}). `code_tests` adds the harness and the candidate's own interpreter. "
            f"Targets (issue 24): at most {TARGETS['run_python']:g} ms per `run_python` and "
            f"{TARGETS['code_tests']:g} ms per one-assert `code_tests` sample. {load} The last column (the median "
            "over the bare interpreter's, measured in the same run) moves less with the load than the times do.\n\n")
    body += markdown_table(["what", "median ms", "p90 ms", "median / bare interpreter"], rows)
    write_section("sandbox", "Sandbox overhead per completion", body)


if __name__ == "__main__":
    main()
