"""Choosing the sandbox's layer and running code in it: `run_python`, `status`, `configure`, `require`.

The strongest layer that starts here is used: `bwrap`, else `namespaces` (root), else nothing: then model code is
refused (`SandboxUnavailable`) unless `configure(allow_weak=True)` (config `sandbox.allow_weak: true`) allows the
`weak` layer. See `llmrl.sandbox` for what each layer stops.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import time
from collections.abc import Collection

from llmrl.sandbox import bwrap, fallback
from llmrl.sandbox.cgroup import parent_dir
from llmrl.sandbox.result import Limits, SandboxResult

log = logging.getLogger("llmrl.sandbox")

MODES = ("bwrap", "namespaces", "weak")
MODE_LAYERS = {
    "bwrap": ("pidns", "mountns", "netns", "seccomp", "cgroup", "uid", "no_new_privs", "rlimits", "audit_hook",
              "output_cap"),
    "namespaces": fallback.NAMESPACE_LAYERS,
    "weak": fallback.WEAK_LAYERS,
}
LAYERS = tuple(dict.fromkeys(x for layers in MODE_LAYERS.values() for x in layers))
# what a test or benchmark may turn off in each mode (the rest is what the mode is)
OPTIONAL = {"bwrap": ("netns", "seccomp", "cgroup", "audit_hook", "rlimits", "output_cap"),
            "namespaces": LAYERS, "weak": LAYERS}

_policy = {"allow_weak": False}


class SandboxUnavailable(RuntimeError):
    """No isolation layer can start here and the weak one is not allowed: model-written code is not run."""


@dataclasses.dataclass(frozen=True)
class Status:
    mode: str | None                 # the layer run_python uses: bwrap | namespaces | weak | None (refuses)
    layers: tuple[str, ...]          # what that layer applies (cgroup and uid where they can)
    missing: dict[str, str]          # stronger layers or parts that cannot start here -> why
    allow_weak: bool
    sees: str = ""                   # bwrap: what the code can see of the filesystem

    def describe(self) -> str:
        """Several lines for `llmrl doctor` and the log."""
        lines = [f"sandbox layer: {self.mode or 'NONE: model-written code is refused'}"]
        if self.mode:
            lines.append(f"  active: {', '.join(self.layers)}")
        if self.sees:
            lines.append(f"  the code sees: {self.sees}")
        for what, why in self.missing.items():
            lines.append(f"  missing: {what}: {why}")
        if self.mode == "namespaces":
            lines.append("  WARNING: without bwrap the code can read the machine's world-readable files (all but the "
                         "trainer's packages, working directory and home) and see other processes in /proc")
        if self.mode == "weak":
            lines.append("  WARNING: sandbox.allow_weak is on: model code runs with rlimits only; it can read your "
                         "files and reach the network and other processes")
        if self.mode != "bwrap":
            lines.append(f"  to get the bwrap layer: {bwrap.INSTALL_HINT}")
        return "\n".join(lines)

    def as_dict(self) -> dict:
        return {"mode": self.mode, "layers": list(self.layers), "missing": dict(self.missing),
                "allow_weak": self.allow_weak}


def configure(*, allow_weak: bool) -> None:
    """Set the policy for this process (`sandbox.allow_weak` of the config)."""
    _policy["allow_weak"] = bool(allow_weak)


def _privileged() -> bool:
    """Root: the `namespaces` fallback can switch uid and make namespaces. Tests monkeypatch this."""
    return os.geteuid() == 0


@functools.lru_cache(maxsize=1)
def _probe() -> tuple[str | None, str]:
    """(the strongest mode that starts here other than weak, why bwrap does not)."""
    plan, why = bwrap.get_plan()
    if plan is not None:
        return "bwrap", ""
    return ("namespaces" if _privileged() else None), why


def status() -> Status:
    """Which layer run_python uses here and what is missing (probes bubblewrap once per process)."""
    mode, why = _probe()
    missing = {} if mode == "bwrap" else {"bwrap": why}
    if mode is None:
        missing["namespaces"] = "needs root"
        mode = "weak" if _policy["allow_weak"] else None
    layers = MODE_LAYERS.get(mode, ())
    if mode == "bwrap":
        if parent_dir()[0] is None:
            missing["cgroup"] = parent_dir()[1]
        if bwrap.get_plan()[0].user_ns:
            missing["uid"] = "not root: the code keeps our uid inside its own user namespace"
        layers = tuple(x for x in layers if x not in missing)
        return Status(mode, layers, missing, _policy["allow_weak"], bwrap.get_plan()[0].describe())
    return Status(mode, layers, missing, _policy["allow_weak"])


def require() -> Status:
    """The status, or SandboxUnavailable naming what is missing and how to get it. Logs the active layer once."""
    st = status()
    if st.mode is None:
        raise SandboxUnavailable(
            "no sandbox layer can start here, so model-written code is not run: " + st.missing.get("bwrap", "") +
            f"; {bwrap.INSTALL_HINT}; or run as root; or set sandbox.allow_weak: true to run it with rlimits only "
            "(it can then read your files and reach the network)")
    if st.mode not in _logged:
        _logged.add(st.mode)
        (log.info if st.mode == "bwrap" else log.warning)("%s", st.describe())
    return st


_logged: set[str] = set()


def run_python(code: str, *, stdin: str = "", timeout_s: float = 5.0, cpu_s: float = 5.0, memory_mb: int = 512,
               max_procs: int = 32, max_output_bytes: int = 64_000, max_file_mb: int = 8, disk_mb: int = 64,
               mode: str | None = None, hide: Collection[str] | None = None,
               disable: Collection[str] = ()) -> SandboxResult:
    """Run `code` as a Python program in the sandbox and return what happened; never raises for the code's doing
    (SandboxUnavailable: no layer may run it here).

    timeout_s: wall clock; cpu_s: CPU seconds per process (RLIMIT_CPU); memory_mb: address space per process;
    max_procs: processes (threads) of the run; max_output_bytes: stdout + stderr together; max_file_mb: any one
    file written; disk_mb: the work directory's size. mode: a layer other than the active one (tests, benchmarks;
    it must start here). hide: `namespaces` only, directories to cover (default `fallback.default_hidden()`).
    disable: layer names to leave out, for tests and benchmarks only (`OPTIONAL[mode]`).
    """
    if mode is None:
        mode = require().mode
    elif mode not in MODES:
        raise ValueError(f"run_python: unknown mode {mode!r}; valid: {', '.join(MODES)}")
    bad = set(disable) - set(OPTIONAL[mode])
    if bad:
        raise ValueError(f"run_python: layer(s) {sorted(bad)} cannot be disabled in mode {mode}; valid: "
                         f"{', '.join(OPTIONAL[mode])}")
    disable = frozenset(disable) | ({"uid_sweep"} if "uid" in disable else set())  # the sweep works by uid
    lim = Limits(timeout_s, cpu_s, memory_mb, max_procs, max_output_bytes, max_file_mb, disk_mb)
    start = time.monotonic()
    try:
        if mode == "bwrap":
            plan, why = bwrap.get_plan()
            if plan is None:
                raise SandboxUnavailable(f"the bwrap layer cannot start here: {why}")
            return bwrap.run(plan, code, stdin, lim, disable, start)
        if mode == "namespaces" and not _privileged():
            raise SandboxUnavailable("the namespaces layer needs root")
        return fallback.run(code, stdin, lim, disable, start, privileged=mode == "namespaces",
                            hide=fallback.default_hidden() if hide is None else list(hide))
    except SandboxUnavailable:
        raise
    except Exception as e:  # the sandbox's own failure: report it, never raise into the trainer
        log.exception("sandbox failed")
        return SandboxResult("sandbox_error", None, "", "", time.monotonic() - start,
                             f"sandbox failed: {type(e).__name__}: {e}", mode=mode)
