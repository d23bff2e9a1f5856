"""Sandbox, what model code does to itself: it runs, fails, exhausts resources, forks, and runs concurrently;
each case is contained (a non-ok status with a reason) and the machine is unharmed (sandbox_harness.py).

Run as root, every layer of the active mode must be active and each is asserted; some tests run in each mode that
starts here (bwrap, and the namespaces fallback). Limits are small so the suite stays fast. Escapes (files,
network, signals) are in test_sandbox_escapes.py, the attack classes of issue 24 in test_attacks.py (processes) and
test_attacks_reading.py (files, logs, the harness).
"""

import os
import signal
import sys
import threading
import time
from pathlib import Path

import pytest

from llmrl.sandbox import SandboxUnavailable, bwrap, configure, core, run_python

from sandbox_harness import (ACTIVE, BWRAP, MODES, ROOT, lines, machine_unharmed,  # noqa: F401  (an autouse fixture)
                             needs_bwrap, run)

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="the sandbox uses Linux namespaces and /proc")


# ---------------------------------------------------------------- happy paths

@pytest.mark.parametrize("mode", MODES)
def test_prints_exit_code_zero_and_all_layers(mode):
    res = run("import sys\nprint('héllo')\nprint(sys.argv, file=sys.stderr)", mode=mode)
    assert (res.status, res.exit_code, res.stdout, res.reason) == ("ok", 0, "héllo\n", "")
    assert "['main.py']" in res.stderr and res.mode == mode
    assert set(res.layers) == set(core.MODE_LAYERS[mode]) - set(ACTIVE.missing)
    if ROOT:
        assert res.uid is not None and res.uid != 0


def test_stdin_small_and_large():
    res = run("import sys\nprint(sum(int(x) for x in sys.stdin.read().split()))", stdin="1 2\n3\n")
    assert (res.status, res.stdout) == ("ok", "6\n")
    big = "x" * 2_000_000  # larger than a pipe's buffer: written as the child reads
    res = run("import sys\nprint(len(sys.stdin.read()))", stdin=big)
    assert (res.status, res.stdout) == ("ok", "2000000\n")


@pytest.mark.parametrize("mode", MODES)
def test_runs_as_a_fresh_unprivileged_user_in_its_own_directory(mode):
    res = run("import os, json\nprint(json.dumps([os.getuid(), os.geteuid(), os.getgroups(), os.getcwd(),"
              " os.listdir('.'), os.environ['HOME']]))\nopen('scratch.txt', 'w').write('ok')", mode=mode)
    uid, euid, groups, cwd, files, home = lines(res)[0]
    assert res.status == "ok" and files == ["main.py"] and home == cwd
    if mode == "bwrap":
        assert cwd == bwrap.WORKDIR     # a private tmpfs, gone with the namespace
    else:
        assert not Path(cwd).exists()  # removed afterwards
    if ROOT:
        assert uid == euid == res.uid and uid >= 0x71000000 and groups == []
        assert run("print(1)").uid != res.uid  # a fresh uid per run


def test_environment_scrubbed_and_no_inherited_fds(monkeypatch):
    monkeypatch.setenv("LLMRL_TEST_SECRET", "hunter2")
    r, w = os.pipe()
    os.set_inheritable(w, True)
    try:
        res = run("import os, json\nprint(json.dumps([sorted(os.environ), os.listdir('/proc/self/fd')]))")
    finally:
        os.close(r)
        os.close(w)
    env, fds = lines(res)[0]
    pwd = ["PWD"] if BWRAP else []    # bwrap sets it to the work directory
    assert env == sorted(["HOME", "LANG", "PATH", "PYTHONHASHSEED", "PYTHONIOENCODING", "TMPDIR", *pwd])
    assert {int(fd) for fd in fds} <= {0, 1, 2, 3}  # 3: the directory listdir itself opened


# ---------------------------------------------------------------- the code failing on its own

@pytest.mark.parametrize("code, exit_code, reason", [
    ("import sys\nsys.exit(3)", 3, "exit code 3"),
    ("import os\nos._exit(7)", 7, "exit code 7"),
    ("def f(:\n  pass", 1, "SyntaxError"),
    ("x = 'a\0b'\n\0", 1, "null bytes"),
    ("1 / 0", 1, "ZeroDivisionError: division by zero"),
    ("def f(n): return f(n + 1)\nf(0)", 1, "RecursionError"),
])
def test_errors_give_status_error_with_exit_code_and_reason(code, exit_code, reason):
    res = run(code)
    assert (res.status, res.exit_code) == ("error", exit_code)
    assert reason in res.reason


