"""The sandbox's seccomp filter: a small classic-BPF program, assembled here (no libseccomp needed), that bubblewrap
loads (`--seccomp FD`) right before it starts the sandboxed program.

    program = filter_program()      # bytes (struct sock_filter[]), or None on an architecture without a table

What it does, in order:
- a system call from another ABI (i386 on x86_64, arm32 on arm64) kills the process: its numbers differ;
- on x86_64, an x32 call (number with bit 30 set) fails with EPERM;
- `DENIED` calls fail with EPERM: tracing and reading other processes (ptrace, process_vm_readv/writev, kcmp,
  pidfd_getfd), new namespaces and mounts (unshare, setns, mount and the new mount API, chroot, pivot_root), and
  kernel surfaces sandboxed code has no use for (bpf, perf_event_open, userfaultfd, keyrings, io_uring, modules,
  kexec, swap, reboot, clock setting, open_by_handle_at);
- clone with a CLONE_NEW* flag fails with EPERM; clone3, whose flags the filter cannot read (they are in memory),
  fails with ENOSYS, so the C library falls back to clone.
Signals need no rule: the PID namespace already confines kill() to the sandbox's own processes (a process outside
has no pid there). Most denied calls also need capabilities the sandbox has dropped: the filter is a second wall.
"""

from __future__ import annotations

import functools
import platform
import struct

DENIED = ("ptrace", "process_vm_readv", "process_vm_writev", "kcmp", "pidfd_getfd", "unshare", "setns", "mount",
          "umount2", "pivot_root", "chroot", "move_mount", "open_tree", "fsopen", "fsconfig", "fsmount", "fspick",
          "mount_setattr", "keyctl", "add_key", "request_key", "bpf", "perf_event_open", "userfaultfd",
          "open_by_handle_at", "kexec_load", "kexec_file_load", "init_module", "finit_module", "delete_module", "acct",
          "swapon", "swapoff", "reboot", "io_uring_setup", "io_uring_enter", "io_uring_register", "syslog",
          "quotactl", "lookup_dcookie", "vhangup", "sethostname", "setdomainname", "settimeofday", "clock_settime",
          "adjtimex", "clock_adjtime", "iopl", "ioperm", "uselib")

# System call numbers (checked against libseccomp by tests/sandbox/test_seccomp.py where libseccomp is installed).
# A name missing from an architecture's table does not exist there.
SYSCALLS = {
    "x86_64": dict(
        ptrace=101, process_vm_readv=310, process_vm_writev=311, kcmp=312, pidfd_getfd=438, unshare=272, setns=308,
        mount=165, umount2=166, pivot_root=155, chroot=161, move_mount=429, open_tree=428, fsopen=430, fsconfig=431,
        fsmount=432, fspick=433, mount_setattr=442, keyctl=250, add_key=248, request_key=249, bpf=321,
        perf_event_open=298, userfaultfd=323, open_by_handle_at=304, kexec_load=246, kexec_file_load=320,
        init_module=175, finit_module=313, delete_module=176, acct=163, swapon=167, swapoff=168, reboot=169,
        io_uring_setup=425, io_uring_enter=426, io_uring_register=427, syslog=103, quotactl=179, lookup_dcookie=212,
        vhangup=153, sethostname=170, setdomainname=171, settimeofday=164, clock_settime=227, adjtimex=159,
        clock_adjtime=305, iopl=172, ioperm=173, uselib=134, clone=56, clone3=435),
    "aarch64": dict(
        ptrace=117, process_vm_readv=270, process_vm_writev=271, kcmp=272, pidfd_getfd=438, unshare=97, setns=268,
        mount=40, umount2=39, pivot_root=41, chroot=51, move_mount=429, open_tree=428, fsopen=430, fsconfig=431,
        fsmount=432, fspick=433, mount_setattr=442, keyctl=219, add_key=217, request_key=218, bpf=280,
        perf_event_open=241, userfaultfd=282, open_by_handle_at=265, kexec_load=104, kexec_file_load=294,
        init_module=105, finit_module=273, delete_module=106, acct=89, swapon=224, swapoff=225, reboot=142,
        io_uring_setup=425, io_uring_enter=426, io_uring_register=427, syslog=116, quotactl=60, lookup_dcookie=18,
        vhangup=58, sethostname=161, setdomainname=162, settimeofday=170, clock_settime=112, adjtimex=171,
        clock_adjtime=266, clone=220, clone3=435),
}
AUDIT_ARCH = {"x86_64": 0xC000003E, "aarch64": 0xC00000B7}
X32_BIT = 0x40000000
CLONE_NEW_FLAGS = 0x00020000 | 0x02000000 | 0x04000000 | 0x08000000 | 0x10000000 | 0x20000000 | 0x40000000 | 0x80
#                 NEWNS        NEWCGROUP    NEWUTS       NEWIPC       NEWUSER      NEWPID       NEWNET       NEWTIME

# classic BPF opcodes and seccomp return values
_LD_ABS, _JEQ, _JGE, _JSET, _RET = 0x20, 0x15, 0x35, 0x45, 0x06
RET_KILL_PROCESS, RET_ALLOW, RET_ERRNO = 0x80000000, 0x7FFF0000, 0x00050000
EPERM, ENOSYS = 1, 38
_NR, _ARCH, _ARG0_LOW = 0, 4, 16        # offsets in struct seccomp_data (little-endian: arg 0's low word at 16)


def assemble(program: list[tuple]) -> bytes:
    """Instructions to struct sock_filter[] bytes. An instruction is (op, k) or (op, k, jump_true, jump_false) with
    jumps given as label names; ("label", name) marks a position."""
    labels, pos = {}, 0
    for ins in program:
        if ins[0] == "label":
            labels[ins[1]] = pos
        else:
            pos += 1
    out, pos = [], 0
    for ins in program:
        if ins[0] == "label":
            continue
        op, k, *jumps = ins
        jt, jf = (0, 0)
        if jumps:
            jt, jf = (0 if j is None else labels[j] - pos - 1 for j in jumps)
            if not (0 <= jt < 256 and 0 <= jf < 256):
                raise ValueError("seccomp: jump out of range")
        out.append(struct.pack("<HBBI", op, jt, jf, k))
        pos += 1
    return b"".join(out)


def program_for(arch: str) -> list[tuple]:
    """The filter for one architecture (a key of SYSCALLS), as instructions for `assemble`."""
    nr = SYSCALLS[arch]
    prog = [(_LD_ABS, _ARCH), (_JEQ, AUDIT_ARCH[arch], None, "kill"), (_LD_ABS, _NR)]
    if arch == "x86_64":
        prog.append((_JGE, X32_BIT, "eperm", None))
    prog += [(_JEQ, nr[name], "eperm", None) for name in DENIED if name in nr]
    prog += [(_JEQ, nr["clone3"], "enosys", None), (_JEQ, nr["clone"], "clone", None), (_RET, RET_ALLOW),
             ("label", "clone"), (_LD_ABS, _ARG0_LOW), (_JSET, CLONE_NEW_FLAGS, "eperm", None), (_RET, RET_ALLOW),
             ("label", "eperm"), (_RET, RET_ERRNO | EPERM),
             ("label", "enosys"), (_RET, RET_ERRNO | ENOSYS),
             ("label", "kill"), (_RET, RET_KILL_PROCESS)]
    return prog


@functools.lru_cache(maxsize=None)
def filter_program(arch: str | None = None) -> bytes | None:
    """The assembled filter for `arch` (default: this machine's), or None where there is no table for it."""
    arch = arch or platform.machine()
    return assemble(program_for(arch)) if arch in SYSCALLS else None
