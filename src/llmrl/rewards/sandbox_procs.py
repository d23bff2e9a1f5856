"""The processes of a sandboxed run (`sandbox.py`): finding and killing every process of the run's uid, killing
its process group, and feeding stdin / reading stdout and stderr with a deadline and an output cap."""

from __future__ import annotations

import logging
import os
import selectors
import signal
import subprocess
import time

log = logging.getLogger("llmrl.rewards.sandbox")

# ---------------------------------------------------------------- stray processes

def pids_of(uid: int) -> list[int]:
    """Live processes whose real or effective uid is `uid` (read from /proc/*/status: /proc/<pid> itself is
    owned by root for non-dumpable processes, which a process can make itself)."""
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
        if uids[:2] and uid in (int(uids[0]), int(uids[1])) and not fields.get(b"State", b"").strip().startswith(b"Z"):
            pids.append(int(entry.name))
    return pids


def sweep(uid: int, interpreter: str) -> tuple[int, list[int]]:
    """Kill every process of `uid`: (how many there were, those still alive after). kill(-1) from a helper
    running as `uid` signals all of them under the kernel's task-list lock, so a fork bomb cannot outrun it."""
    strays = pids_of(uid)
    left = strays
    for _ in range(3):
        if not left:
            break
        try:
            subprocess.run([interpreter, "-s", "-S", "-B", "-c", "import os; os.kill(-1, 9)"], user=uid, group=uid,
                           extra_groups=[], cwd="/", env={}, close_fds=True, timeout=30, capture_output=True)
        except (OSError, subprocess.SubprocessError) as e:
            log.error("sandbox: could not run the kill helper as uid %d: %s", uid, e)
        deadline = time.monotonic() + 1.0
        while (left := pids_of(uid)) and time.monotonic() < deadline:
            time.sleep(0.01)
    return len(strays), left


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
