"""The fallback layers, for machines without bubblewrap: `namespaces` (root: a fresh uid per run, empty network
namespace, a mount namespace that hides the trainer's packages, code and home, the process-group kill and a sweep
of the run's uid) and `weak` (not root: rlimits, no_new_privs, the audit hook and the process-group kill only; runs
only with `sandbox.allow_weak`).

    res = run(code, stdin, limits, disable, start, privileged=True, hide=default_hidden())

Weaker than `bwrap` by construction: there is no PID namespace (other processes are visible in /proc; a process
that leaves the group is found by its uid), and only what `hide` names is hidden (everything else world-readable
stays readable). The uid sweep is done from here with pidfds, never by a helper running as the sandbox's uid.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Collection

from llmrl.sandbox.procs import communicate, kill_group, sweep
from llmrl.sandbox.result import Limits, SandboxResult, finish, fresh_uid, log, runner_argv, runner_env

NAMESPACE_LAYERS = ("uid", "no_new_privs", "netns", "mountns", "rlimits", "audit_hook", "process_group", "uid_sweep",
                    "output_cap")
WEAK_LAYERS = ("rlimits", "no_new_privs", "audit_hook", "process_group", "output_cap")


@functools.lru_cache(maxsize=None)
def interpreter(drop_uid: bool) -> tuple[str, tuple[int, int], str, str]:
    """(path, version, stdlib directory, note): an interpreter the sandbox can run; with drop_uid, one that an
    unprivileged uid can read (ours may not be: a venv under /root, mode 0700; then a system python3 is tried)."""
    ours = sys.executable
    if not drop_uid:
        return ours, sys.version_info[:2], os.path.dirname(os.__file__), ""
    major, minor = sys.version_info[:2]
    candidates = [os.environ.get("LLMRL_SANDBOX_PYTHON"), ours, f"/usr/bin/python{major}.{minor}",
                  f"/usr/local/bin/python{major}.{minor}", "/usr/bin/python3", "/usr/local/bin/python3"]
    probe = "import os, sys, ctypes, resource; print(*sys.version_info[:2], os.path.dirname(os.__file__))"
    uid = fresh_uid()
    for path in dict.fromkeys(c for c in candidates if c):
        if not os.access(path, os.X_OK):
            continue
        try:
            out = subprocess.run([path, "-s", "-S", "-B", "-c", probe], user=uid, group=uid, extra_groups=[],
                                 cwd="/", env={"PATH": "/usr/bin:/bin"}, capture_output=True, timeout=30,
                                 close_fds=True)
        except (OSError, subprocess.SubprocessError):
            continue
        if out.returncode == 0:
            major, minor, stdlib = out.stdout.decode().split(maxsplit=2)
            if path != ours:
                log.info("sandbox: %s is not readable by an unprivileged user; sandboxed code runs on %s (Python "
                         "%s.%s, standard library only)", ours, path, major, minor)
            return path, (int(major), int(minor)), stdlib.strip(), ""
    return (ours, sys.version_info[:2], os.path.dirname(os.__file__),
            "no Python interpreter an unprivileged user can read (set LLMRL_SANDBOX_PYTHON)")


def default_hidden() -> list[str]:
    """What `mountns` hides by default: where the trainer's code, data and packages usually are (its
    site-packages, which hold datasets such as HumanEval's with the solutions; its working directory; home)."""
    import site
    paths = set(site.getsitepackages()) | {site.getusersitepackages(), os.getcwd(), os.path.expanduser("~")}
    paths |= {p for p in sys.path if p.endswith(("site-packages", "dist-packages"))}
    return sorted(paths)


def hideable(paths: Collection[str], needed: list[str]) -> list[str]:
    """The existing directories among `paths` that contain none of the `needed` paths (nor are "/")."""
    out = []
    for p in paths:
        real = os.path.realpath(p)
        if real == "/" or not os.path.isdir(real) or "\n" in real:
            continue
        if not any(n == real or n.startswith(real.rstrip("/") + "/") for n in map(os.path.realpath, needed)):
            out.append(real)
    out = sorted(set(out))  # the outermost only: once a directory is covered, what is under it is gone
    return [p for p in out if not any(p.startswith(q.rstrip("/") + "/") for q in out)]


def run(code: str, stdin: str, lim: Limits, disable: frozenset, start: float, *, privileged: bool,
        hide: Collection[str]) -> SandboxResult:
    missing = {}
    if not privileged:
        missing.update({layer: "needs root" for layer in ("uid", "netns", "mountns", "uid_sweep")})
    interp, version, stdlib, note = interpreter(privileged and "uid" not in disable)
    uid = None
    if privileged and "uid" not in disable:
        if note.startswith("no Python"):
            missing["uid"] = missing["uid_sweep"] = note
        else:
            uid = fresh_uid()
    want = [x for x in ("netns", "mountns", "rlimits", "no_new_privs", "audit_hook")
            if x not in disable and (privileged or x not in ("netns", "mountns"))]
    workdir = tempfile.mkdtemp(prefix="llmrl-sandbox-")
    proc, strays, left, info = None, 0, [], ""
    try:
        with open(os.path.join(workdir, "main.py"), "w", encoding="utf-8", errors="replace") as f:
            f.write(code)
        os.chmod(os.path.join(workdir, "main.py"), 0o644)
        if uid is not None:
            os.chown(workdir, uid, uid)
        info_r, info_w = os.pipe()
        argv = runner_argv(interp, version, uid, lim, info_w, workdir, want,
                           hideable(hide, [interp, stdlib, workdir]))
        try:
            proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    cwd=workdir, env=runner_env(workdir), close_fds=True, pass_fds=(info_w,),
                                    start_new_session=True)
        finally:
            os.close(info_w)
        cap = sys.maxsize if "output_cap" in disable else lim.max_output_bytes
        out, err, killed_for = communicate(proc, stdin.encode("utf-8", "replace"), start + lim.timeout_s, cap,
                                           "process_group" not in disable)
        os.set_blocking(info_r, False)
        try:
            info = os.read(info_r, 65536).decode()
        except BlockingIOError:
            info = ""
        os.close(info_r)
        kill_group(proc, "process_group" not in disable)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = rc = os.waitstatus_to_exitcode(status)
    finally:
        if proc is not None and proc.returncode is None:  # an error of ours midway: leave nothing running
            kill_group(proc, True)
            proc.wait()
        if uid is not None and "uid_sweep" not in disable:
            strays, left = sweep(uid)
        shutil.rmtree(workdir, ignore_errors=True)

    layers = [line for line in info.splitlines() if line and not line.startswith("-")]
    for line in info.splitlines():
        if line.startswith("-"):
            name, _, why = line[1:].partition(": ")
            missing.setdefault(name, why)
    layers += [x for x in ("process_group", "output_cap") if x not in disable]
    if uid is not None and "uid_sweep" not in disable:
        layers.append("uid_sweep")
    for layer in (NAMESPACE_LAYERS if privileged else WEAK_LAYERS):
        if layer not in layers and layer not in disable:
            missing.setdefault(layer, "not applied" if info else "the runner did not report (killed early?)")
    notes = []
    if strays:
        notes.append(f"killed {strays} leftover process(es) of uid {uid}")
    if left:
        notes.append(f"COULD NOT KILL {len(left)} process(es) of uid {uid}: {left}")
        log.error("sandbox: processes of uid %d survived the sweep: %s", uid, left)
    return finish(rc, out, err, killed_for, usage.ru_utime + usage.ru_stime, lim, start,
                  mode="namespaces" if privileged else "weak", layers=layers, missing=missing, notes=notes, uid=uid)
