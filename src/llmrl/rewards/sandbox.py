"""Run untrusted (model-written) Python in a contained child process. Never raises for anything the code does.

    res = run_python("print(input()[::-1])", stdin="abc", timeout_s=2)
    res.status, res.stdout      # "ok", "cba\\n"
    res.reason                  # "" when ok; else one line: why, e.g. "wall-clock timeout after 2 s"

Containment layers, outermost first (`res.layers` lists the ones that were active for a run):

| layer          | stops                                                          | needs                        |
|----------------|----------------------------------------------------------------|------------------------------|
| `uid`          | reading/writing the user's files, signalling the trainer, fork | root (to switch to a fresh,  |
|                | bombs (RLIMIT_NPROC is ignored for root, counted per uid),     | unprivileged uid per run)    |
|                | the other sandboxes (each run has its own uid)                 |                              |
| `no_new_privs` | regaining privileges through setuid binaries (su, sudo)        | Linux                        |
| `netns`        | all network traffic, at the kernel (empty network namespace;   | root (unshare CLONE_NEWNET)  |
|                | also abstract unix sockets and System V IPC, CLONE_NEWIPC)     |                              |
| `mountns`      | filling the disk or RAM through /tmp, /var/tmp, /dev/shm,      | root (unshare CLONE_NEWNS)   |
|                | /run/lock: each is a small private tmpfs, and so is the work   |                              |
|                | directory (`disk_mb`); all of it vanishes with the process.    |                              |
|                | Reading the trainer's packages, data and code (`hide`: e.g.    |                              |
|                | HumanEval's solutions ship in site-packages)                   |                              |
| `rlimits`      | CPU time, address space, processes, file size, core files, fds | -                            |
| `audit_hook`   | `socket`/`_socket` use, and signals to processes outside the   | -                            |
|                | sandbox's session, from Python, with a clear error (a second   |                              |
|                | layer: ctypes or an exec'd program gets past it, not the uid)  |                              |
| `process_group`| children left running: the session is SIGKILLed as a group     | -                            |
| `uid_sweep`    | children that left the group (setsid): every process of the   | the `uid` layer              |
|                | run's uid is killed (kill(-1) as that uid, atomic in the kernel)|                             |
| `output_cap`   | flooding the trainer's memory: output is read as it comes and  | -                            |
|                | the run is killed past `max_output_bytes`                      |                              |

Without root only `rlimits`, `no_new_privs`, `audit_hook`, `process_group` and `output_cap` apply; a warning is
logged once and `reason` names the missing layers. The run's uid is fresh (not `nobody`): RLIMIT_NPROC then
counts this run's processes only, concurrent sandboxes cannot signal each other, and the sweep can kill all of
the run's processes without touching anyone else's. The child is a small runner (`sandbox_runner.py`) started as root
with `-s -S -B`, which applies the layers, drops to the uid and `exec`s the code as `__main__` from `main.py`
in its work directory; it needs an interpreter that an unprivileged user can read (`_interpreter`: ours if
so, else the system's python3; override with LLMRL_SANDBOX_PYTHON). No `preexec_fn`, so calling this from
several threads of a multithreaded trainer is safe. The parent's side of the processes (the bounded pipes, the
group kill, the uid sweep) is in `sandbox_procs.py`.

Not covered: there is no PID namespace, so other processes' command lines in /proc are visible (a PID
namespace with a fresh /proc is the natural next layer: it would also confine kill(-1) without the uid layer);
world-readable files are readable; a machine's other world-writable directories (find / -perm -0002 -type d) are
writable without `mountns`. Never turn the `uid` layer off as root while running code that signals: kill(-1)
as root reaches every process on the machine but init (the `audit_hook` layer blocks it from Python only).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Collection
from pathlib import Path

from llmrl.rewards.sandbox_procs import communicate, kill_group, sweep

log = logging.getLogger("llmrl.rewards.sandbox")

LAYERS = ("uid", "no_new_privs", "netns", "mountns", "rlimits", "audit_hook", "process_group", "uid_sweep",
          "output_cap")
# Fresh uids/gids come from here: systemd marks 0x70000000-0x7ffdffff unused, below the 2^31 some tools mishandle.
_UID_BASE, _UID_SPAN = 0x71000000, 1 << 24
_EXIT_RUNNER_FAILED = 125      # the runner could not start the code (not the code's fault)


@dataclasses.dataclass(frozen=True)
class SandboxResult:
    status: str            # ok | error | timeout | memory | output_limit | killed | sandbox_error
    exit_code: int | None  # the code's exit status; -N if it died from signal N; None if it never ran
    stdout: str
    stderr: str
    wall_s: float
    reason: str            # "" when ok with every layer; else one line: why, and any missing layers
    layers: tuple[str, ...] = ()   # containment layers that were active (see the module docstring)
    uid: int | None = None         # the uid the code ran as (None: it kept ours)


# ---------------------------------------------------------------- the runner (child side, before the code runs)

# The runner (`sandbox_runner.py`) runs as root (when we are) with the work directory as cwd, applies the layers,
# reports "layer" / "-layer: why" lines on info_fd, then runs main.py as __main__.
_RUNNER = (Path(__file__).parent / "sandbox_runner.py").read_text()


# ---------------------------------------------------------------- choosing the uid and the interpreter

def _privileged() -> bool:
    """Root: we can switch uid and create namespaces. Tests monkeypatch this to see the degraded mode."""
    return os.geteuid() == 0


def _fresh_uid() -> int:
    return _UID_BASE + random.randrange(_UID_SPAN)


@functools.lru_cache(maxsize=None)
def _interpreter(drop_uid: bool) -> tuple[str, tuple[int, int], str, str]:
    """(path, version, stdlib directory, note): an interpreter the sandbox can run; with drop_uid, one that an
    unprivileged uid can read.

    Ours may not be (here the venv's Python lives under /root, mode 0700); then a system python3 is tried.
    """
    ours = sys.executable
    if not drop_uid:
        return ours, sys.version_info[:2], os.path.dirname(os.__file__), ""
    major, minor = sys.version_info[:2]
    candidates = [os.environ.get("LLMRL_SANDBOX_PYTHON"), ours, f"/usr/bin/python{major}.{minor}",
                  f"/usr/local/bin/python{major}.{minor}", "/usr/bin/python3", "/usr/local/bin/python3"]
    probe = "import os, sys, ctypes, resource; print(*sys.version_info[:2], os.path.dirname(os.__file__))"
    uid = _fresh_uid()
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
    """What the sandbox hides by default (with `mountns`): where the trainer's code, data and packages usually are
    (its site-packages, which hold datasets such as HumanEval's with the solutions; its working directory; home)."""
    import site
    paths = set(site.getsitepackages()) | {site.getusersitepackages(), os.getcwd(), os.path.expanduser("~")}
    paths |= {p for p in sys.path if p.endswith(("site-packages", "dist-packages"))}
    return sorted(paths)


def _hideable(paths: Collection[str], needed: list[str]) -> list[str]:
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


# ---------------------------------------------------------------- running

def _describe_exit(rc: int, stderr: str, cpu_used: float, cpu_s: float, memory_mb: int) -> tuple[str, str]:
    """(status, reason) for a process that ended on its own with return code rc."""
    last = next((line.strip() for line in reversed(stderr.splitlines()) if line.strip()), "")
    tail = f": {last[:300]}" if last else ""
    if rc == 0:
        return "ok", ""
    if rc == _EXIT_RUNNER_FAILED and "sandbox runner" in stderr:
        return "sandbox_error", last[:300]
    if "MemoryError" in stderr[-2000:]:
        return "memory", f"out of memory (address-space limit {memory_mb} MB){tail}"
    if rc > 0:
        return "error", f"exit code {rc}{tail}"
    sig = -rc
    try:
        name = signal.Signals(sig).name
    except ValueError:
        name = f"signal {sig}"
    if sig == signal.SIGXCPU or (sig == signal.SIGKILL and cpu_used >= cpu_s):
        return "timeout", f"CPU time limit ({cpu_s:g} s)"
    if sig == signal.SIGKILL:
        return "killed", "killed by SIGKILL (sent by the code itself, or the kernel's out-of-memory killer)"
    if sig == signal.SIGSEGV:
        return "error", "crashed with SIGSEGV (segmentation fault; deep recursion overflows the C stack)" + tail
    return "error", f"died from {name}{tail}"


def run_python(code: str, *, stdin: str = "", timeout_s: float = 5.0, cpu_s: float = 5.0, memory_mb: int = 512,
               max_procs: int = 32, max_output_bytes: int = 64_000, max_file_mb: int = 8, disk_mb: int = 64,
               hide: Collection[str] | None = None, disable: Collection[str] = ()) -> SandboxResult:
    """Run `code` as a Python program in the sandbox and return what happened; never raises for the code's doing.

    timeout_s: wall clock; cpu_s: CPU seconds per process (RLIMIT_CPU); memory_mb: address space per process;
    max_procs: processes (threads) of the run's uid; max_output_bytes: stdout + stderr together; max_file_mb: any
    one file written; disk_mb: the work directory's size (with `mountns`). hide: directories to cover with an empty
    read-only tmpfs (with `mountns`; default `default_hidden()`; those holding the interpreter are skipped).
    disable: layer names to leave out, for tests and benchmarks only (see LAYERS).
    """
    unknown = set(disable) - set(LAYERS)
    if unknown:
        raise ValueError(f"run_python: unknown layer(s) {sorted(unknown)}; valid: {', '.join(LAYERS)}")
    disable = frozenset(disable) | ({"uid_sweep"} if "uid" in disable else set())  # the sweep works by uid
    start = time.monotonic()
    try:
        return _run(code, stdin, timeout_s, cpu_s, memory_mb, max_procs, max_output_bytes, max_file_mb, disk_mb,
                    default_hidden() if hide is None else list(hide), disable, start)
    except Exception as e:  # the sandbox's own failure: report it, never raise into the trainer
        log.exception("sandbox failed")
        return SandboxResult("sandbox_error", None, "", "", time.monotonic() - start,
                             f"sandbox failed: {type(e).__name__}: {e}")


_warned: set[str] = set()


def _run(code, stdin, timeout_s, cpu_s, memory_mb, max_procs, max_output_bytes, max_file_mb, disk_mb, hide,
         disable, start) -> SandboxResult:
    privileged = _privileged()
    missing = {}  # layer -> why it is missing
    if not privileged:
        missing.update({layer: "needs root" for layer in ("uid", "netns", "mountns", "uid_sweep")})
    interpreter, version, stdlib, note = _interpreter(privileged and "uid" not in disable)
    uid = None
    if privileged and "uid" not in disable:
        if note.startswith("no Python"):
            missing["uid"] = missing["uid_sweep"] = note
        else:
            uid = _fresh_uid()
    want = [x for x in ("netns", "mountns", "rlimits", "no_new_privs", "audit_hook")
            if x not in disable and (privileged or x not in ("netns", "mountns"))]

    workdir = tempfile.mkdtemp(prefix="llmrl-sandbox-")
    proc = None
    try:
        with open(os.path.join(workdir, "main.py"), "w", encoding="utf-8", errors="replace") as f:
            f.write(code)
        os.chmod(os.path.join(workdir, "main.py"), 0o644)
        if uid is not None:
            os.chown(workdir, uid, uid)
        info_r, info_w = os.pipe()
        flags = ["-s", "-S", "-B"] + (["-P"] if version >= (3, 11) else [])
        ids = str(uid if uid is not None else -1)
        argv = [interpreter, *flags, "-c", _RUNNER, ids, ids, str(max(1, math.ceil(cpu_s))), str(memory_mb),
                str(max_procs), str(max_file_mb), str(disk_mb), str(info_w), workdir, ",".join(want) or "-",
                "\n".join(_hideable(hide, [interpreter, stdlib, workdir]))]
        env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "PYTHONHASHSEED": "0", "HOME": workdir,
               "TMPDIR": workdir, "PYTHONIOENCODING": "utf-8"}
        try:
            proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    cwd=workdir, env=env, close_fds=True, pass_fds=(info_w,), start_new_session=True)
        finally:
            os.close(info_w)
        cap = sys.maxsize if "output_cap" in disable else max_output_bytes
        out, err, killed_for = communicate(proc, stdin.encode("utf-8", "replace"), start + timeout_s, cap,
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
        strays, left = (0, [])
        if uid is not None and "uid_sweep" not in disable:
            strays, left = sweep(uid, interpreter)
        shutil.rmtree(workdir, ignore_errors=True)

    layers = [line for line in info.splitlines() if line and not line.startswith("-")]
    for line in info.splitlines():
        if line.startswith("-"):
            name, _, why = line[1:].partition(": ")
            missing.setdefault(name, why)
    layers += [x for x in ("process_group", "output_cap") if x not in disable]
    if uid is not None and "uid_sweep" not in disable:
        layers.append("uid_sweep")
    for layer in LAYERS:
        if layer not in layers and layer not in disable:
            missing.setdefault(layer, "not applied" if info else "the runner did not report (killed early?)")
    stdout, stderr = out.decode("utf-8", "replace"), err.decode("utf-8", "replace")
    cpu_used = usage.ru_utime + usage.ru_stime
    if killed_for == "timeout":
        status, reason = "timeout", f"wall-clock timeout after {timeout_s:g} s"
    elif killed_for == "output":
        status, reason = "output_limit", f"output over {max_output_bytes} bytes"
    else:
        status, reason = _describe_exit(rc, stderr, cpu_used, cpu_s, memory_mb)
    notes = [reason] if reason else []
    if strays:
        notes.append(f"killed {strays} leftover process(es) of uid {uid}")
    if left:
        notes.append(f"COULD NOT KILL {len(left)} process(es) of uid {uid}: {left}")
        log.error("sandbox: processes of uid %d survived the sweep: %s", uid, left)
    if missing:
        text = ", ".join(f"{k} ({v})" for k, v in sorted(missing.items()))
        notes.append(f"missing layers: {text}")
        if text not in _warned:
            _warned.add(text)
            log.warning("sandbox: running model code with containment layers missing: %s", text)
    return SandboxResult(status, rc, stdout, stderr, time.monotonic() - start, "; ".join(notes), tuple(layers),
                         uid)
