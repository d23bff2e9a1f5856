"""The `bwrap` layer: each run in its own PID, mount, network, IPC and UTS namespaces made by bubblewrap, with an
allow-listed, read-only filesystem, a seccomp filter, and (where cgroup v2 is writable) its own cgroup.

    plan, why = get_plan()        # the allow-list and the interpreter, found once per process; None: why not
    res = run(plan, code, stdin, limits, disable, start)

What the code sees (`Plan.allowed`): the interpreter and the shared objects it loads, the standard library (its
site-packages covered by an empty read-only directory), /dev/{null,zero,full,random,urandom}, a private /proc of its
namespace, and three small private tmpfs: its work directory `/sandbox` (cwd, HOME, TMPDIR; holds main.py), /tmp
and /dev/shm. The root and everything bound are read-only. The shared objects are those a probe process maps after
importing every extension module of the standard library (`_PROBE`), each bound as a file at its own path with
the symlinks that lead to it.

Ending a run: bwrap's PID 1 (a small reaper, root, running no model code) exits when the code's main process
(the runner, PID 2) does; the kernel then kills every process left in the namespace. The trainer kills bwrap (and
the cgroup) on a timeout; `--die-with-parent` takes PID 1 with it. Either way the trainer then waits on PID 1's
pidfd: its exit means the namespace is empty. No helper process ever runs as the sandbox's uid outside it.
bwrap reports a death by signal N as exit status 128 + N, so such an exit status reads as that signal.
"""

from __future__ import annotations

import atexit
import dataclasses
import functools
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time

from llmrl.sandbox import seccomp
from llmrl.sandbox.cgroup import RunCgroup, parent_dir
from llmrl.sandbox.procs import communicate, exited, kill_group, namespace_of, pids_in_namespace, wait_pidfd
from llmrl.sandbox.result import Limits, SandboxResult, finish, fresh_uid, log, runner_argv, runner_env

WORKDIR = "/sandbox"
DEVICES = ("/dev/null", "/dev/zero", "/dev/full", "/dev/random", "/dev/urandom")
SKIP_MODULES = ("_tkinter",)    # GUI: would pull in the X11 libraries
INSTALL_HINT = ("install bubblewrap: `apt-get install bubblewrap` (Debian/Ubuntu; `bash scripts/setup.sh` does it "
                "as root), `dnf install bubblewrap` (Fedora), `pacman -S bubblewrap` (Arch); without root it also "
                "needs unprivileged user namespaces (sysctl kernel.unprivileged_userns_clone=1, "
                "user.max_user_namespaces > 0)")

_PROBE = r"""
import ctypes, importlib, json, os, sys, sysconfig
dyn = sysconfig.get_config_var("DESTSHARED") or os.path.join(os.path.dirname(os.__file__), "lib-dynload")
for f in sorted(os.listdir(dyn)):
    if f.endswith(".so") and f.split(".")[0] not in SKIP:
        try:
            importlib.import_module(f.split(".")[0])
        except Exception:
            pass
class LinkMap(ctypes.Structure):
    pass
LinkMap._fields_ = [("addr", ctypes.c_void_p), ("name", ctypes.c_char_p), ("ld", ctypes.c_void_p),
                    ("next", ctypes.POINTER(LinkMap)), ("prev", ctypes.POINTER(LinkMap))]
class RDebug(ctypes.Structure):
    _fields_ = [("version", ctypes.c_int), ("map", ctypes.POINTER(LinkMap))]
files = set()
try:  # the names the dynamic loader opened (the symlinks it went through), not only where they lead
    lm = RDebug.in_dll(ctypes.CDLL(None), "_r_debug").map
    while lm:
        if lm.contents.name and lm.contents.name.startswith(b"/"):
            files.add(os.fsdecode(lm.contents.name))
        lm = lm.contents.next
except (ValueError, OSError):
    pass
for line in open("/proc/self/maps"):
    parts = line.split(maxsplit=5)
    if len(parts) == 6 and parts[5].startswith("/"):
        files.add(parts[5].rstrip("\n"))
print(json.dumps({"stdlib": os.path.dirname(os.__file__), "version": list(sys.version_info[:2]),
                  "files": sorted(files)}))
"""