def test_recursion_bomb_with_raised_limit_is_contained():
    res = run("import sys\nsys.setrecursionlimit(10**7)\ndef f(n): return f(n + 1)\nf(0)", memory_mb=64, timeout_s=15)
    assert res.status in ("error", "memory") and res.reason  # frames fill the address space (C stack unused)


# ---------------------------------------------------------------- resources

def test_infinite_loop_times_out():
    t = time.monotonic()
    res = run("while True:\n    pass", timeout_s=1.0)
    assert res.status == "timeout" and "wall-clock timeout after 1 s" in res.reason
    assert time.monotonic() - t < 3.0


def test_without_pidfd_the_exit_is_polled(monkeypatch):
    # kernels before 5.3 (or Pythons without os.pidfd_open): the pump polls for the child's exit instead
    monkeypatch.delattr(os, "pidfd_open", raising=False)
    res = run("import sys\nprint(sys.stdin.read())", stdin="x")
    assert (res.status, res.stdout) == ("ok", "x\n")
    res = run("while True:\n    pass", timeout_s=1.0)
    assert res.status == "timeout"


def test_cpu_limit():
    res = run("while True:\n    pass", timeout_s=20, cpu_s=1)
    assert res.status == "timeout" and "CPU time limit" in res.reason and res.wall_s < 6


@pytest.mark.parametrize("code", ["x = bytearray(10**10)", "x = []\nwhile True:\n    x.append(bytearray(10**6))"])
def test_memory_hog(code):
    res = run(code, memory_mb=200, timeout_s=15)  # a loaded machine is slow to fill it
    assert res.status == "memory" and "MemoryError" in res.reason


@pytest.mark.parametrize("stream", ["stdout", "stderr"])
def test_huge_output_is_cut_and_killed(stream):
    res = run(f"import sys\nwhile True:\n    sys.{stream}.write('x' * 100000)", max_output_bytes=50_000)
    assert res.status == "output_limit" and "output over 50000 bytes" in res.reason
    assert len(res.stdout) + len(res.stderr) == 50_000


FILL = """
for path, size in {targets!r}:
    try:
        with open(path, "wb") as f:
            for _ in range(size):
                f.write(b"x" * (1 << 20))
        print(path, "ok")
    except OSError as e:
        print(path, e.strerror)
"""


def test_file_size_and_disk_limits():
    res = run(FILL.format(targets=[("big", 3)]), max_file_mb=1)
    assert res.status == "ok" and res.stdout == "big File too large\n"
    if not ROOT:
        return
    # the work directory is a tmpfs of disk_mb (main.py is in it too); /tmp and /dev/shm: its own 1 MB tmpfs
    res = run(FILL.format(targets=[("a", 1), ("b", 1), ("c", 1), ("/tmp/fill", 2), ("/dev/shm/fill", 2)]),
              max_file_mb=8, disk_mb=3)
    assert res.status == "ok"
    assert res.stdout.splitlines() == ["a ok", "b ok", "c No space left on device", "/tmp/fill No space left on device",
                                       "/dev/shm/fill No space left on device"]
    assert not Path("/tmp/fill").exists() and not Path("/dev/shm/fill").exists()


# ---------------------------------------------------------------- fork bombs

@pytest.mark.parametrize("mode", MODES)
def test_fork_bomb_is_capped_and_swept(mode):
    res = run("import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass",
              timeout_s=1.5, max_procs=8, mode=mode)
    assert res.status == "timeout"
    # the machine_unharmed fixture checks that no process of the run's uid or PID namespace is left


@pytest.mark.skipif(not ROOT, reason="RLIMIT_NPROC binds only for a non-root uid")
def test_process_limit_holds_for_the_sandbox_uid():
    res = run("import os, time\nn = 0\ntry:\n    while True:\n        if os.fork() == 0:\n"
              "            time.sleep(30)\n            os._exit(0)\n        n += 1\nexcept OSError as e:\n"
              "    print(n, e.errno)", max_procs=6)
    n, errno = map(int, res.stdout.split())
    assert res.status == "ok" and n == 5 and errno == 11  # EAGAIN: 6 processes of the uid, the runner included


