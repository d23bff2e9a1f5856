"""Sandbox, what model code does to itself: it runs, fails, exhausts resources, forks, and runs concurrently;
each case is contained (a non-ok status with a reason) and the machine is unharmed (sandbox_harness.py).

Run as root, every layer must be active and each is asserted. Limits are small so the suite stays fast. Escapes
(files, network, signals) are in test_sandbox_escapes.py.
"""

import os
import signal
import sys
import threading
import time
from pathlib import Path

import pytest

from llmrl.rewards import sandbox
from llmrl.rewards.sandbox import run_python

from sandbox_harness import ALL, ROOT, lines, machine_unharmed, run  # noqa: F401  (machine_unharmed: an autouse fixture)

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="the sandbox uses Linux namespaces and /proc")


# ---------------------------------------------------------------- happy paths

def test_prints_exit_code_zero_and_all_layers():
    res = run("import sys\nprint('héllo')\nprint(sys.argv, file=sys.stderr)")
    assert (res.status, res.exit_code, res.stdout, res.reason) == ("ok", 0, "héllo\n", "")
    assert "['main.py']" in res.stderr
    assert set(res.layers) == ALL
    if ROOT:
        assert res.uid is not None and res.uid != 0


def test_stdin_small_and_large():
    res = run("import sys\nprint(sum(int(x) for x in sys.stdin.read().split()))", stdin="1 2\n3\n")
    assert (res.status, res.stdout) == ("ok", "6\n")
    big = "x" * 2_000_000  # larger than a pipe's buffer: written as the child reads
    res = run("import sys\nprint(len(sys.stdin.read()))", stdin=big)
    assert (res.status, res.stdout) == ("ok", "2000000\n")


def test_runs_as_a_fresh_unprivileged_user_in_its_own_directory():
    res = run("import os, json\nprint(json.dumps([os.getuid(), os.geteuid(), os.getgroups(), os.getcwd(),"
              " os.listdir('.'), os.environ['HOME']]))\nopen('scratch.txt', 'w').write('ok')")
    uid, euid, groups, cwd, files, home = lines(res)[0]
    assert res.status == "ok" and files == ["main.py"] and home == cwd
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
    assert env == ["HOME", "LANG", "PATH", "PYTHONHASHSEED", "PYTHONIOENCODING", "TMPDIR"]
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
    res = run("import sys\nsys.setrecursionlimit(10**7)\ndef f(n): return f(n + 1)\nf(0)", memory_mb=64)
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
    res = run(code, memory_mb=200)
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

def test_fork_bomb_is_capped_and_swept():
    res = run("import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass",
              timeout_s=1.5, max_procs=8)
    assert res.status == "timeout"
    # the machine_unharmed fixture checks that no process of the run's uid is left


@pytest.mark.skipif(not ROOT, reason="RLIMIT_NPROC binds only for a non-root uid")
def test_process_limit_holds_for_the_sandbox_uid():
    res = run("import os, time\nn = 0\ntry:\n    while True:\n        if os.fork() == 0:\n"
              "            time.sleep(30)\n            os._exit(0)\n        n += 1\nexcept OSError as e:\n"
              "    print(n, e.errno)", max_procs=6)
    n, errno = map(int, res.stdout.split())
    assert res.status == "ok" and n == 5 and errno == 11  # EAGAIN: 6 processes of the uid, the runner included


@pytest.mark.skipif(not ROOT, reason="the sweep needs the uid layer")
def test_children_that_leave_the_process_group_are_swept():
    # each child waits until its grandchild exists before it exits, and the parent reaps each child: so exactly
    # three orphans (in sessions of their own) are alive when the parent ends, however loaded the machine is
    code = ("import os, time\nfor _ in range(3):\n    r, w = os.pipe()\n    pid = os.fork()\n    if pid == 0:\n"
            "        os.setsid()\n        if os.fork() == 0:\n            os.write(w, b'x')\n            time.sleep(60)\n"
            "        os.read(r, 1)\n        os._exit(0)\n    os.waitpid(pid, 0)\nprint('bye')")
    res = run(code)
    assert res.status == "ok" and res.stdout == "bye\n"
    assert "killed 3 leftover process(es)" in res.reason


# ---------------------------------------------------------------- robustness

def test_degraded_mode_names_the_missing_layers(monkeypatch, caplog):
    monkeypatch.setattr(sandbox, "_privileged", lambda: False)
    sandbox._warned.clear()
    res = run("print('still runs')")
    assert (res.status, res.stdout) == ("ok", "still runs\n")
    assert "missing layers" in res.reason and "uid (needs root)" in res.reason and "netns (needs root)" in res.reason
    assert not {"uid", "netns", "mountns", "uid_sweep"} & set(res.layers)
    assert {"rlimits", "audit_hook", "process_group", "output_cap"} <= set(res.layers)
    assert any("layers missing" in r.message for r in caplog.records)
    res = run("import socket\nsocket.socket()")
    assert res.status == "error" and "audit hook" in res.reason  # what is left still holds


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
    with pytest.raises(ValueError, match="unknown layer"):
        run_python("print(1)", disable=["firewall"])
    monkeypatch.setattr(sandbox.subprocess, "Popen", lambda *a, **k: (_ for _ in ()).throw(OSError("no fork")))
    res = run_python("print(1)")
    assert res.status == "sandbox_error" and "no fork" in res.reason


def test_signal_names_in_reasons():
    res = run("import os, signal\nos.kill(os.getpid(), signal.SIGSEGV)")
    assert (res.status, res.exit_code) == ("error", -signal.SIGSEGV) and "SIGSEGV" in res.reason
