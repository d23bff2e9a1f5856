"""Keep freed memory in the process heap (glibc), so the large tensors a training step allocates anew every step
do not fault in fresh pages every time.

glibc serves an allocation above its mmap threshold (at most 32 MB: an [V, H] gradient, a chunk of logits, a
batch's activations) with a fresh `mmap`, and returns it to the kernel on `free`; the next step's tensor of the
same size faults in every page again, zero-filled by the kernel. `retain_heap` stops the mmap route for the rest
of the process: every allocation comes from the heap, and the heap is not trimmed below 2 GiB of free top, so
freed blocks are reused. `run.retain_heap: false` leaves the allocator alone; on a C library without `mallopt`
(musl, macOS) this does nothing.

Measured on 11 GRPO steps of bench/compare_trl.py's settings (2026-11-24, 2 cores), without -> with:
- minor page faults 3.1 M -> 1.0 M (about 0.8 M of those are start-up: loading two models); system time
  17.5 -> 9.4-10.8 s;
- median step 5.41-5.57 s (two runs) -> 5.06-5.20 s (five runs);
- peak RSS about the same: 4337-4383 -> 4349-4488 MiB; with gradient checkpointing 3853 -> 3760.

The resident set grows through a run under both settings, by 30-50 MB a step (21 steps: 3826 -> 4645 MiB without,
3830 -> 4786 MiB with), while the tensors reachable from Python stay at 2.6 GB. oneDNN's primitive cache (one
primitive per new matmul shape) is part of it: with ONEDNN_PRIMITIVE_CACHE_CAPACITY=0, 3786 -> 4395 MiB. The rest
is not explained yet. bench/rss_growth.py records the RSS after each phase of each step: over steps 2-16 the
updates add 652 MiB, the rollouts 259 and the reference forwards 12 (not retained: 425, 99, 23). Run apart (16
rollouts, then 16 reference forwards, then 16 updates), the updates added +790-880 MiB retained and +630 not; not
retained and on jemalloc +1440, with MKL_DISABLE_FAST_MM=1 +1250 (from a 700 MB lower start), with a zero
primitive cache +380. The jumps follow the history, not one batch: a batch that added 330 MB in 8th place added
nothing run first, when the second batch added 530 MB instead. glibc's mallinfo2 (2026-11-25, with the lean
training forward) splits the growth: the bytes in use grow ~12 MB a step (~7 of them oneDNN's primitive cache),
the free bytes the heap keeps by the rest (384 MiB after step 1, 1023 after step 12): fragmentation. malloc_trim
before each phase, one arena and a 4 MiB mmap threshold did not stop it. Packs padded to a multiple of 64 slots
(compute/packing.py, PACK_ALIGN) cut the in-use growth (with checkpointing, 21 steps: 122 against 349 MiB) and
the peak (3541 against 3917 MiB); the free bytes still grow (docs/benchmarks.md).

2026-11-25, later: the gradients are freed right after the optimizer step (train/update.py; they were held
through the next rollout) and Adam's moments are allocated at start-up (`allocate_adam_state`). 21 GRPO steps of
the default: 3978 -> 3947 -> 3822 MiB. The peak follows the heap's history more than any one change, though: with
gradient checkpointing the up-front moments measured 3728 MiB against 3453 lazily, and a phase-by-phase probe
(a sampler thread, so a slightly different history) the other way round (3416 against 3758 at 10 steps), where
the lazy run's heap grew by exactly one [V, H] fp32 block (108 MiB: the tied embedding's gradient) a step. A
sparse input-embedding gradient (3895 / 3364 MiB) and an mmap threshold of 32 MiB (3932 / 3632) moved the two
settings in opposite directions too. The moments stay up front for a reason that does not depend on the history:
a run that does not fit fails at start-up, not after its first rollout.

2026-11-25, traced (bench/heap_trace.py, docs/benchmarks.md): after the second step the heap grows only at the end
of an update's backward, by one [V, H] fp32 block at a time: the tied embedding's dense gradient, made while every
other gradient and the LM head's own [V, H] gradient are live. A sparse embedding gradient does not help (autograd
then sums the two into a new block). `objectives.logprobs.TiedEmbedding` sums both into the head's gradient in place,
reserved before the forward: one [V, H] block an update, made early; 12-step peaks 3581-3625 MiB against 3672-3869.

jemalloc (LD_PRELOAD, freed pages kept) was tried in place of all this: steps ~7% faster (4.40-5.20 s), but peak
RSS 4458-4748 MiB, and 4859-6814 MiB with gradient checkpointing; dropped.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

import torch

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4        # mallopt parameters, glibc's <malloc.h>
TRIM_THRESHOLD = 2**31 - 1                    # the largest value mallopt takes (an int)

_done = False


def retain_heap() -> bool:
    """Serve every allocation from the heap and keep freed memory there (glibc `mallopt`). Returns whether the
    allocator now does so; idempotent."""
    global _done
    if _done:
        return True
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        mallopt = libc.mallopt if libc is not None and _is_glibc(libc) else None
    except (OSError, AttributeError):
        mallopt = None
    if mallopt is None:
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    _done = bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    if not _done:
        log.warning("retain_heap: mallopt refused; the allocator is left as it was")
    return _done


def _is_glibc(libc) -> bool:
    try:
        version = libc.gnu_get_libc_version
    except AttributeError:
        return False
    version.restype = ctypes.c_char_p
    return bool(version())


def allocate_adam_state(optimizer: torch.optim.Optimizer | None) -> bool:
    """Give an Adam/AdamW optimizer with no state yet its zero moments now, at start-up, rather than at its first
    `step`. Returns whether it did (False: None, not Adam's kind, or the state is already there: resumed).

    The same values as the lazy start (moments 0, step 0), loaded through the public `load_state_dict`, so the step
    tensor gets the dtype and device the fused kernel wants. Why: allocated lazily, the moments (2x the trainable
    weights: 1 GiB at 135M parameters) land in the holes the first step's activations left in the heap, and the
    heap fragments around them. GRPO, bench/compare_trl.py's settings, 21 steps (2026-11-25): peak RSS 3822
    against 3947 MiB, the same step time (with gradient checkpointing the other way: see the module's text). And
    a run that does not fit its optimizer fails at start-up, not after its first rollout."""
    if not isinstance(optimizer, torch.optim.Adam | torch.optim.AdamW) or optimizer.state:
        return False
    sd = optimizer.state_dict()
    state, i = {}, 0
    for group in optimizer.param_groups:
        for p in group["params"]:
            fused = group.get("fused") or group.get("capturable")      # their step lives beside the weight
            s = {"step": torch.tensor(0.0, device=p.device if fused else "cpu"), "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
                 "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format)}
            if group.get("amsgrad"):
                s["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state[i] = s
            i += 1
    optimizer.load_state_dict({"state": state, "param_groups": sd["param_groups"]})
    return True