@pytest.mark.parametrize("mode", MODES)
def test_children_that_leave_the_process_group_are_killed(mode):
    # each child waits until its grandchild exists before it exits, and the parent reaps each child: so exactly
    # three orphans (in sessions of their own) are alive when the parent ends, however loaded the machine is
    code = ("import os, time\nfor _ in range(3):\n    r, w = os.pipe()\n    pid = os.fork()\n    if pid == 0:\n"
            "        os.setsid()\n        if os.fork() == 0:\n            os.write(w, b'x')\n            time.sleep(60)\n"
            "        os.read(r, 1)\n        os._exit(0)\n    os.waitpid(pid, 0)\nprint('bye')")
    res = run(code, mode=mode)
    assert res.status == "ok" and res.stdout == "bye\n"
    if mode == "namespaces":   # found by the uid sweep; under bwrap the namespace ends with them in it
        assert "killed 3 leftover process(es)" in res.reason
    else:
        assert res.reason == ""


# ---------------------------------------------------------------- robustness

def test_weak_mode_names_the_missing_layers(monkeypatch, caplog):
    from llmrl.sandbox import result
    monkeypatch.setattr(core, "_privileged", lambda: False)
    result._warned.clear()
    res = run("print('still runs')", mode="weak")
    assert (res.status, res.stdout, res.mode) == ("ok", "still runs\n", "weak")
    assert "missing layers" in res.reason and "uid (needs root)" in res.reason and "netns (needs root)" in res.reason
    assert not {"uid", "netns", "mountns", "uid_sweep", "pidns"} & set(res.layers)
    assert {"rlimits", "audit_hook", "process_group", "output_cap"} <= set(res.layers)
    assert any("layers missing" in r.message for r in caplog.records)
    res = run("import socket\nsocket.socket()", mode="weak")
    assert res.status == "error" and "audit hook" in res.reason  # what is left still holds


def test_fail_closed_without_any_layer(monkeypatch, caplog):
    # no bubblewrap and not root: model code is refused, with what is missing and how to get it
    monkeypatch.setattr(core, "_probe", lambda: (None, "bubblewrap (bwrap) is not installed"))
    monkeypatch.setattr(core, "_privileged", lambda: False)
    monkeypatch.setitem(core._policy, "allow_weak", False)
    with pytest.raises(SandboxUnavailable, match="bwrap.*not installed.*apt-get install bubblewrap.*allow_weak"):
        run_python("print(1)")
    assert core.status().mode is None and "NONE" in core.status().describe()
    configure(allow_weak=True)     # the explicit opt-in: rlimits only, with a warning in the log
    st = core.require()
    assert st.mode == "weak" and "WARNING" in st.describe()
    assert any(r.levelname == "WARNING" and "allow_weak" in r.message for r in caplog.records)
    res = run("print(2)")
    assert (res.status, res.stdout, res.mode) == ("ok", "2\n", "weak")


def test_the_python_tool_and_code_tests_refuse_without_a_sandbox(monkeypatch):
    from llmrl.data.tasks import Example
    from llmrl.rewards.code import code_tests
    from llmrl.rollout.tools import python, run_call
    monkeypatch.setattr(core, "_probe", lambda: (None, "bubblewrap (bwrap) is not installed"))
    monkeypatch.setattr(core, "_privileged", lambda: False)
    monkeypatch.setitem(core._policy, "allow_weak", False)
    with pytest.raises(SandboxUnavailable):
        run_call("python", "print(1)", {"python": python})       # not turned into an observation
    with pytest.raises(SandboxUnavailable):
        code_tests(["x = 1"], [Example("", "", {"tests": ["assert x == 1"]})])


def test_concurrent_runs_from_threads():
    results = [None] * 4

    def work(i):
        results[i] = run(f"print({i} * 2)")
    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [(r.status, r.stdout) for r in results] == [("ok", f"{i * 2}\n") for i in range(4)]


def test_bad_arguments_and_sandbox_failures(monkeypatch):
    with pytest.raises(ValueError, match="cannot be disabled"):
        run_python("print(1)", disable=["firewall"])
    with pytest.raises(ValueError, match="unknown mode"):
        run_python("print(1)", mode="chroot")
    if BWRAP:
        with pytest.raises(ValueError, match="cannot be disabled in mode bwrap"):
            run_python("print(1)", disable=["pidns"])
    monkeypatch.setattr(bwrap.subprocess, "Popen", lambda *a, **k: (_ for _ in ()).throw(OSError("no fork")))
    from llmrl.sandbox import fallback
    monkeypatch.setattr(fallback.subprocess, "Popen", lambda *a, **k: (_ for _ in ()).throw(OSError("no fork")))
    res = run_python("print(1)")
    assert res.status == "sandbox_error" and "no fork" in res.reason


def test_signal_names_in_reasons():
    res = run("import os, signal\nos.kill(os.getpid(), signal.SIGSEGV)")
    assert (res.status, res.exit_code) == ("error", -signal.SIGSEGV) and "SIGSEGV" in res.reason
