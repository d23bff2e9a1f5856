"""The processes of a sandboxed run (`core.py`): finding and killing every process of the run's uid (the
`namespaces` fallback), finding the processes of a PID namespace (the `bwrap` layer), killing a process group, and
feeding stdin / reading stdout and stderr with a deadline and an output cap."""

from __future__ import annotations

import logging
import os
import select
import selectors
import signal
import subprocess
import time

log = logging.getLogger("llmrl.sandbox")

# ---------------------------------------------------------------- stray processes

def _alive(pid: str, status: dict) -> bool:
    """Not a plain zombie. A thread-group leader that called SYS_exit while another thread runs shows as Z too,
    and runs on: it is alive while any of its threads is not Z."""
    if not status.get(b"State", b"").strip().startswith(b"Z"):
        return True
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return False
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/stat", "rb") as f:
                if f.read().rpartition(b")")[2].split()[:1] != [b"Z"]:
                    return True
        except OSError:
            continue
    return False


def pids_of(uid: int) -> list[int]:
    """Live processes whose real or effective uid is `uid` (read from /proc/*/status: /proc/<pid> itself is
    owned by root for non-dumpable processes, which a process can make itself). A zombie leader whose other
    threads still run counts as live."""
    pids = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/status", "rb") as f:
                head = f.read(1024)
        except OSError:
            continue  # exited meanwhile
        fields = dict(line.split(b":", 1) for line in head.splitlines() if b":" in line)
        uids = fields.get(b"Uid", b"").split()
        if uids[:2] and uid in (int(uids[0]), int(uids[1])) and _alive(entry.name, fields):
            pids.append(int(entry.name))
    return pids


def _kill_if_uid(pid: int, uid: int) -> None:
    """SIGKILL pid if it is (still) a process of uid: a pidfd pins the process, so a reused pid is never hit."""
    try:
        fd = os.pidfd_open(pid)
    except OSError:
        return
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            head = f.read(1024)
        fields = dict(line.split(b":", 1) for line in head.splitlines() if b":" in line)
        if uid in [int(x) for x in fields.get(b"Uid", b"").split()[:2]]:
            signal.pidfd_send_signal(fd, signal.SIGKILL)  # fails if the process the status came from is gone
    except OSError:
        pass
    finally:
        os.close(fd)


def sweep(uid: int, timeout_s: float = 2.0) -> tuple[int, list[int]]:
    """Kill every process of `uid` from here (root), one pidfd at a time, until none is left or the time is up:
    (how many there were, those still alive after). No helper runs as `uid`, so the code cannot trace, enter or
    stop anything of ours; RLIMIT_NPROC bounds how many new ones a fork bomb can make meanwhile."""
    strays = pids_of(uid)
    seen, left = set(strays), strays
    deadline = time.monotonic() + timeout_s
    while left and time.monotonic() < deadline:
        for pid in left:
            _kill_if_uid(pid, uid)
        time.sleep(0.002)
        left = pids_of(uid)
        seen.update(left)
    return len(seen), left


# ---------------------------------------------------------------- processes of a PID namespace

def namespace_of(pid: int) -> int | None:
    """The inode of pid's PID namespace, None if it is gone."""
    try:
        return os.stat(f"/proc/{pid}/ns/pid").st_ino
    except OSError:
        return None


def boot_time() -> float:
    """Seconds since boot, the clock of process start times in /proc/<pid>/stat."""
    return time.clock_gettime(time.CLOCK_BOOTTIME)


