"""train/heap.py: after retain_heap, a large tensor comes from the heap (no mmap), and freed memory is reused."""

import ctypes
import ctypes.util

import pytest
import torch

from llmrl.train.heap import retain_heap


class Mallinfo2(ctypes.Structure):       # glibc >= 2.33
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


def mallinfo():
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    if not hasattr(libc, "mallinfo2"):
        pytest.skip("no mallinfo2 (not glibc >= 2.33)")
    libc.mallinfo2.restype = Mallinfo2
    return libc.mallinfo2()


def test_large_blocks_come_from_the_heap_and_stay_there():
    if not retain_heap():
        pytest.skip("not glibc: retain_heap does nothing")
    assert retain_heap()                                   # idempotent
    size = 96 << 20                                        # above glibc's largest mmap threshold (32 MB)
    before = mallinfo()
    x = torch.ones(size, dtype=torch.uint8)
    during = mallinfo()
    assert during.hblkhd - before.hblkhd < size            # not an mmap of its own
    assert during.uordblks - before.uordblks >= size       # but heap memory in use
    del x
    after = mallinfo()
    assert after.fordblks - before.fordblks >= size // 2   # freed into the heap, kept (not trimmed) for reuse
