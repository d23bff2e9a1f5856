"""The decode step's small ops in C (`decode_kernels.c`), compiled with the system C compiler at first use and
called through ctypes on the tensors' memory.

A decode step of a 135M model at 16 rows spends more time in PyTorch's per-op overhead than in arithmetic: ~20 small
ops a layer (norms, casts, RoPE, cache writes, attention, SiLU, residual adds) around four matmuls whose weights
stream from memory. `decode_kernels.c` does those small ops in four calls a layer. The library is built once per
source, compiler and CPU into `cache_dir()/kernels/` (written to a temporary name and renamed, so that concurrent
processes do not see a half-written file), with `-march=native`: the CPU's flags are part of its name.

`kernels()` returns None (and the decoder keeps its PyTorch path) where there is no C compiler, the build fails, or
`LLMRL_DECODE_KERNELS=0`.
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
from functools import lru_cache
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("decode_kernels.c")
# -ffp-contract=off: no fused multiply-adds where the kernels reproduce PyTorch's elementwise arithmetic (RoPE, the
# norm); the attention's sums use explicit fmaf. -fno-strict-aliasing: the bf16 conversions work on the bits.
FLAGS = ["-O3", "-march=native", "-fopenmp-simd", "-ffp-contract=off", "-fno-strict-aliasing",
         "-Werror=implicit-function-declaration", "-shared", "-fPIC"]
if platform.machine() in ("x86_64", "AMD64"):
    FLAGS.insert(2, "-mprefer-vector-width=512")      # gcc's default on AVX-512 parts is 256-bit vectors
_P, _I, _L, _F = ctypes.c_void_p, ctypes.c_int, ctypes.c_long, ctypes.c_float
SIGNATURES = {
    "add_rms_cast": [_P, _P, _P, _P, _I, _I, _F],
    "silu_mul": [_P, _P, _I, _I],
    "rope_attend": [_P, _P, _P, _P, _P, _P, _L, _P, _P, _I, _I, _I, _I, _I, _I, _F],
}


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor()


def build(out_dir: Path, compiler: str = "cc") -> Path:
    """Compile `decode_kernels.c` into `out_dir` (unless already there); returns the library's path."""
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, check=True).stdout
    key = hashlib.sha256("\n".join([SOURCE.read_text(), " ".join(FLAGS), version, _cpu_flags(),
                                    platform.machine()]).encode()).hexdigest()[:16]
    lib = out_dir / f"decode-{key}.so"
    if not lib.exists():
        out_dir.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=out_dir, suffix=".so.tmp")
        os.close(fd)
        try:
            subprocess.run([compiler, *FLAGS, "-o", tmp, str(SOURCE), "-lm"], check=True, capture_output=True,
                           text=True)
            os.replace(tmp, lib)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return lib


@lru_cache(maxsize=1)
def kernels():
    """The loaded library with its functions' argument types set, or None (see the module docstring)."""
    if os.environ.get("LLMRL_DECODE_KERNELS", "1") == "0":
        return None
    compiler = os.environ.get("CC", "cc")
    if shutil.which(compiler) is None or platform.system() != "Linux":
        return None
    from llmrl.models.loading import cache_dir

    try:
        lib = ctypes.CDLL(str(build(cache_dir() / "kernels", compiler)))
    except (OSError, subprocess.CalledProcessError) as e:
        detail = getattr(e, "stderr", "") or e
        log.warning("decode kernels unavailable (the sampler uses PyTorch ops): %s", str(detail).strip()[:500])
        return None
    for name, args in SIGNATURES.items():
        getattr(lib, name).argtypes = args
        getattr(lib, name).restype = None
    return lib


def ptr(t: torch.Tensor) -> int:
    """The address of a contiguous tensor's first element."""
    assert t.is_contiguous(), "decode kernels read contiguous tensors"
    return t.data_ptr()
