"""The sandbox runner: the first code of the sandboxed process (`sandbox/core.py` reads this file and runs it with
`python -c`; it is never imported). It applies the in-process layers, then runs main.py as __main__.

Runs as root (when we are) with the work directory as cwd; argv: uid gid cpu_s memory_mb max_procs max_file_mb
disk_mb info_fd workdir layers (comma-separated: those to apply of netns mountns rlimits no_new_privs audit_hook)
hide (newline-separated directories to cover with an empty read-only tmpfs, with mountns). Under bubblewrap the
namespaces and mounts are already made (and no_new_privs set): the layers asked for are then rlimits and
audit_hook only, and ctypes is not loaded.
Reports "layer" / "-layer: why" lines on info_fd, drops to uid/gid, then runs main.py as __main__.
"""
import os, sys, resource
def _run():
    uid, gid, cpu, mem, nproc, fsize, disk, info_fd = map(int, sys.argv[1:9])
    workdir, want, hide = sys.argv[9], sys.argv[10].split(","), sys.argv[11].split("\n")
    with open("main.py", "rb") as f:
        src = f.read()
    notes = []
    libc = None
    try:
        if not {"netns", "mountns", "no_new_privs"} & set(want):
            raise ImportError("not needed")    # under bubblewrap: it made the namespaces and set no_new_privs
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        def err(what):
            return what + ": " + os.strerror(ctypes.get_errno())
    except Exception as e:
        if "no_new_privs" in want:
            notes.append("-no_new_privs: no ctypes (%s)" % e)
    if "netns" in want and libc is not None:
        if libc.unshare(0x40000000 | 0x08000000) == 0:           # CLONE_NEWNET | CLONE_NEWIPC
            notes.append("netns")
        else:
            notes.append("-netns: " + err("unshare"))
    if "mountns" in want and libc is not None:
        mounted = libc.unshare(0x00020000) == 0                   # CLONE_NEWNS
        if mounted and libc.mount(None, b"/", None, 0x4000 | 0x40000, None) != 0:   # MS_REC | MS_PRIVATE
            notes.append("-mountns: " + err("make / private"))
            mounted = False
        elif not mounted:
            notes.append("-mountns: " + err("unshare"))
        if mounted:
            flags = 2 | 4 | 8                                      # MS_NOSUID | MS_NODEV | MS_NOEXEC
            for d in filter(None, hide):                           # the trainer's code, data and packages
                if libc.mount(b"tmpfs", d.encode(), b"tmpfs", flags | 1, b"size=4k,nr_inodes=8,mode=0555") != 0:
                    mounted = False
                    notes.append("-mountns: " + err("hiding " + d))
            for d in ("/tmp", "/var/tmp", "/dev/shm", "/run/lock", "/var/lock"):
                if os.path.isdir(d) and not os.path.islink(d) and os.stat(d).st_mode & 0o002:
                    if libc.mount(b"tmpfs", d.encode(), b"tmpfs", flags, b"size=1m,nr_inodes=64,mode=1777") != 0:
                        mounted = False
                        notes.append("-mountns: " + err("tmpfs on " + d))
            os.makedirs(workdir, exist_ok=True)
            opts = "size=%dm,nr_inodes=4096,mode=0700,uid=%d,gid=%d" % (disk, max(uid, 0), max(gid, 0))
            if libc.mount(b"tmpfs", workdir.encode(), b"tmpfs", flags, opts.encode()) == 0:
                os.chdir(workdir)                                  # the fresh tmpfs, not the directory under it
                with open("main.py", "wb") as f:
                    f.write(src)
                if mounted:
                    notes.append("mountns")
            else:
                notes.append("-mountns: " + err("tmpfs on the work directory"))
    if "rlimits" in want:
        for res, soft, hard in ((resource.RLIMIT_CPU, cpu, cpu + 1), (resource.RLIMIT_AS, mem << 20, mem << 20),
                                (resource.RLIMIT_NPROC, nproc, nproc), (resource.RLIMIT_CORE, 0, 0),
                                (resource.RLIMIT_FSIZE, fsize << 20, fsize << 20), (resource.RLIMIT_NOFILE, 64, 64)):
            resource.setrlimit(res, (soft, hard))
        notes.append("rlimits")
    if "no_new_privs" in want and libc is not None:
        notes.append("no_new_privs" if libc.prctl(38, 1, 0, 0, 0) == 0 else "-no_new_privs: " + err("prctl"))
    if uid >= 0:
        os.setgroups([])
        os.setresgid(gid, gid, gid)
        os.setresuid(uid, uid, uid)
        try:
            os.setuid(0)
        except PermissionError:
            notes.append("uid")
        else:
            os.write(2, b"sandbox runner: could not drop root\n")
            os._exit(125)
    if "audit_hook" in want:
        def _guard(event, args, getsid=os.getsid):
            if event.startswith("socket."):
                raise PermissionError("network access is disabled in the sandbox (llmrl audit hook: %s)" % event)
            if event in ("os.kill", "os.killpg") and args[0] != 0:  # only processes of the sandbox's session
                target = -args[0] if event == "os.kill" and args[0] < -1 else args[0]
                try:
                    outside = target == -1 or getsid(target) != getsid(0)
                except OSError:
                    outside = False  # no such process: the kill itself fails
                if outside:
                    raise PermissionError("signals to processes outside the sandbox are blocked (llmrl audit hook)")
        sys.addaudithook(_guard)
        notes.append("audit_hook")
    os.write(info_fd, "\n".join(notes).encode())
    os.close(info_fd)
    sys.argv = ["main.py"]
    return src
try:
    _src = _run()
except Exception as e:
    os.write(2, ("sandbox runner failed: %s: %s\n" % (type(e).__name__, e)).encode())
    os._exit(125)
del _run
try:
    _code = compile(_src, "main.py", "exec")
except (SyntaxError, ValueError) as e:
    sys.__excepthook__(type(e), e.with_traceback(None), None)
    sys.exit(1)
_globals = {"__name__": "__main__", "__file__": "main.py", "__builtins__": __builtins__}
try:
    exec(_code, _globals)
except SystemExit:
    raise
except BaseException as e:  # the traceback without the runner's frame
    sys.__excepthook__(type(e), e, e.with_traceback(e.__traceback__.tb_next).__traceback__)
    sys.exit(1)