@dataclasses.dataclass(frozen=True)
class Plan:
    bwrap: str
    interpreter: str                      # real path of the Python the sandbox runs
    version: tuple[int, int]
    stdlib: str
    binds: tuple[str, ...]                # bound read-only, each at its own path
    links: tuple[tuple[str, str], ...]    # (path, target) symlinks recreated inside
    hidden: tuple[str, ...]               # under the stdlib, covered by an empty read-only tmpfs
    user_ns: bool                         # not root: bwrap makes a user namespace (the uid stays ours)
    stage: str | None = None              # a tree of the binds and links but the stdlib (`build_stage`), or None

    def allowed(self) -> list[str]:
        """Every path the code can see, as roots (a directory stands for what is under it)."""
        return sorted({*self.binds, *(p for p, _ in self.links), *DEVICES, WORKDIR, "/tmp", "/dev/shm", "/proc"})

    def describe(self) -> str:
        hidden = f" without {', '.join(os.path.basename(h) for h in self.hidden)}" if self.hidden else ""
        return (f"{self.interpreter} and {len(self.binds) - 2} files it loads (shared objects, locale data; "
                f"read-only), the standard "
                f"library {self.stdlib}{hidden} (read-only), {', '.join(DEVICES)}, its own /proc, and private "
                f"tmpfs {WORKDIR} (cwd), /tmp, /dev/shm; nothing else")

    def mount_args(self) -> list[str]:
        """bwrap's arguments for the filesystem. With a stage, its top-level entries (2-3 mounts) stand for the
        per-file binds and symlinks (about 60 mounts: ~25 ms a run on a busy 2-core machine)."""
        devices = [d for d in DEVICES if os.path.exists(d)]
        own = [*devices] if self.stage else [*self.binds, *(p for p, _ in self.links), *devices]
        # the directories on the way, world-traversable (bwrap would make them 0700, which only root could use)
        dirs = {os.path.dirname(p) for p in own}
        dirs = {"/".join(d.split("/")[:i + 1]) for d in dirs for i in range(1, d.count("/") + 1)}
        args = []
        for d in sorted(dirs - {"", "/"} - {p for p, _ in self.links}, key=lambda d: (d.count("/"), d)):
            args += ["--perms", "0755", "--dir", d]
        if self.stage:
            for name in sorted(os.listdir(self.stage)):
                path = os.path.join(self.stage, name)
                args += (["--symlink", os.readlink(path), "/" + name] if os.path.islink(path) else
                         ["--ro-bind", path, "/" + name])
            args += ["--ro-bind", self.stdlib, self.stdlib]
        else:
            args += [a for p in self.binds for a in ("--ro-bind", p, p)]
            args += [a for p, target in self.links for a in ("--symlink", target, p)]
        for p in self.hidden:
            args += ["--perms", "0555", "--tmpfs", p, "--remount-ro", p]
        for d in devices:
            args += ["--dev-bind", d, d]
        return args + ["--proc", "/proc"]


def _resolve(path: str, links: dict, binds: set, depth: int = 0) -> None:
    """Add what makes `path` reachable inside as it is outside: the symlinks on its way, then the real file."""
    if depth > 40:
        raise ValueError(f"too many symlinks under {path}")
    parts = path.split("/")
    for i in range(1, len(parts)):
        cur = "/".join(parts[:i + 1])
        if os.path.islink(cur):
            target = os.readlink(cur)
            links[cur] = target
            real = os.path.normpath(os.path.join(os.path.dirname(cur), target))
            rest = "/".join(parts[i + 1:])
            return _resolve(real + ("/" + rest if rest else ""), links, binds, depth + 1)
    binds.add(path)


