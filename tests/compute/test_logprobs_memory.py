"""Peak memory of `response_logprobs` (forward and backward) grows with the head's chunk, not with T x vocab.

Measurement: torch's own CPU allocator reports every allocation and free to the profiler when
`profile_memory=True`; replaying those `[memory]` records in time order gives the bytes live at each
moment, and their running maximum is the peak above the level before the call. This counts exactly the
tensors torch allocates (activations, saved tensors, gradients, temporaries) and nothing else — unlike
`tracemalloc` (blind to torch's allocator) or RSS (inflated by malloc caching and thread arenas). CPU
autograd runs backward on the calling thread, so backward's allocations are recorded too.

The model is the tiny Llama with 32k extra tokens: hidden 64, vocabulary ~32.1k, so one fp32 [N, T, V]
logits tensor is ~500 times the [N, T, H] hidden states, and would dominate any peak it were part of.
"""

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from llmrl.models import build_tiny
from llmrl.compute.logprobs import response_logprobs

N, P = 2, 8


@pytest.fixture(scope="module")
def wide():
    model, _ = build_tiny(0, vocab_extra=32_000)
    return model.train()


def peak_bytes(model, T: int, chunk: int) -> int:
    """Peak bytes allocated by torch on the CPU above the starting level, over a forward and backward."""
    ids = torch.randint(0, model.config.vocab_size, (N, P + T), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0                                   # one left-padded prompt
    model.zero_grad(set_to_none=True)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        logp, entropy = response_logprobs(model, ids, mask, T, chunk=chunk)
        (logp.sum() + entropy.sum()).backward()
        del logp, entropy
    records = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                     key=lambda e: e.start_ns())
    live = peak = 0
    for e in records:
        live += e.nbytes()
        peak = max(peak, live)
    model.zero_grad(set_to_none=True)
    return peak


def test_peak_memory_grows_with_the_chunk_not_with_t_times_vocab(wide):
    V = wide.config.vocab_size
    logits_row = N * V * 4                           # bytes of one response position of fp32 [N, T, V] logits
    short, long = peak_bytes(wide, 64, 16), peak_bytes(wide, 256, 16)
    wider_chunk = peak_bytes(wide, 256, 64)
    # 4x longer responses at the same chunk: the peak grows by less than a quarter of the logits of the extra
    # 192 positions (what growth is left is the backbone's activations and attention, which do not scale with V)
    assert long - short < 0.25 * 192 * logits_row, (short, long)
    # a 4x wider chunk at the same T: the peak grows by at least one fp32 logits tensor of the 48 extra
    # positions (log-softmax and its gradient hold a few), so the measurement does see the head's tensors
    assert wider_chunk - long > 48 * logits_row, (long, wider_chunk)
    # and the whole peak stays below what the unchunked logits alone would take
    assert long < 256 * logits_row, (long, 256 * logits_row)
