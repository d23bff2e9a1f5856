"""Sandbox, what model code tries against the machine: files outside its directory, the network, signals to
other processes. Each attempt fails with a reason and the machine is unharmed (sandbox_harness.py); some attacks
are also run with one layer off to show the next one holds.
"""

import os
import signal
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest


from sandbox_harness import ROOT, machine_unharmed, outside, run  # noqa: F401  (machine_unharmed: an autouse fixture)

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="the sandbox uses Linux namespaces and /proc")


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

