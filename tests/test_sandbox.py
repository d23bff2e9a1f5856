"""Sandbox: each attack is contained (a non-ok status or a failed attempt, with a reason), and the machine is
unharmed: the test process lives, a canary file outside stays as it was, no process of the run is left.

Run as root, every layer must be active and each is asserted; some attacks are also run with one layer off to
show the next one holds. Limits are small so the suite stays fast.
"""

import json
import os
import signal
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from llmrl.rewards import sandbox, sandbox_procs
from llmrl.rewards.sandbox import LAYERS, run_python

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="the sandbox uses Linux namespaces and /proc")
ROOT = os.geteuid() == 0
ALL = set(LAYERS) if ROOT else {"rlimits", "no_new_privs", "audit_hook", "process_group", "output_cap"}
_uids: list[int] = []


def _children() -> list[int]:
    """Live child processes of the test process."""
    me, kids = str(os.getpid()), []
    for entry in os.scandir("/proc"):
        try:
            status = Path(f"/proc/{entry.name}/status").read_text() if entry.name.isdigit() else ""
        except OSError:
            continue
        fields = dict(line.split(":\t", 1) for line in status.splitlines() if ":\t" in line)
        if fields.get("PPid", "").strip() == me and not fields.get("State", "").startswith("Z"):
            kids.append(int(entry.name))
    return kids


def run(code: str, **kw) -> sandbox.SandboxResult:
    kw.setdefault("timeout_s", 2.0)
    res = run_python(code, **kw)
    if res.uid is not None:
        _uids.append(res.uid)
    return res


@pytest.fixture
def outside():
    """A directory outside the sandbox, world-readable, with a canary file the sandbox must not touch."""
    d = Path(tempfile.mkdtemp(prefix="llmrl-outside-"))
    d.chmod(0o755)
    (d / "canary.txt").write_text("canary")
    (d / "canary.txt").chmod(0o644)
    yield d
    assert (d / "canary.txt").read_text() == "canary"
    assert sorted(p.name for p in d.iterdir()) == ["canary.txt"]
    (d / "canary.txt").unlink()
    d.rmdir()


@pytest.fixture(autouse=True)
def machine_unharmed():
    _uids.clear()
    before = _children()
    yield
    os.kill(os.getpid(), 0)  # alive
    assert _children() == before, "a sandboxed process outlived its run"
    for uid in _uids:
        assert sandbox_procs.pids_of(uid) == [], f"processes of sandbox uid {uid} survived"


def lines(res) -> list:
    return [json.loads(line) for line in res.stdout.splitlines()]


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


# ---------------------------------------------------------------- files

WRITE_OUTSIDE = """
import os, sys
d = sys.argv_dir = {d!r}
for what, act in [("create", lambda: open(d + "/evil.txt", "w").write("x")),
                  ("append", lambda: open(d + "/canary.txt", "a").write("x")),
                  ("delete", lambda: os.remove(d + "/canary.txt")),
                  ("rename", lambda: os.rename(d + "/canary.txt", d + "/moved.txt")),
                  ("chmod", lambda: os.chmod(d + "/canary.txt", 0o777))]:
    try:
        act()
        print(what, "DONE")
    except OSError as e:
        print(what, type(e).__name__)
"""


@pytest.mark.parametrize("off", [(), ("mountns",)])
def test_cannot_write_or_delete_outside(outside, off):
    res = run(WRITE_OUTSIDE.format(d=str(outside)), disable=off)
    assert res.status == "ok" and "DONE" not in res.stdout
    if ROOT:  # mountns: /tmp is the sandbox's own, the directory is not even there; without it: the uid
        expected = "FileNotFoundError" if not off else "PermissionError"
        assert res.stdout.split()[1::2] == [expected] * 5


@pytest.mark.parametrize("off", [(), ("mountns",)])
def test_cannot_read_the_users_home_or_private_files(off):
    secret_dir = Path(tempfile.mkdtemp(prefix="llmrl-secret-"))  # mode 0700, like a home directory
    (secret_dir / "key").write_text("hunter2")
    try:
        targets = [str(secret_dir / "key"), str(Path.home() / ".bashrc"), str(Path.home())]
        code = (f"import os\nfor p in {targets!r}:\n    try:\n        print(open(p).read() if os.path.isfile(p) "
                "else os.listdir(p))\n    except OSError as e:\n        print(type(e).__name__)")
        res = run(code, disable=off)
    finally:
        (secret_dir / "key").unlink()
        secret_dir.rmdir()
    assert res.status == "ok" and "hunter2" not in res.stdout
    if ROOT and Path.home() == Path("/root") and Path("/root/.bashrc").exists():
        # mountns: the secret's /tmp is the sandbox's own and home is hidden; without it, the uid (mode 0700)
        expected = ["FileNotFoundError", "FileNotFoundError", "[]"] if not off else ["PermissionError"] * 3
        assert res.stdout.split() == expected