def _started(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return int(f.read().rpartition(b")")[2].split()[19]) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


def pids_in_namespace(inode: int, started_before: float | None = None) -> list[int]:
    """Live processes (as seen from here) in the PID namespace `inode`: the check that a run left nothing behind.
    The kernel reuses a dead namespace's inode for a new one: `started_before` (a `boot_time()`, when the run had
    ended) leaves out the processes of a later namespace."""
    out = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit() and namespace_of(int(entry.name)) == inode:
            started = _started(int(entry.name))
            if started_before is not None and (started is None or started >= started_before - 0.02):
                continue
            try:
                with open(f"/proc/{entry.name}/status", "rb") as f:
                    fields = dict(line.split(b":", 1) for line in f.read(1024).splitlines() if b":" in line)
            except OSError:
                continue
            if _alive(entry.name, fields):   # a dead PID 1 may linger as a zombie until its new parent reaps it
                out.append(int(entry.name))
    return out


def wait_pidfd(fd: int, timeout_s: float) -> bool:
    """Wait until the process behind pidfd `fd` has exited; False if it is still running after timeout_s."""
    return bool(select.select([fd], [], [], max(0.0, timeout_s))[0])


# ---------------------------------------------------------------- the child's pipes and its process group

def kill_group(proc: subprocess.Popen, enabled: bool) -> None:
    """SIGKILL the session's process group (its id is the child's pid, not yet reaped so not reusable)."""
    try:
        if enabled:
            os.killpg(proc.pid, signal.SIGKILL)
        else:
            os.kill(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def communicate(proc, data: bytes, deadline: float, max_output: int, group: bool) -> tuple[bytes, bytes, str]:
    """Feed stdin and read stdout/stderr as they come until both close: (stdout, stderr, killed_for), where
    killed_for is "timeout", "output" or "". When the child exits, its leftover children are killed at once
    (they would hold the pipes open)."""
    out, err, total = bytearray(), bytearray(), 0
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ, out)
    sel.register(proc.stderr, selectors.EVENT_READ, err)
    if data:
        os.set_blocking(proc.stdin.fileno(), False)
        sel.register(proc.stdin, selectors.EVENT_WRITE, None)
    else:
        proc.stdin.close()
    pidfd = None
    if hasattr(os, "pidfd_open"):
        try:
            pidfd = os.pidfd_open(proc.pid)
            sel.register(pidfd, selectors.EVENT_READ, "exit")
        except OSError:
            pidfd = None
    offset, killed_for, gone = 0, "", False
    try:
        while len(sel.get_map()) > (1 if pidfd is not None and not gone else 0):
            left = deadline - time.monotonic()
            if left <= 0:
                killed_for = "" if gone else "timeout"  # gone: a stray that left the group holds the pipes
                break
            events = sel.select(left if pidfd is not None else min(left, 0.02))
            if pidfd is None and not gone and exited(proc.pid):
                events = events + [(None, None)]
            for key, _ in events:
                if key is None or key.data == "exit":
                    if key is not None:
                        sel.unregister(pidfd)
                    gone = True
                    kill_group(proc, group)  # leftovers of the group; the main process is already gone
                    deadline = min(deadline, time.monotonic() + 0.5)
                elif key.data is None:  # stdin
                    try:
                        offset += os.write(key.fd, data[offset:offset + 65536])
                    except BlockingIOError:
                        pass
                    except BrokenPipeError:  # it stopped reading: fine
                        offset = len(data)
                    if offset >= len(data):
                        sel.unregister(proc.stdin)
                        proc.stdin.close()
                else:
                    chunk = os.read(key.fd, 65536)
                    if not chunk:
                        sel.unregister(key.fileobj)
                        continue
                    take = max(0, min(len(chunk), max_output - total))
                    key.data.extend(chunk[:take])
                    total += len(chunk)
                    if total > max_output:
                        killed_for = "output"
                        break
            if killed_for:
                break
    finally:
        sel.close()
        if pidfd is not None:
            os.close(pidfd)
        for f in (proc.stdin, proc.stdout, proc.stderr):
            if f and not f.closed:
                try:
                    f.close()
                except OSError:
                    pass
    return bytes(out), bytes(err), killed_for


def exited(pid: int) -> bool:
    """Has pid exited? Without reaping it (so its pid, the group id, cannot be reused yet)."""
    try:
        return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:
        return True
