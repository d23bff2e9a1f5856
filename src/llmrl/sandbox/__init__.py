"""Run untrusted (model-written) Python in a contained child process. Never raises for anything the code does.

    res = run_python("print(input()[::-1])", stdin="abc", timeout_s=2)
    res.status, res.stdout      # "ok", "cba\\n"
    res.reason                  # "" when ok; else one escaped line: why, e.g. "wall-clock timeout after 2 s"
    status().describe()         # the active layer and what is missing (`llmrl doctor` prints it)

The package sits low in the layers (it imports nothing else of llmrl); `rewards/code.py` and the `python` tool of
`rollout/tools.py` run model code through it. One of three modes is used, the strongest that starts here
(`res.mode`; `res.layers` lists what was active for a run):

`bwrap` (bubblewrap installed; as root, or with unprivileged user namespaces), in `bwrap.py`:

| layer          | stops                                                                                           |
|----------------|-------------------------------------------------------------------------------------------------|
| `pidns`        | seeing, signalling or tracing any process outside the run: the run has its own PID namespace    |
|                | (kill() can name only its own processes); its PID 1 is bwrap's reaper (root, no model code), and |
|                | when the code's main process ends PID 1 exits and the kernel kills every process of the run: no |
|                | sweep, no survivor (zombie thread-group leaders and setsid'd children included)                 |
| `mountns`      | reading anything but the allow-list: the interpreter and the shared objects it loads, the       |
|                | standard library (without site-packages), /dev/null, zero, full, random, urandom, a private     |
|                | /proc; all read-only. Writable: its work directory /sandbox, /tmp, /dev/shm, small private tmpfs |
| `netns`        | all network traffic (empty network namespace), abstract unix sockets and SysV IPC (IPC ns)      |
| `seccomp`      | ptrace, process_vm_readv/writev, new namespaces, mounts, bpf, io_uring, keyrings (`seccomp.py`) |
| `cgroup`       | where cgroup v2 is writable: the run's own cgroup, killed in one write (`cgroup.kill`) on a     |
|                | timeout and checked empty after; pids.max/memory.max where those controllers are enabled        |
| `uid`          | root only: a fresh unprivileged uid per run (RLIMIT_NPROC then counts this run alone); without  |
|                | root the code keeps our uid inside a user namespace                                             |
| `no_new_privs` | regaining privileges through setuid binaries                                                    |
| `rlimits`      | CPU time, address space, processes, file size, core files, fds                                  |
| `audit_hook`   | socket use and signals outside the session, from Python, with a clear error (a second wall)     |
| `output_cap`   | flooding the trainer's memory: output is read as it comes and the run killed past the cap      |

The trainer kills bwrap (and the cgroup) at the wall-clock limit; PID 1 dies with it (`--die-with-parent`), and
the trainer waits on PID 1's pidfd, whose exit means the namespace is empty. Nothing the trainer runs for cleanup
exists inside the sandbox or runs as its uid, so nothing can be traced, entered or stopped by the code.

`namespaces` (root without bubblewrap), in `fallback.py`: `uid`, `no_new_privs`, `netns`, `mountns` (only the
trainer's site-packages, working directory and home are hidden; other world-readable files stay readable),
`rlimits`, `audit_hook`, `process_group` (the session is SIGKILLed as a group), `uid_sweep` (leftovers found by uid,
zombie leaders with live threads included, and killed from here through pidfds), `output_cap`. No PID namespace.

`weak` (neither): `rlimits`, `no_new_privs`, `audit_hook`, `process_group`, `output_cap`. Used only with
`configure(allow_weak=True)` (config `sandbox.allow_weak: true`), with a warning in the log and the report;
otherwise `run_python` raises `SandboxUnavailable`, naming what is missing and how to get it.

Text the code wrote reaches logs only through `escape` (control characters shown as \\n, \\x1b..., length capped).
"""

from llmrl.sandbox.core import (LAYERS, MODES, SandboxUnavailable, Status, configure, require, run_python,
                                status)
from llmrl.sandbox.result import SandboxResult
from llmrl.sandbox.text import escape

__all__ = ["LAYERS", "MODES", "SandboxResult", "SandboxUnavailable", "Status", "configure", "escape", "require",
           "run_python", "status"]
