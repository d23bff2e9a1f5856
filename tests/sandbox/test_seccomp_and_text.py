"""The seccomp filter's tables and assembler (checked against libseccomp where it is installed, and by running the
BPF program in a tiny interpreter), `escape`, and the places llmrl reports the active layer: `llmrl doctor`, the
config's `sandbox` section, the run report."""

import ctypes
import os
import ctypes.util
import json
import struct

import pytest

from llmrl.config import ConfigError
from llmrl.config_loader import load_config
from llmrl.sandbox import escape, seccomp


# ---------------------------------------------------------------- seccomp

def _libseccomp():
    try:
        return ctypes.CDLL(ctypes.util.find_library("seccomp") or "libseccomp.so.2")
    except OSError:
        return None


@pytest.mark.skipif(_libseccomp() is None, reason="libseccomp is not installed (apt-get install libseccomp2)")
@pytest.mark.parametrize("arch", sorted(seccomp.SYSCALLS))
def test_syscall_numbers_match_libseccomp(arch):
    resolve = _libseccomp().seccomp_syscall_resolve_name_arch
    resolve.argtypes, resolve.restype = [ctypes.c_uint32, ctypes.c_char_p], ctypes.c_int
    table = seccomp.SYSCALLS[arch]
    for name in (*seccomp.DENIED, "clone", "clone3"):
        want = resolve(seccomp.AUDIT_ARCH[arch], name.encode())
        if want < 0:      # no such call on this architecture (libseccomp gives a negative pseudo-number)
            assert name not in table, f"{arch}: {name}"
        else:
            assert table[name] == want, f"{arch}: {name} is {want}, not {table[name]}"


def _run_bpf(program: bytes, nr: int, arch: int, arg0: int = 0) -> int:
    """A minimal classic-BPF interpreter for the opcodes `seccomp.assemble` emits: the filter's verdict."""
    data = struct.pack("<iIQ6Q", nr, arch, 0, arg0, 0, 0, 0, 0, 0)
    ins = [struct.unpack("<HBBI", program[i:i + 8]) for i in range(0, len(program), 8)]
    acc, pc = 0, 0
    while True:
        op, jt, jf, k = ins[pc]
        if op == 0x20:
            acc = struct.unpack_from("<I", data, k)[0]
            pc += 1
        elif op in (0x15, 0x35, 0x45):
            hit = acc == k if op == 0x15 else acc >= k if op == 0x35 else bool(acc & k)
            pc += 1 + (jt if hit else jf)
        elif op == 0x06:
            return k
        else:
            raise AssertionError(f"unexpected opcode {op:#x}")


@pytest.mark.parametrize("arch", sorted(seccomp.SYSCALLS))
def test_filter_verdicts(arch):
    prog, nr, audit = seccomp.filter_program(arch), seccomp.SYSCALLS[arch], seccomp.AUDIT_ARCH[arch]
    eperm, enosys = seccomp.RET_ERRNO | seccomp.EPERM, seccomp.RET_ERRNO | seccomp.ENOSYS
    for name in seccomp.DENIED:
        if name in nr:
            assert _run_bpf(prog, nr[name], audit) == eperm, name
    assert _run_bpf(prog, 0, audit) == seccomp.RET_ALLOW                     # read / io_setup
    assert _run_bpf(prog, 39 if arch == "x86_64" else 172, audit) == seccomp.RET_ALLOW   # getpid
    assert _run_bpf(prog, nr["clone3"], audit) == enosys
    assert _run_bpf(prog, nr["clone"], audit, arg0=0x01200011) == seccomp.RET_ALLOW     # fork's flags
    assert _run_bpf(prog, nr["clone"], audit, arg0=0x10000000 | 17) == eperm           # CLONE_NEWUSER
    assert _run_bpf(prog, nr["clone"], audit, arg0=0x20000000 | 17) == eperm           # CLONE_NEWPID
    assert _run_bpf(prog, 0, 0x40000003) == seccomp.RET_KILL_PROCESS                   # i386 ABI
    if arch == "x86_64":
        assert _run_bpf(prog, 0x40000000 | 101, audit) == eperm                        # x32 ptrace


def test_assemble_rejects_far_jumps():
    far = [(0x15, 1, "end", None)] + [(0x06, 0)] * 300 + [("label", "end"), (0x06, 0)]
    with pytest.raises(ValueError, match="out of range"):
        seccomp.assemble(far)


# ---------------------------------------------------------------- escape

