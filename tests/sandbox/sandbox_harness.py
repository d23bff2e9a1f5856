"""The sandbox tests' harness: `run` (remembers the uids and PID namespaces a test's runs used), the autouse check
that the machine is unharmed after every test (the test process lives; no child of it, no process of a sandbox
uid, no process in a run's PID namespace and no run cgroup is left), the `outside` directory with a canary file
the sandbox must not touch, and `MODES`: the sandbox modes that start here (bwrap, namespaces), to run a test in
each. Used by every test in tests/sandbox/."""

import json
import os
import tempfile
from pathlib import Path

import pytest

from llmrl.sandbox import bwrap, core, procs, run_python
from llmrl.sandbox.cgroup import parent_dir

ROOT = os.geteuid() == 0
ACTIVE = core.status()
BWRAP = ACTIVE.mode == "bwrap"
MODES = [m for m in ("bwrap", "namespaces") if (m == "bwrap" and BWRAP) or (m == "namespaces" and ROOT)]
needs_bwrap = pytest.mark.skipif(not BWRAP, reason=f"the bwrap layer cannot start here: {bwrap.get_plan()[1]}")
needs_root = pytest.mark.skipif(not ROOT, reason="the namespaces fallback needs root")
_uids: list[int] = []
_namespaces: list[int] = []


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


def run_cgroups() -> list[str]:
    """The run cgroups of this process that exist now (each run removes its own)."""
    base = parent_dir()[0]
    if base is None:
        return []
    return sorted(n for n in os.listdir(base) if n.startswith(f"llmrl-sandbox-{os.getpid()}-"))


def run(code: str, **kw):
    kw.setdefault("timeout_s", 2.0)
    res = run_python(code, **kw)
    if res.uid is not None:
        _uids.append(res.uid)
    if res.pidns is not None:
        _namespaces.append((res.pidns, procs.boot_time()))
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
    _namespaces.clear()
    before = _children()
    yield
    os.kill(os.getpid(), 0)  # alive
    assert _children() == before, "a sandboxed process outlived its run"
    for uid in _uids:
        assert procs.pids_of(uid) == [], f"processes of sandbox uid {uid} survived"
    for ns, ended in _namespaces:
        assert procs.pids_in_namespace(ns, ended) == [], f"processes of PID namespace {ns} survived"
    assert run_cgroups() == [], "a run's cgroup was left"


def lines(res) -> list:
    return [json.loads(line) for line in res.stdout.splitlines()]
