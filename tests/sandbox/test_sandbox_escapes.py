"""Sandbox, what model code tries against the machine: files outside its directory, the network, signals to
other processes. Each attempt fails with a reason and the machine is unharmed (sandbox_harness.py); some attacks
are run in each mode that starts here (bwrap, namespaces), and some with one layer off to show the next one holds.
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


from sandbox_harness import (BWRAP, MODES, ROOT, machine_unharmed, outside,  # noqa: F401  (autouse fixture)
                             run)

# (mode, layers off) to run the file attacks with: each mode, and the namespaces fallback without its mount namespace
FILE_SETUPS = [(m, ()) for m in MODES] + ([("namespaces", ("mountns",))] if ROOT else [])

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


@pytest.mark.parametrize("mode, off", FILE_SETUPS)
def test_cannot_write_or_delete_outside(outside, mode, off):
    res = run(WRITE_OUTSIDE.format(d=str(outside)), mode=mode, disable=off)
    assert res.status == "ok" and "DONE" not in res.stdout
    if ROOT:  # mountns: /tmp is the sandbox's own, the directory is not even there; without it: the uid
        expected = "FileNotFoundError" if not off else "PermissionError"
        assert res.stdout.split()[1::2] == [expected] * 5


@pytest.mark.parametrize("mode, off", FILE_SETUPS)
def test_cannot_read_the_users_home_or_private_files(mode, off):
    secret_dir = Path(tempfile.mkdtemp(prefix="llmrl-secret-"))  # mode 0700, like a home directory
    (secret_dir / "key").write_text("hunter2")
    try:
        targets = [str(secret_dir / "key"), str(Path.home() / ".bashrc"), str(Path.home())]
        code = (f"import os\nfor p in {targets!r}:\n    try:\n        print(open(p).read() if os.path.isfile(p) "
                "else os.listdir(p))\n    except OSError as e:\n        print(type(e).__name__)")
        res = run(code, mode=mode, disable=off)
    finally:
        (secret_dir / "key").unlink()
        secret_dir.rmdir()
    assert res.status == "ok" and "hunter2" not in res.stdout
    if ROOT and Path.home() == Path("/root") and Path("/root/.bashrc").exists():
        # mountns: the secret's /tmp is the sandbox's own and home is hidden (bwrap: only what leads to the
        # interpreter, when it lives there); without it, the uid (mode 0700)
        home = [p.name for p in Path.home().iterdir() if Path(sys.executable).resolve().is_relative_to(p)]
        listing = str(home).replace(" ", "") if mode == "bwrap" else "[]"
        expected = ["FileNotFoundError", "FileNotFoundError", listing] if not off else ["PermissionError"] * 3
        assert res.stdout.split() == expected


@pytest.mark.skipif(not ROOT, reason="hiding needs the mount namespace")
@pytest.mark.parametrize("mode", MODES)
def test_the_trainers_code_data_and_packages_are_hidden(mode):
    package_file = pytest.__file__  # in the trainer's site-packages, world-readable on the machine
    # the project folder reads as empty (hidden under an empty mount) or as absent (it lives under /tmp, which
    # the sandbox replaces with its own tmpfs), depending on where the checkout is
    code = (f"import os\ntry:\n    print(os.listdir({os.getcwd()!r}))\nexcept OSError as e:\n    print(type(e).__name__)\n"
            f"try:\n    open({package_file!r})\n    print('read')\nexcept OSError as e:\n    print(type(e).__name__)")
    res = run(code, mode=mode)
    assert res.status == "ok" and res.stdout in ("[]\nFileNotFoundError\n", "FileNotFoundError\nFileNotFoundError\n")
    if mode == "namespaces" and not package_file.startswith("/tmp/"):  # under /tmp: out of reach anyway
        res = run(code, mode=mode, hide=[])  # nothing hidden: the uid alone does not stop reading them
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


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("off, stopped_by", [((), "audit hook"), (("audit_hook",), "Network is unreachable"),
                                             (("netns",), "audit hook")])
def test_no_network(listener, mode, off, stopped_by):
    port, accepted = listener
    res = run(NET.format(port=port), mode=mode, disable=off)
    out = res.stdout.splitlines()
    assert res.status == "ok" and len(out) == 2 and "CONNECTED" not in res.stdout
    if mode == "bwrap" and "audit_hook" in off:   # bwrap brings up the namespace's own, empty loopback
        assert "Connection refused" in out[0] and stopped_by in out[1]
    else:
        assert all(stopped_by in line for line in out)
    time.sleep(0.2)
    assert accepted == []


# ---------------------------------------------------------------- signals

def _confined_or_skip(mode):
    """The next attacks send real SIGKILLs: run them only where a PID namespace or the uid layer confines them to
    the sandbox (as root with neither, kill(-1) would kill every process on the machine but init)."""
    if not {"pidns", "uid"} & set(run("pass", mode=mode).layers):
        pytest.skip("without a PID namespace or the uid layer these signals could reach our own processes")


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


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("off", [(), ("audit_hook",)])  # the audit hook stops them first; without it, the uid
def test_cannot_kill_its_parent_or_anything_else(mode, off):
    _confined_or_skip(mode)
    res = run(KILLS, mode=mode, disable=off)
    # bwrap: the parent is the namespace's PID 1 (root), whose process group is outside the namespace
    group = "ProcessLookupError" if mode == "bwrap" else "PermissionError"
    assert res.status == "ok"
    assert res.stdout.splitlines() == ["parent PermissionError", f"parent group {group}",
                                       "init PermissionError", "setuid root PermissionError"]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("off", [(), ("audit_hook",)])
def test_kill_everything_reaches_nothing_outside(mode, off):
    # namespaces: as the run's own uid, kill(-1) reaches only the run's processes (the caller excluded); the
    # kernel reports success when a process it may not signal exists. bwrap: in its PID namespace there is no
    # other process to reach (PID 1 is exempt), so the kernel says ESRCH. The fixture checks that we survived.
    _confined_or_skip(mode)
    outcome = "PermissionError" if not off else "ProcessLookupError" if mode == "bwrap" else "sent"
    res = run("import os, signal\ntry:\n    os.kill(-1, signal.SIGKILL)\n    print('sent')\nexcept OSError as e:\n"
              "    print(type(e).__name__)\nprint('alive')", mode=mode, disable=off)
    assert (res.status, res.stdout) == ("ok", f"{outcome}\nalive\n")


def test_killing_itself_is_status_killed():
    res = run("import os, signal\nos.killpg(0, signal.SIGKILL)")
    assert (res.status, res.exit_code) == ("killed", -signal.SIGKILL)