@pytest.mark.parametrize("text, want", [
    ("plain text", "plain text"),
    ("a\nb\r\tc", "a\\nb\\r\\tc"),
    ("\x1b[2J\x07", "\\x1b[2J\\x07"),
    ("back\\slash", "back\\\\slash"),            # so an escape in the output always stands for a character
    ("\u202eevil\u200b\u2028", "\\u202eevil\\u200b\\u2028"),   # bidi override, zero-width space, line separator
    ("\x9b31m", "\\x9b31m"),                      # C1 CSI
    ("héllo ✓", "héllo ✓"),
])
def test_escape(text, want):
    assert escape(text) == want


def test_escape_caps_the_length_and_says_how_much_was_cut():
    assert escape("x" * 50, limit=10) == "x" * 10 + "... [40 more characters]"
    assert escape("\n" * 10, limit=5) == "\\n\\n... [8 more characters]"   # an escape is never split
    assert escape(ValueError("a\nb")) == "a\\nb"


# ---------------------------------------------------------------- where the active layer is said

def test_config_sandbox_section():
    assert load_config(None).sandbox.allow_weak is False
    assert load_config(None, ["sandbox.allow_weak=true"]).sandbox.allow_weak is True
    with pytest.raises(ConfigError, match="sandbox"):
        load_config(None, ["sandbox.allow_weakly=true"])


def test_doctor_prints_the_active_layer(capsys):
    from llmrl.cli import main
    from llmrl.sandbox import status
    rc = main(["doctor"])
    out = capsys.readouterr().out
    st = status()
    assert rc == (0 if st.mode else 1)
    assert out.startswith(f"sandbox layer: {st.mode or 'NONE'}")
    if st.mode == "bwrap":
        assert "active: pidns, mountns, netns, seccomp" in out and "nothing else" in out


def test_the_cli_refuses_model_code_without_a_sandbox(monkeypatch, capsys):
    from llmrl.cli import sandbox_for
    from llmrl.rewards.code import code_tests
    from llmrl.rewards.functions import REWARDS
    from llmrl.sandbox import core
    monkeypatch.setattr(core, "_probe", lambda: (None, "bubblewrap (bwrap) is not installed"))
    monkeypatch.setattr(core, "_privileged", lambda: False)
    try:
        assert sandbox_for([code_tests], False) == (None, 2)
        assert "apt-get install bubblewrap" in capsys.readouterr().err
        assert sandbox_for([REWARDS.get("correct")], False) == (None, 0)     # no model code: nothing to check
        st, rc = sandbox_for([code_tests], True)
        assert rc == 0 and st.mode == "weak"
    finally:
        core.configure(allow_weak=False)


def test_the_report_shows_the_sandbox_layer(tmp_path):
    from llmrl.report.html import render
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"kind": "train", "step": 1, "reward": 0.5}) + "\n")
    (tmp_path / "sandbox.json").write_text(json.dumps({"mode": "weak", "layers": ["rlimits"],
                                                       "missing": {"bwrap": "not installed"}, "allow_weak": True}))
    page = render(tmp_path)
    assert "<h2>Sandbox</h2>" in page and 'class="warn"' in page and "rlimits only" in page
    assert "missing bwrap: not installed" in page


def test_llmrl_train_with_a_code_reward_records_the_sandbox_layer(tmp_path):
    from llmrl.cli import main
    from llmrl.sandbox import status
    terms = "reward.terms=[{name: correct}, {name: code_tests, weight: 0.5}]"   # arithmetic has no tests: scored 0
    rc = main(["train", "preset=grpo", "model.name=tiny", "model.autocast=none", "task.heldout_size=2",
               "rollout.prompts_per_step=1", "rollout.group_size=2", "rollout.max_new_tokens=4", "run.progress=false",
               "run.eval_every=0", f"run.output_dir={tmp_path}", "run.name=r", "run.steps=1", terms])
    assert rc == 0
    recorded = json.loads((tmp_path / "r" / "sandbox.json").read_text())
    assert recorded["mode"] == status().mode and recorded["layers"] == list(status().layers)
    assert "<h2>Sandbox</h2>" in (tmp_path / "r" / "report.html").read_text()


def test_empty_run_cgroups_of_dead_trainers_are_removed():
    from llmrl.sandbox import cgroup
    base = cgroup.parent_dir()[0]
    if base is None:
        pytest.skip("cgroup v2 is not writable here")
    dead = 4_000_000   # above any pid_max: no such process
    stale, alive = f"{base}/llmrl-sandbox-{dead}-0", f"{base}/llmrl-sandbox-{os.getpid()}-999999"
    os.mkdir(stale)
    os.mkdir(alive)
    try:
        cgroup._remove_stale(base)
        assert not os.path.exists(stale) and os.path.exists(alive)
    finally:
        for d in (stale, alive):
            if os.path.exists(d):
                os.rmdir(d)
