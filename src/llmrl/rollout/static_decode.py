"""The sampler's decode loop on a GPU: a static KV cache and a decode step of fixed shapes, captured once per
`generate` call as a CUDA graph and replayed for every token.

Decoding a small model on a GPU is launch-bound: a step of a 28-layer model is ~400 small kernels, each a few
microseconds of work behind ~5 of Python and launch overhead. Replaying a captured graph launches them all at once.
A graph needs fixed shapes and fixed memory, so, unlike the CPU's `LeanRunner`:

- the KV cache is one tensor [layers, 2, N, K, P + T, D] for all N rows, allocated at prefill;
- rows are never dropped from the batch when they stop (`compacts = False`): a stopped row decodes on, and the
  sampler ignores its tokens (as HF's generate and vLLM's static batches do);
- every step attends over all P + T slots under a key mask [N, P + T] (slots not yet written are masked out) and
  writes its keys and values at a slot held in a tensor (`LeanDecoder.decode_static`).

The step's inputs (token, position, slot) are copied into the graph's own tensors before each replay; the logits
come back in the graph's output tensor, valid until the next step. Without CUDA (tests; `graphs=False`) the same
step runs eagerly, so the CPU tests check every value the GPU replays.
"""

from __future__ import annotations

import torch

from llmrl.compute.lean_decoder import LeanDecoder


def prompt_attention(prompt_mask: torch.Tensor) -> torch.Tensor:
    """prompt_mask [B, P] -> allowed [B, P, P]: causal over the real tokens; a pad query sees itself (no NaN)."""
    P = prompt_mask.shape[1]
    valid = prompt_mask.bool()
    causal = torch.ones(P, P, dtype=torch.bool, device=valid.device).tril()
    eye = torch.eye(P, dtype=torch.bool, device=valid.device)
    return causal & valid[:, None, :] | eye


class StaticRunner:
    """Llama-family models through `LeanDecoder.decode_static` on a static cache; the step a CUDA graph where the
    weights are on a GPU (`graphs`, default: whether they are)."""

    compacts = False

    def __init__(self, model, dtype: torch.dtype | None, graphs: bool | None = None):
        self.lean = LeanDecoder(model, dtype)
        device = self.lean.norm.device
        self.graphs = device.type == "cuda" if graphs is None else graphs
        self.graph = None

    def prefill(self, prompt_ids, prompt_mask, positions, group_size: int, max_new_tokens: int):   # -> [N, V]
        B, P = prompt_ids.shape
        G, device = group_size, prompt_ids.device
        cache = self.lean.new_cache(B, P)
        logits = self.lean.forward(prompt_ids, positions, cache, 0, prompt_attention(prompt_mask))      # [B, V]
        N, L = B * G, P + max_new_tokens
        self.cache = self.lean.new_cache(N, L)                                 # [layers, 2, N, K, L, D]
        self.cache[:, :, :, :, :P] = cache.repeat_interleave(G, 2)
        self.cache[:, :, :, :, P:] = 0                                         # masked, but never uninitialised NaN
        self.keys = torch.zeros(N, L, dtype=torch.bool, device=device)        # [N, L]
        self.keys[:, :P] = prompt_mask.bool().repeat_interleave(G, 0)
        self.slot = torch.full((1,), P, dtype=torch.long, device=device)
        self.ids = torch.zeros(N, dtype=torch.long, device=device)
        self.pos = torch.zeros(N, dtype=torch.long, device=device)
        self.lean._rope_tables(int(positions.max()) + 1 + max_new_tokens)     # every decode position, before capture
        return logits.repeat_interleave(G, 0)

    def _step(self) -> torch.Tensor:
        self.keys.index_fill_(1, self.slot, True)
        return self.lean.decode_static(self.ids, self.pos, self.cache, self.slot, self.keys)

    def _capture(self) -> None:
        """Two warm-up steps on a side stream (as torch.cuda.graphs asks), then the capture. All three compute the
        same step on the same inputs (the writes are idempotent), so the cache holds its values when replay starts."""
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                self.out = self._step()
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.out = self._step()

    def decode(self, token, positions):                                        # token, positions [N] -> logits [N, V]
        self.ids.copy_(token)
        self.pos.copy_(positions)
        if not self.graphs:
            self.out = self._step()
        else:
            if self.graph is None:
                self._capture()
            self.graph.replay()
        self.slot.add_(1)
        return self.out
