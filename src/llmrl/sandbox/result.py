"""What every sandbox layer shares: the limits of a run, the runner's command line, and turning how the run ended
into a `SandboxResult` with a one-line, escaped reason."""

from __future__ import annotations

import dataclasses
import logging
import math
import random
import signal
import time
from pathlib import Path

from llmrl.sandbox.text import escape

log = logging.getLogger("llmrl.sandbox")

EXIT_RUNNER_FAILED = 125      # the runner could not start the code (not the code's fault)
# Fresh uids/gids come from here: systemd marks 0x70000000-0x7ffdffff unused, below the 2^31 some tools mishandle.
_UID_BASE, _UID_SPAN = 0x71000000, 1 << 24
# The runner (`runner.py`) is run with `python -c`; see its docstring for its arguments.
RUNNER = (Path(__file__).parent / "runner.py").read_text()


@dataclasses.dataclass(frozen=True)
class SandboxResult:
    status: str            # ok | error | timeout | memory | output_limit | killed | sandbox_error
    exit_code: int | None  # the code's exit status; -N if it died from signal N; None if it never ran
    stdout: str
    stderr: str
    wall_s: float
    reason: str            # "" when ok with every layer; else one escaped line: why, and any missing layers
    layers: tuple[str, ...] = ()   # containment layers that were active (see llmrl.sandbox)
    uid: int | None = None         # the uid the code ran as (None: it kept ours)
    mode: str = ""                 # bwrap | namespaces | weak (see llmrl.sandbox)
    pidns: int | None = None       # bwrap: the inode of the run's PID namespace (empty once the result is back)


@dataclasses.dataclass(frozen=True)
class Limits:
    timeout_s: float
    cpu_s: float
    memory_mb: int
    max_procs: int
    max_output_bytes: int
    max_file_mb: int
    disk_mb: int


def fresh_uid() -> int:
    return _UID_BASE + random.randrange(_UID_SPAN)


def runner_argv(interpreter: str, version: tuple[int, int], uid: int | None, lim: Limits, info_fd: int,
                workdir: str, want: list[str], hide: list[str]) -> list[str]:
    flags = ["-s", "-S", "-B"] + (["-P"] if version >= (3, 11) else [])
    ids = str(uid if uid is not None else -1)
    return [interpreter, *flags, "-c", RUNNER, ids, ids, str(max(1, math.ceil(lim.cpu_s))), str(lim.memory_mb),
            str(lim.max_procs), str(lim.max_file_mb), str(lim.disk_mb), str(info_fd), workdir,
            ",".join(want) or "-", "\n".join(hide)]


def runner_env(workdir: str) -> dict[str, str]:
    return {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "PYTHONHASHSEED": "0", "HOME": workdir, "TMPDIR": workdir,
            "PYTHONIOENCODING": "utf-8"}


def describe_exit(rc: int, stderr: str, cpu_used: float, cpu_s: float, memory_mb: int) -> tuple[str, str]:
    """(status, reason) for a process that ended on its own with return code rc."""
    last = next((line.strip() for line in reversed(stderr.splitlines()) if line.strip()), "")
    tail = f": {escape(last, 300)}" if last else ""
    if rc == 0:
        return "ok", ""
    if rc == EXIT_RUNNER_FAILED and "sandbox runner" in stderr:
        return "sandbox_error", escape(last, 300)
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


_warned: set[str] = set()


def finish(rc: int | None, out: bytes, err: bytes, killed_for: str, cpu_used: float, lim: Limits, start: float, *,
           mode: str, layers: list[str], missing: dict[str, str], notes: list[str], uid: int | None = None,
           pidns: int | None = None) -> SandboxResult:
    """The SandboxResult of a finished run. rc None: the run never got to the code (then stderr says why)."""
    stdout, stderr = out.decode("utf-8", "replace"), err.decode("utf-8", "replace")
    if killed_for == "timeout":
        status, reason = "timeout", f"wall-clock timeout after {lim.timeout_s:g} s"
    elif killed_for == "output":
        status, reason = "output_limit", f"output over {lim.max_output_bytes} bytes"
    elif rc is None:
        last = next((line.strip() for line in reversed(stderr.splitlines()) if line.strip()), "no reason given")
        status, reason = "sandbox_error", f"the sandbox did not start: {escape(last, 300)}"
    else:
        status, reason = describe_exit(rc, stderr, cpu_used, lim.cpu_s, lim.memory_mb)
    parts = ([reason] if reason else []) + notes
    if missing:
        text = ", ".join(f"{k} ({v})" for k, v in sorted(missing.items()))
        parts.append(f"missing layers: {text}")
        if text not in _warned:
            _warned.add(text)
            log.warning("sandbox: running model code with containment layers missing: %s", text)
    return SandboxResult(status, rc, stdout, stderr, time.monotonic() - start, "; ".join(parts), tuple(layers), uid,
                         mode, pidns)