@pytest.mark.skipif(not ROOT, reason="hiding needs the mount namespace")
def test_the_trainers_code_data_and_packages_are_hidden():
    package_file = pytest.__file__  # in the trainer's site-packages, world-readable on the machine
    # the project folder reads as empty (hidden under an empty mount) or as absent (it lives under /tmp, which
    # the sandbox replaces with its own tmpfs), depending on where the checkout is
    code = (f"import os\ntry:\n    print(os.listdir({os.getcwd()!r}))\nexcept OSError as e:\n    print(type(e).__name__)\n"
            f"try:\n    open({package_file!r})\n    print('read')\nexcept OSError as e:\n    print(type(e).__name__)")
    res = run(code)
    assert res.status == "ok" and res.stdout in ("[]\nFileNotFoundError\n", "FileNotFoundError\nFileNotFoundError\n")
    if not package_file.startswith("/tmp/"):   # under /tmp it is out of reach anyway (the sandbox's own tmpfs)
        res = run(code, hide=[])  # nothing hidden: the uid alone does not stop reading world-readable files
        assert res.stdout.endswith("read\n")


# ---------------------------------------------------------------- network

@pytest.fixture
def listener():
    """A TCP server on 127.0.0.1 that records any connection."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen()
    srv.settimeout(0.1)
    accepted, stop = [], threading.Event()

    def serve():
        while not stop.is_set():
            try:
                accepted.append(srv.accept())
            except OSError:
                pass
    t = threading.Thread(target=serve, daemon=True)
    t.start()
    yield srv.getsockname()[1], accepted
    stop.set()
    t.join()
    srv.close()


NET = """
import socket
for host, port in [("127.0.0.1", {port}), ("1.1.1.1", 53)]:
    try:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.settimeout(1)
        s.connect((host, port))
        print(host, "CONNECTED")
    except OSError as e:
        print(host, e)
"""


@pytest.mark.parametrize("off, stopped_by", [((), "audit hook"), (("audit_hook",), "Network is unreachable"),
                                             (("netns",), "audit hook")])
def test_no_network(listener, off, stopped_by):
    port, accepted = listener
    if "audit_hook" in off and not ROOT:
        pytest.skip("without root there is no network namespace behind the audit hook")
    res = run(NET.format(port=port), disable=off)
    out = res.stdout.splitlines()
    assert res.status == "ok" and len(out) == 2 and "CONNECTED" not in res.stdout
    assert all(stopped_by in line for line in out)
    time.sleep(0.2)
    assert accepted == []


# ---------------------------------------------------------------- signals

def _uid_layer_or_skip():
    """The next attacks send real SIGKILLs: run them only where the uid layer confines them to the sandbox (as
    root with the uid layer off, kill(-1) would kill every process on the machine but init)."""
    if "uid" not in run("pass").layers:
        pytest.skip("without the uid layer these signals could reach our own processes")


KILLS = """
import os, signal
attempts = [("parent", lambda: os.kill(os.getppid(), signal.SIGKILL)),
            ("parent group", lambda: os.killpg(os.getpgid(os.getppid()), signal.SIGKILL)),
            ("init", lambda: os.kill(1, signal.SIGKILL)),
            ("setuid root", lambda: os.setuid(0))]
for name, act in attempts:
    try:
        act()
        print(name, "DONE")
    except OSError as e:
        print(name, type(e).__name__)
"""


@pytest.mark.parametrize("off", [(), ("audit_hook",)])  # the audit hook stops them first; without it, the uid
def test_cannot_kill_its_parent_or_anything_else(off):
    _uid_layer_or_skip()
    res = run(KILLS, disable=off)
    assert res.status == "ok"
    assert res.stdout.splitlines() == ["parent PermissionError", "parent group PermissionError",
                                       "init PermissionError", "setuid root PermissionError"]


@pytest.mark.parametrize("off, outcome", [((), "PermissionError"), (("audit_hook",), "sent")])
def test_kill_everything_reaches_nothing_outside(off, outcome):
    # as the run's own uid, kill(-1) reaches only the run's processes (the caller excluded); the kernel reports
    # success when a process it may not signal exists. The fixture checks that the test process survived.
    _uid_layer_or_skip()
    res = run("import os, signal\ntry:\n    os.kill(-1, signal.SIGKILL)\n    print('sent')\nexcept OSError as e:\n"
              "    print(type(e).__name__)\nprint('alive')", disable=off)
    assert (res.status, res.stdout) == ("ok", f"{outcome}\nalive\n")


def test_killing_itself_is_status_killed():
    res = run("import os, signal\nos.killpg(0, signal.SIGKILL)")
    assert (res.status, res.exit_code) == ("killed", -signal.SIGKILL)


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