def _under(p: str, roots) -> bool:
    return any(p == r or p.startswith(r.rstrip("/") + "/") for r in roots)


def make_plan(bwrap: str, interpreter: str) -> Plan:
    """Run the probe on `interpreter` and build the allow-list; raises RuntimeError if the probe fails."""
    probe = _PROBE.replace("SKIP", repr(SKIP_MODULES))
    out = subprocess.run([interpreter, "-s", "-S", "-B", "-c", probe], capture_output=True, timeout=60, cwd="/",
                         env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"})
    if out.returncode != 0:
        raise RuntimeError(f"probing {interpreter} failed: {out.stderr.decode(errors='replace')[-300:]}")
    info = json.loads(out.stdout)
    links, binds = {}, set()
    for p in [interpreter, info["stdlib"], *info["files"]]:
        if os.path.exists(p):
            _resolve(p, links, binds)
    stdlib = os.path.realpath(info["stdlib"])
    binds = {b for b in binds if b == stdlib or not _under(b, [stdlib])}
    binds = {b for b in binds if not _under(b, [x for x in binds if x != b and os.path.isdir(x)])}
    hidden = tuple(sorted(os.path.join(stdlib, n) for n in os.listdir(stdlib)
                          if n.endswith(("site-packages", "dist-packages")) and os.path.isdir(os.path.join(stdlib, n))))
    link_items = tuple(sorted(((p, t) for p, t in links.items() if not _under(p, binds)),
                              key=lambda pt: (pt[0].count("/"), pt[0])))
    return Plan(bwrap, interpreter, tuple(info["version"]), stdlib, tuple(sorted(binds)), link_items, hidden,
                os.geteuid() != 0)


def build_stage(plan: Plan) -> str:
    """A directory tree holding the plan's files (hard links where the filesystem allows, else copies), its
    symlinks, and an empty directory where the stdlib is bound: bound read-only at /, it is the allow-list in a
    few mounts. Made once per process, removed at exit."""
    stage = tempfile.mkdtemp(prefix="llmrl-sandbox-root-")
    atexit.register(shutil.rmtree, stage, True)
    os.chmod(stage, 0o755)
    old = os.umask(0o022)
    try:
        for p in plan.binds:
            dest = stage + p
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            if p == plan.stdlib:
                os.makedirs(dest, exist_ok=True)
                continue
            try:
                os.link(p, dest)
            except OSError:
                shutil.copy2(p, dest)
        for p, target in plan.links:
            os.makedirs(os.path.dirname(stage + p), exist_ok=True)
            os.symlink(target, stage + p)
    finally:
        os.umask(old)
    return stage


def find_bwrap() -> str | None:
    return os.environ.get("LLMRL_BWRAP") or shutil.which("bwrap") or shutil.which("bwrap", path="/usr/bin:/bin")


def interpreter() -> str:
    return os.path.realpath(os.environ.get("LLMRL_SANDBOX_PYTHON") or getattr(sys, "_base_executable", None)
                            or sys.executable)


@functools.lru_cache(maxsize=1)
def get_plan() -> tuple[Plan | None, str]:
    """(the plan, "") if bubblewrap can run sandboxes here (checked by running one), else (None, why not)."""
    path = find_bwrap()
    if path is None:
        return None, "bubblewrap (bwrap) is not installed"
    if seccomp.filter_program() is None:
        return None, f"no seccomp table for this architecture ({os.uname().machine})"
    try:
        plan = make_plan(path, interpreter())
    except (OSError, ValueError, RuntimeError, subprocess.SubprocessError) as e:
        return None, f"could not list what the interpreter needs: {e}"
    try:
        plan = dataclasses.replace(plan, stage=build_stage(plan))
    except OSError as e:    # then every file is bound on its own: slower, the same view
        log.info("sandbox: no staged root (%s); binding each file", e)
    lim = Limits(timeout_s=30, cpu_s=30, memory_mb=512, max_procs=8, max_output_bytes=4096, max_file_mb=1, disk_mb=1)
    res = run(plan, "print('ok')", "", lim, frozenset(), time.monotonic())
    if res.status != "ok" or res.stdout != "ok\n":
        return None, f"bwrap does not start here: {res.reason or res.stderr.strip()[-300:]}"
    return plan, ""


# ---------------------------------------------------------------- one run

def _namespace_args(plan: Plan, share_net: bool) -> list[str]:
    args = ["--unshare-pid", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try", "--die-with-parent",
            "--new-session"]
    args += [] if share_net else ["--unshare-net"]
    if plan.user_ns:
        return args + ["--unshare-user"]
    # root: no user namespace (its root would be our uid); the runner keeps only what it needs to drop to a
    # fresh uid, and loses that too when it does
    return args + ["--cap-drop", "ALL", "--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID"]


def _work_args(code_fd: int, disk_mb: int) -> list[str]:
    return ["--perms", "0777", "--size", str(disk_mb << 20), "--tmpfs", WORKDIR,
            "--perms", "0444", "--file", str(code_fd), f"{WORKDIR}/main.py",
            "--perms", "1777", "--size", str(1 << 20), "--tmpfs", "/tmp",
            "--perms", "1777", "--size", str(1 << 20), "--tmpfs", "/dev/shm", "--remount-ro", "/", "--chdir", WORKDIR]


def _read_info(fd: int, deadline: float) -> dict:
    """bwrap's --info-fd JSON ({"child-pid": ..., "pid-namespace": ...}); {} if bwrap ended before writing it."""
    buf = b""
    while time.monotonic() < deadline:
        try:
            return json.loads(buf)
        except ValueError:
            pass
        if not select.select([fd], [], [], max(0.0, deadline - time.monotonic()))[0]:
            break
        chunk = os.read(fd, 4096)
        if not chunk:
            break
        buf += chunk
    try:
        return json.loads(buf)
    except ValueError:
        return {}


def _pipe_with(data: bytes) -> int:
    """The read end of a pipe that holds `data` (small: under the pipe's buffer) and is closed for writing."""
    r, w = os.pipe()
    os.write(w, data)
    os.close(w)
    return r


def run(plan: Plan, code: str, stdin: str, lim: Limits, disable: frozenset, start: float) -> SandboxResult:
    uid = None if plan.user_ns else fresh_uid()
    want = [x for x in ("rlimits", "audit_hook") if x not in disable]   # bwrap itself sets no_new_privs
    cg = None if "cgroup" in disable else RunCgroup.create(lim.max_procs, lim.memory_mb)
    program = None if "seccomp" in disable else seccomp.filter_program()
    code_fd = os.memfd_create("main.py")
    os.write(code_fd, code.encode("utf-8", "replace"))
    os.lseek(code_fd, 0, os.SEEK_SET)
    info_r, info_w = os.pipe()       # bwrap's --info-fd
    notes_r, notes_w = os.pipe()     # the runner's layer notes
    block_r, block_w = os.pipe() if cg else (None, None)
    sec_r = _pipe_with(program) if program else None
    child_fds = [fd for fd in (code_fd, info_w, notes_w, block_r, sec_r) if fd is not None]
    argv = [plan.bwrap, *_namespace_args(plan, "netns" in disable), *plan.mount_args(),
            *_work_args(code_fd, lim.disk_mb), "--info-fd", str(info_w)]
    argv += ["--seccomp", str(sec_r)] if sec_r is not None else []
    argv += ["--block-fd", str(block_r)] if cg else []
    argv += ["--", *runner_argv(plan.interpreter, plan.version, uid, lim, notes_w, WORKDIR, want, [])]
    proc, init_fd, pidns = None, None, None
    rc, out, err, killed_for, cpu_used, gone, left = None, b"", b"", "", 0.0, True, []
    try:
        try:
            proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    cwd="/", env=runner_env(WORKDIR), close_fds=True, pass_fds=child_fds,
                                    start_new_session=True)
        finally:
            for fd in child_fds:
                os.close(fd)
        info = _read_info(info_r, start + lim.timeout_s)
        init_pid, pidns = info.get("child-pid"), info.get("pid-namespace")
        if init_pid is not None and hasattr(os, "pidfd_open"):
            init_fd = os.pidfd_open(init_pid)   # pins PID 1 of the run; checked to be it just below
        if init_pid is not None and namespace_of(init_pid) != pidns:
            init_pid = None                     # already gone (and its pid reused): so is its namespace
            init_fd = os.close(init_fd) if init_fd is not None else None
        if cg:
            if init_pid is not None:
                cg.add(init_pid)                # before the runner's first instruction: bwrap waits on block_fd
            os.write(block_w, b"go")
            os.close(block_w)
            block_w = None
        out, err, killed_for = communicate(proc, stdin.encode("utf-8", "replace"), start + lim.timeout_s,
                                           lim.max_output_bytes, True)
    finally:
        if cg and (killed_for or proc is None or not exited(proc.pid)):
            cg.kill()                           # the whole run at once, bwrap's PID 1 included
        if proc is not None:
            kill_group(proc, True)              # bwrap (exited, or killed here): PID 1 dies with it
            _, wstatus, usage = os.wait4(proc.pid, 0)
            proc.returncode = rc = os.waitstatus_to_exitcode(wstatus)
            cpu_used = usage.ru_utime + usage.ru_stime    # bwrap's, with the processes it waited for
        if init_fd is not None:
            gone = wait_pidfd(init_fd, 2.0)
            if not gone:
                signal.pidfd_send_signal(init_fd, signal.SIGKILL)
                gone = wait_pidfd(init_fd, 2.0)
            os.close(init_fd)
        elif pidns is not None:                 # no pidfds (Python < 3.9 or kernel < 5.3): look
            deadline = time.monotonic() + 2.0
            while (gone := not pids_in_namespace(pidns)) is False and time.monotonic() < deadline:
                time.sleep(0.005)
        left = cg.remove() if cg else []
        for fd in (info_r, block_w):
            if fd is not None:
                os.close(fd)
        notes = _read_all(notes_r)
    return _result(uid, lim, start, disable, cg, rc, out, err, killed_for, cpu_used, notes, gone, left, pidns)


