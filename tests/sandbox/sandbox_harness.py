"""The sandbox tests' harness: `run` (remembers the sandbox uids a test used), the autouse check that the machine
is unharmed after every test (the test process lives, no child or process of a sandbox uid is left), and the
`outside` directory with a canary file the sandbox must not touch. Used by test_sandbox.py and
test_sandbox_escapes.py."""

import json
import os
import tempfile
from pathlib import Path

import pytest

from llmrl.rewards import sandbox, sandbox_procs
from llmrl.rewards.sandbox import LAYERS, run_python


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

