"""A cgroup v2 per sandboxed run, where the cgroup v2 hierarchy is writable: the whole run goes in it before its
first instruction, `cgroup.kill` kills all of it in one write, an empty `cgroup.procs` (and a successful rmdir)
proves that nothing of it is left, and `pids.max` / `memory.max` cap it where those controllers are enabled.

    cg = RunCgroup.create(max_procs=32, memory_mb=512)   # None where cgroup v2 is not writable
    cg.add(pid); ...; cg.kill(); cg.remove()
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import os
import time

_counter = itertools.count()


@functools.lru_cache(maxsize=1)
def parent_dir() -> tuple[str | None, str]:
    """(the directory under which run cgroups are made, "") or (None, why there is none)."""
    mount = None
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                left, _, right = line.partition(" - ")
                if right.split()[:1] == ["cgroup2"]:
                    mount = left.split()[4]
                    break
        with open("/proc/self/cgroup") as f:
            own = next((line.strip()[3:] for line in f if line.startswith("0::")), None)
    except OSError as e:
        return None, f"cannot read /proc: {e}"
    if mount is None or own is None:
        return None, "no cgroup v2 hierarchy mounted"
    base = os.path.normpath(mount + "/" + own.lstrip("/"))
    if not os.access(base, os.W_OK):
        return None, f"{base} is not writable (needs root or a delegated cgroup)"
    _remove_stale(base)
    return base, ""


def _remove_stale(base: str) -> None:
    """Remove the empty run cgroups of trainers that are gone (killed mid-run, they could not remove their own)."""
    for name in os.listdir(base):
        parts = name.split("-")
        if len(parts) == 4 and name.startswith("llmrl-sandbox-") and parts[2].isdigit():
            if not os.path.exists(f"/proc/{parts[2]}"):
                try:
                    os.rmdir(os.path.join(base, name))   # fails, harmlessly, if anything still runs in it
                except OSError:
                    pass


@dataclasses.dataclass
class RunCgroup:
    path: str
    limits: tuple[str, ...]           # which of pids.max, memory.max were set

    @classmethod
    def create(cls, max_procs: int, memory_mb: int) -> "RunCgroup | None":
        base, _ = parent_dir()
        if base is None:
            return None
        path = os.path.join(base, f"llmrl-sandbox-{os.getpid()}-{next(_counter)}")
        try:
            os.mkdir(path)
        except OSError:
            return None
        if not os.path.isfile(os.path.join(path, "cgroup.kill")):   # kernels before 5.14
            os.rmdir(path)
            return None
        limits = []
        for name, value in (("pids.max", max_procs + 4), ("memory.max", (memory_mb + 64) << 20)):
            try:
                with open(os.path.join(path, name), "w") as f:
                    f.write(str(value))
                limits.append(name)
            except OSError:
                pass          # the controller is not enabled for this subtree: the rlimits still hold
        return cls(path, tuple(limits))

    def add(self, pid: int) -> None:
        with open(os.path.join(self.path, "cgroup.procs"), "w") as f:
            f.write(str(pid))

    def procs(self) -> list[int]:
        try:
            with open(os.path.join(self.path, "cgroup.procs")) as f:
                return [int(x) for x in f.read().split()]
        except FileNotFoundError:
            return []

    def kill(self) -> None:
        try:
            with open(os.path.join(self.path, "cgroup.kill"), "w") as f:
                f.write("1")
        except FileNotFoundError:
            pass

    def remove(self, timeout_s: float = 2.0) -> list[int]:
        """Kill what is left and remove the cgroup; the pids still in it if that failed (then it stays)."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                os.rmdir(self.path)
                return []
            except FileNotFoundError:
                return []
            except OSError:
                left = self.procs()
                if time.monotonic() > deadline:
                    return left or [-1]
                if left:
                    self.kill()
                time.sleep(0.002)