def _read_all(fd: int) -> str:
    os.set_blocking(fd, False)
    try:
        data = os.read(fd, 65536).decode(errors="replace")
    except BlockingIOError:
        data = ""
    os.close(fd)
    return data


def _result(uid, lim, start, disable, cg, rc, out, err, killed_for, cpu_used, notes, gone, left,
            pidns) -> SandboxResult:
    if not killed_for and rc != 0 and not notes:
        rc = None                        # bwrap itself failed before the runner started: stderr says why
    elif rc is not None and 128 < rc < 128 + 65:
        rc = 128 - rc                    # bwrap's PID 1 passes on a death by signal N as exit status 128 + N
    layers = [x for x in ("pidns", "mountns", "netns", "seccomp", "cgroup", "no_new_privs", "output_cap")
              if x not in disable and (x != "cgroup" or cg)]
    layers += [line for line in notes.splitlines() if line and not line.startswith("-")]
    missing = {}
    for line in notes.splitlines():
        if line.startswith("-"):
            name, _, why = line[1:].partition(": ")
            missing[name] = why
    if cg is None and "cgroup" not in disable:
        missing["cgroup"] = parent_dir()[1] or "could not create one"
    extra = []
    if not gone or left:
        extra.append(f"COULD NOT KILL the run's processes (PID namespace {pidns}, cgroup left: {left})")
        log.error("sandbox: processes of PID namespace %s survived the run (cgroup: %s)", pidns, left)
    return finish(rc, out, err, killed_for, cpu_used, lim, start, mode="bwrap", layers=layers, missing=missing,
                  notes=extra, uid=uid, pidns=pidns)
