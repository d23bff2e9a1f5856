"""The four attack classes of issue 24, written as a hostile model would write them, and what contains each:

1. a survivor the uid sweep did not see (a setsid'd child whose thread-group leader called SYS_exit while another
   thread runs shows as Z): bwrap ends the run's PID namespace; the namespaces fallback now sees zombie leaders;
2. the cleanup helper as a way out (ptrace it, enter /proc/<helper>/root, SIGSTOP it): there is no helper, and no
   process outside the run is visible; seccomp denies ptrace and process_vm_readv even within;
3.-4. reading what it should not, and forged log lines: test_attacks_reading.py.

Plus: no process of a run survives the call (checked by PID namespace and cgroup, not by uid), and no candidate
stalls the trainer past its wall limit plus a small margin. The machine_unharmed fixture also checks every test.
"""

import json
import os
import platform
import subprocess
import sys
import threading
import time

import pytest

from llmrl.sandbox import procs
from llmrl.sandbox.cgroup import parent_dir

from sandbox_harness import (MODES, machine_unharmed, needs_bwrap, needs_root, run,  # noqa: F401  (autouse fixture)
                             run_cgroups)

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="the sandbox uses Linux namespaces and /proc")
SYS_EXIT = {"x86_64": 60, "aarch64": 93}.get(platform.machine())


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
