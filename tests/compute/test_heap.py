"""compute/heap.py: after retain_heap, a large tensor comes from the heap (no mmap), and freed memory is reused."""

import ctypes
import ctypes.util

import pytest
import torch

from llmrl.compute.heap import allocate_adam_state, retain_heap


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


def _adam_run(kind, eager: bool, steps: int = 3, **kw) -> dict:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    opt = kind(model.parameters(), lr=0.1, **kw)
    if eager:
        assert allocate_adam_state(opt)
        assert not allocate_adam_state(opt)                # already there: left alone
        assert all(float(s["step"]) == 0 and not s["exp_avg"].any() for s in opt.state.values())
    x = torch.randn(8, 5, generator=torch.Generator().manual_seed(1))
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        model(x).pow(2).sum().backward()
        opt.step()
    return {"params": [p.detach().clone() for p in model.parameters()], "state": opt.state_dict()["state"]}


@pytest.mark.parametrize("kind, kw", [(torch.optim.AdamW, {"fused": True}), (torch.optim.AdamW, {}),
                                      (torch.optim.Adam, {"amsgrad": True, "foreach": False})])
def test_adam_state_allocated_up_front_steps_exactly_as_the_lazy_one(kind, kw):
    lazy, eager = _adam_run(kind, False, **kw), _adam_run(kind, True, **kw)
    for a, b in zip(lazy["params"], eager["params"]):
        assert torch.equal(a, b)
    assert lazy["state"].keys() == eager["state"].keys()
    for i, s in lazy["state"].items():
        assert s.keys() == eager["state"][i].keys()
        for k, v in s.items():
            w = eager["state"][i][k]
            assert torch.equal(v, w) and v.dtype == w.dtype and v.device == w.device, k


def test_allocate_adam_state_leaves_other_optimizers_alone():
    p = torch.nn.Parameter(torch.ones(3))
    assert not allocate_adam_state(torch.optim.SGD([p], lr=0.1))
    assert not allocate_adam_state(None)
