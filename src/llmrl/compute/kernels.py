"""Small C kernels, compiled with the system C compiler at first use and called through ctypes on tensors' memory.

Two sources use this: `compute/decode_kernels.c` (a decode step's small ops, for the lean sampler) and
`compute/head_kernels.c` (the LM head's softmax passes over bf16 logits, for `ChunkedHead`). Each library is
built once per source, compiler and CPU into `cache_dir()/kernels/` (written to a temporary name and renamed, so
that concurrent processes do not see a half-written file), with `-march=native`: the CPU's flags are part of its
name. ctypes releases the GIL for the call.

`load()` returns None (and the caller keeps its PyTorch path) where there is no C compiler, the build fails, or
`LLMRL_C_KERNELS=0` (`LLMRL_DECODE_KERNELS=0` turns off the decode kernels alone, `LLMRL_HEAD_KERNELS=0` the head's).
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

from llmrl.cache import cache_dir

log = logging.getLogger(__name__)

# -ffp-contract=off: no fused multiply-adds where the kernels reproduce PyTorch's elementwise arithmetic (RoPE, the
# norm); sums that want them use explicit fmaf. -fno-strict-aliasing: the bf16 conversions work on the bits.
FLAGS = ["-O3", "-march=native", "-fopenmp-simd", "-ffp-contract=off", "-fno-strict-aliasing",
         "-Werror=implicit-function-declaration", "-shared", "-fPIC"]
if platform.machine() in ("x86_64", "AMD64"):
    FLAGS.insert(2, "-mprefer-vector-width=512")      # gcc's default on AVX-512 parts is 256-bit vectors
P, I, L, F = ctypes.c_void_p, ctypes.c_int, ctypes.c_long, ctypes.c_float


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor()


def build(source: Path, out_dir: Path, compiler: str = "cc") -> Path:
    """Compile `source` into `out_dir` (unless already there); returns the library's path."""
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, check=True).stdout
    key = hashlib.sha256("\n".join([source.read_text(), " ".join(FLAGS), version, _cpu_flags(),
                                    platform.machine()]).encode()).hexdigest()[:16]
    lib = out_dir / f"{source.stem.removesuffix('_kernels')}-{key}.so"
    if not lib.exists():
        out_dir.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=out_dir, suffix=".so.tmp")
        os.close(fd)
        try:
            subprocess.run([compiler, *FLAGS, "-o", tmp, str(source), "-lm", "-lpthread"], check=True,
                           capture_output=True, text=True)
            os.replace(tmp, lib)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return lib


def load(source: Path, signatures: dict[str, list], switch: str, what: str):
    """The library built from `source` with its functions' argument types set, or None (module docstring).
    `switch`: the environment variable that turns this library off; `what`: its name in the warning."""
    if os.environ.get("LLMRL_C_KERNELS", "1") == "0" or os.environ.get(switch, "1") == "0":
        return None
    compiler = os.environ.get("CC", "cc")
    if shutil.which(compiler) is None or platform.system() != "Linux":
        return None
    try:
        lib = ctypes.CDLL(str(build(source, cache_dir() / "kernels", compiler)))
    except (OSError, subprocess.CalledProcessError) as e:
        detail = getattr(e, "stderr", "") or e
        log.warning("%s unavailable (PyTorch ops instead): %s", what, str(detail).strip()[:500])
        return None
    for name, args in signatures.items():
        getattr(lib, name).argtypes = args
        getattr(lib, name).restype = None
    return lib


def ptr(t: torch.Tensor) -> int:
    """The address of a contiguous tensor's first element."""
    assert t.is_contiguous(), "C kernels read contiguous tensors"
    return t.data_ptr()
