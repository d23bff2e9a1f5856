"""The decode step's small ops in C (`decode_kernels.c`), built and loaded by `llmrl.compute.kernels`.

A decode step of a 135M model at 16 rows spends more time in PyTorch's per-op overhead than in arithmetic: ~20 small
ops a layer (norms, casts, RoPE, cache writes, attention, SiLU, residual adds) around four matmuls whose weights
stream from memory. `decode_kernels.c` does those small ops in four calls a layer.

`kernels()` returns None (and the decoder keeps its PyTorch path) where there is no C compiler, the build fails,
`LLMRL_DECODE_KERNELS=0` or `LLMRL_C_KERNELS=0`.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from llmrl.compute.kernels import F, I, L, P, load, ptr  # noqa: F401  (ptr: re-exported for the decoder)

SOURCE = Path(__file__).with_name("decode_kernels.c")
SIGNATURES = {
    "add_rms_cast": [P, P, P, P, I, I, F],
    "silu_mul": [P, P, I, I],
    "rope_attend": [P, P, P, P, P, P, L, P, P, I, I, I, I, I, I, F],
}


@lru_cache(maxsize=1)
def kernels():
    """The loaded library, or None (see the module docstring)."""
    return load(SOURCE, SIGNATURES, "LLMRL_DECODE_KERNELS", "decode kernels")
