"""Per-token log-probs and entropy of the response under a causal LM, computed in chunks.

The backbone runs once over [N, P+T] (or over the rows' real tokens packed end to end, `pack_tokens`:
see `packing.py`); the LM head and the log-softmax run only over the real response tokens (not the
padding), `chunk` of them at a time (`ChunkedHead`), the backward recomputing the logits a vocabulary block
at a time, so no [N, T, V] (or [M, V]) logits tensor ever exists whole, forward or backward. Chunks of ~100
tokens keep each fp32 buffer in the tens of MB (the allocator reuses them: no page faults on fresh memory).
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from llmrl.compute.kernels import F as _F32, I, L, P, load, ptr
from llmrl.compute.packing import packed_response_hidden


def _head_logp_entropy(hidden, head_weight, targets, temperature: float, with_entropy: bool = True):
    """hidden [M, H], targets [M] -> (logp [M], entropy [M] or None) under softmax(h W^T / temperature),
    through plain differentiable ops (the reference, and the path of a second derivative)."""
    logits = F.linear(hidden, head_weight).float()                           # [M, V]
    if temperature != 1.0:                                                   # (saves a pass over [M, V] when 1)
        logits = logits / temperature
    logp_all = torch.log_softmax(logits, -1)
    logp = logp_all.gather(-1, targets[..., None])[..., 0]
    entropy = -(logp_all.exp() * logp_all).sum(-1) if with_entropy else None
    return logp, entropy


def compute_dtype(t: torch.Tensor) -> torch.dtype:
    """The dtype a matmul on t computes in: the autocast dtype when autocast is on for t's device, else t's."""
    kind = t.device.type
    return torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else t.dtype


class TiedEmbedding(torch.autograd.Function):
    """(embeddings [..., H] of `ids`, the weight [V, H] itself) for a weight that is both the input embedding and the
    LM head, so that its two gradients meet in this one node: the head's [V, H] gradient takes the embedding rows'
    gradients in place. Without it autograd sums two [V, H] fp32 blocks at the end of the backward, when every other
    gradient is live (a 135M model: one more 108 MiB block at the update's peak, docs/benchmarks.md). The head reads
    the second output (a view of the weight); rows of `padding_idx` get no gradient, as in `nn.Embedding`."""

    @staticmethod
    def forward(ctx, weight, ids, padding_idx):
        ctx.save_for_backward(ids)
        ctx.padding_idx, ctx.shape = padding_idx, weight.shape
        ctx.set_materialize_grads(False)
        return F.embedding(ids, weight, padding_idx), weight.view_as(weight)

    @staticmethod
    def backward(ctx, g_embeds, g_weight):
        ids, = ctx.saved_tensors
        if g_weight is None:                  # the head's output went unused
            g_weight = g_embeds.new_zeros(ctx.shape)
        if g_embeds is None:
            return g_weight, None, None
        rows, idx = g_embeds.reshape(-1, ctx.shape[1]).to(g_weight.dtype), ids.reshape(-1)      # [n, H], [n]
        if ctx.padding_idx is not None:
            rows = rows * (idx != ctx.padding_idx)[:, None]
        if torch.is_grad_enabled():           # create_graph: out of place, differentiable
            return g_weight.index_add(0, idx, rows), None, None
        return g_weight.index_add_(0, idx, rows), None, None


def tied_trainable_weight(model) -> torch.Tensor | None:
    """The weight `model`'s plain `nn.Embedding` input layer shares with its bias-free LM head, when it trains
    (None otherwise: untied, frozen as under LoRA, or an embedding module of its own kind)."""
    if not torch.is_grad_enabled() or not hasattr(model, "get_input_embeddings"):
        return None
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    if type(emb) is not torch.nn.Embedding or head is None or getattr(head, "bias", None) is not None:
        return None
    return emb.weight if emb.weight is head.weight and emb.weight.requires_grad and not emb.sparse else None


class ChunkedHead(torch.autograd.Function):
    """(logp [M], entropy [M]) of `targets` [M] under softmax(hidden [M, H] W[V, H]^T / temperature), `chunk`
    tokens at a time, so no [M, V] tensor ever exists: the forward keeps only the log-normaliser and the
    entropy per token; the backward recomputes the logits a block of the vocabulary at a time (as many
    elements as a forward chunk) and writes their gradient in place (z: logits / tau, p = softmax(z),
    H = -sum p log p):

        d logp / dz = onehot(y) - p          d H / dz = -p (log p + H)

    so dz = g_logp onehot(y) - p (g_logp + g_H (log p + H)), then dh = dz W / tau and dW = dz^T h / tau. The
    matmuls run in the autocast dtype when autocast is on (as F.linear would), the softmax in fp32. A second
    derivative (TRPO's Fisher-vector products) goes through `_head_logp_entropy` instead. With bf16 logits on the
    CPU the softmax passes run in C (`head_kernels.c`: one pass a row over the bf16 matmul output, where PyTorch
    makes four to six over an fp32 copy, and the gradient written over the logits); an update of
    bench/update_efficiency.py's 16 rows, 1.79 -> 1.75 s (2026-12-04, AMX Xeon, interleaved runs)."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, temperature: float, chunk: int, with_entropy: bool,
                dw_buffer: torch.Tensor | None = None):
        dt = compute_dtype(hidden)
        w = weight.to(dt)
        M = len(targets)
        h, y = _pad_rows(hidden, M), _pad_rows(targets, M)                          # [Mp, H], [Mp]: aligned
        lse = hidden.new_empty(len(y), dtype=torch.float32)
        logp = hidden.new_empty(len(y), dtype=torch.float32)
        entropy = hidden.new_empty(len(y), dtype=torch.float32) if with_entropy else None
        c_lib = _c_head(dt, hidden, targets, weight.shape[0])
        for s in range(0, len(y), chunk):
            if c_lib is not None:             # one pass over the bf16 logits, in C
                z = h[s:s + chunk].to(dt) @ w.T                                     # [c, V] bf16
                c_lib.head_forward(ptr(z), z.shape[1], len(z), z.shape[1], ptr(y[s:s + chunk]), 1.0 / temperature,
                                   ptr(lse[s:]), ptr(logp[s:]), ptr(entropy[s:]) if with_entropy else None,
                                   torch.get_num_threads())
                continue
            z = _chunk_logits(h[s:s + chunk], w, temperature)                       # [c, V] fp32
            lse[s:s + chunk] = c_lse = torch.logsumexp(z, -1)                         # [c]
            logp[s:s + chunk] = z.gather(-1, y[s:s + chunk, None])[:, 0] - c_lse
            if with_entropy:                  # H = lse - sum_v p_v z_v (in fp32: autocast would run vecdot in bf16)
                p = (z - c_lse[:, None]).exp_()
                with torch.autocast(hidden.device.type, enabled=False):
                    entropy[s:s + chunk] = c_lse - torch.linalg.vecdot(p, z)
        ctx.save_for_backward(hidden, weight, targets, lse, entropy)
        ctx.temperature, ctx.chunk, ctx.with_entropy, ctx.dtype = temperature, chunk, with_entropy, dt
        ctx.dw_buffer = dw_buffer
        ctx.set_materialize_grads(False)      # an output the loss does not use gets None, and no work
        return (logp[:M], entropy[:M]) if with_entropy else (logp[:M],)

    @staticmethod
    def backward(ctx, g_logp, g_entropy=None):
        hidden, weight, targets, lse, entropy = ctx.saved_tensors
        tau, chunk = ctx.temperature, ctx.chunk
        if torch.is_grad_enabled():           # create_graph: differentiate the plain ops instead
            ctx.dw_buffer = None
            with torch.autocast(hidden.device.type, dtype=ctx.dtype, enabled=ctx.dtype != hidden.dtype):
                outs = _head_logp_entropy(hidden, weight, targets, tau, ctx.with_entropy)
            pairs = [(o, g) for o, g in zip(outs, (g_logp, g_entropy)) if o is not None and g is not None]
            wrt = [t for t, need in zip((hidden, weight), ctx.needs_input_grad) if need]   # LoRA: W is frozen
            got = iter(torch.autograd.grad([o for o, _ in pairs], wrt, [g for _, g in pairs], create_graph=True,
                                           allow_unused=True))
            return *(next(got) if need else None for need in ctx.needs_input_grad[:2]), None, None, None, None, None
        # the backward runs over blocks of the vocabulary, all M tokens at once: each block's dW rows are
        # final when written (no [V, H] sums across chunks), and a block's [Mp, B] holds at most as many logits
        # as a forward chunk's [chunk, V]
        dt, (V, H), M = ctx.dtype, weight.shape, len(targets)
        h, targets = _pad_rows(hidden.to(dt), M), _pad_rows(targets, M)                  # [Mp, H], [Mp]
        g_logp, g_entropy = _pad_rows(g_logp, M), _pad_rows(g_entropy, M)                 # padded rows: no gradient
        Mp = len(targets)
        B = _vocab_block(V, chunk * V // max(Mp, 1))
        dh = torch.zeros(Mp, H, dtype=torch.float32, device=hidden.device) if ctx.needs_input_grad[0] else None
        dw = None                                                                        # None: frozen (LoRA)
        if ctx.needs_input_grad[1]:
            dw = ctx.dw_buffer if ctx.dw_buffer is not None else torch.empty_like(weight)  # [V, H], every row written
            ctx.dw_buffer = None
        gl = None if g_logp is None else g_logp[:, None]                                  # [Mp, 1]
        rows = torch.arange(Mp, device=targets.device)
        c_lib = _c_head(dt, hidden, targets, V)
        if c_lib is not None:
            g_logp, g_entropy = (None if g is None else g.float().contiguous() for g in (g_logp, g_entropy))
        for v0 in range(0, V, B):
            wb = weight[v0:v0 + B].to(dt)                                                 # [B, H]
            if c_lib is not None:             # the logits' gradient over the bf16 logits, in place, in C
                dz = h @ wb.T                                                             # [Mp, B] bf16
                c_lib.head_backward(ptr(dz), dz.shape[1], Mp, dz.shape[1], v0, ptr(targets), 1.0 / tau, ptr(lse),
                                    ptr(entropy) if g_entropy is not None else None,
                                    None if g_logp is None else ptr(g_logp),
                                    None if g_entropy is None else ptr(g_entropy), torch.get_num_threads())
                if dh is not None:
                    dh += dz @ wb
                if dw is not None:
                    dw[v0:v0 + B] = dz.T @ h
                continue
            z = _chunk_logits(h, wb, tau).sub_(lse[:, None])                              # [Mp, B] log p
            p = z.exp()
            if g_entropy is not None:         # z <- g_logp + g_H (log p + H)
                z.add_(entropy[:, None]).mul_(g_entropy[:, None])
                if gl is not None:
                    z.add_(gl)
            else:
                z.copy_(gl.expand_as(z))
            dz = z.mul_(p).neg_()                                                         # -p (...)
            if gl is not None:                                                            # + g_logp onehot(y)
                hit = (targets >= v0) & (targets < v0 + B)
                dz.index_put_((rows[hit], targets[hit] - v0), g_logp[hit], accumulate=True)
            if tau != 1.0:
                dz.div_(tau)
            dz = dz.to(dt)
            if dh is not None:
                dh += dz @ wb
            if dw is not None:
                dw[v0:v0 + B] = dz.T @ h
        return (dh[:M].to(hidden.dtype) if dh is not None else None), dw, None, None, None, None, None


# The head's matmul shapes repeat from step to step, as the packed backbone's do (packing.PACK_ALIGN): its rows are
# padded to a multiple of HEAD_ALIGN (zero rows, target 0, no gradient) and the backward's vocabulary blocks are a
# power of two wide. oneDNN keeps a primitive (~1 MB or more, JIT code and all) per matmul shape it has seen; with a
# new [M, H] x [H, B] shape every step (M response tokens, B ~ chunk V / M), the kernels cached over a run were most
# of a GRPO run's resident-set growth (bench/rss_growth.py, 12 steps of bench/compare_trl.py's settings on an AMX
# Xeon: the updates added 646 MiB with the old shapes, 288 with these).
HEAD_ALIGN = 64


HEAD_SOURCE = Path(__file__).with_name("head_kernels.c")
HEAD_SIGNATURES = {"head_forward": [P, L, I, I, P, _F32, P, P, P, I],
                   "head_backward": [P, L, I, I, I, P, _F32, P, P, P, P, I]}


@lru_cache(maxsize=1)
def head_kernels():
    """head_kernels.c loaded (llmrl/compute/kernels.py), or None: no compiler, a failed build, LLMRL_HEAD_KERNELS=0."""
    return load(HEAD_SOURCE, HEAD_SIGNATURES, "LLMRL_HEAD_KERNELS", "LM head kernels")


def _c_head(dt: torch.dtype, hidden: torch.Tensor, targets: torch.Tensor, V: int):
    """The C head kernels where they apply (bf16 logits on the CPU, targets inside the vocabulary), else None."""
    if dt != torch.bfloat16 or hidden.device.type != "cpu" or targets.dtype != torch.int64 or head_kernels() is None:
        return None
    if len(targets) and not 0 <= int(targets.min()) <= int(targets.max()) < V:
        raise IndexError(f"target token ids must lie in [0, {V}), got {int(targets.min())}..{int(targets.max())}")
    return head_kernels()


def _pad_rows(x: torch.Tensor | None, M: int) -> torch.Tensor | None:
    """x [M, ...] -> [Mp, ...], zero rows appended up to a multiple of HEAD_ALIGN (None stays None)."""
    pad = -M % HEAD_ALIGN
    if x is None or not pad:
        return x
    return torch.cat([x, x.new_zeros(pad, *x.shape[1:])])


def _vocab_block(V: int, target: int) -> int:
    """The backward's vocabulary block width: the largest power of two <= `target`, within [256, V]."""
    return min(V, 1 << max(8, max(target, 1).bit_length() - 1))


def _chunk_logits(h: torch.Tensor, w: torch.Tensor, temperature: float) -> torch.Tensor:
    """h [c, H] @ w[V, H]^T in w's dtype -> fp32 [c, V], divided by the temperature."""
    z = (h.to(w.dtype) @ w.T).float()
    return z.div_(temperature) if temperature != 1.0 else z


def response_hidden(backbone, input_ids, attention_mask, response_len: int, *, pack_tokens: int | None = None,
                    embed=None):
    """input_ids, attention_mask [N, P+T] -> hidden [N, T, H], the states that predict the T response tokens.
    With `pack_tokens` the backbone runs padding-free on packs of at most that many tokens (same values).
    `embed` (ids -> embeddings): the backbone gets those as `inputs_embeds` instead of looking the ids up itself."""
    if pack_tokens:
        return packed_response_hidden(backbone, input_ids, attention_mask, response_len, pack_tokens=pack_tokens,
                                      embed=embed)
    positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    tokens = {"input_ids": input_ids} if embed is None else {"inputs_embeds": embed(input_ids)}
    hidden = backbone(**tokens, attention_mask=attention_mask, position_ids=positions).last_hidden_state
    return hidden[:, -response_len - 1:-1]


def response_logprobs(
    model,
    input_ids: torch.Tensor,        # [N, P+T]
    attention_mask: torch.Tensor,   # [N, P+T]
    response_len: int,              # T
    *,
    temperature: float = 1.0,
    chunk: int = 128,               # response tokens per head chunk
    with_entropy: bool = True,
    pack_tokens: int | None = None,  # run the backbone on padding-free packs of at most this many tokens
    full: bool = False,             # also return log pi over the whole vocabulary at the real response positions
) -> tuple[torch.Tensor, ...]:
    """Returns (logp [N, T], entropy [N, T] or None): log pi(r_t | prompt, r_<t) at each response position.

    The head runs only at real response tokens (attention_mask 1), `chunk` of them at a time; padding
    positions get logp = entropy = 0. `full`: a third output, log pi(. | s_t) [M, V] fp32 at the M real response
    positions (`attention_mask[:, -T:]` true, row by row), through plain differentiable ops: the [M, V] tensor
    exists whole (M x V x 4 bytes, and as much again for its gradient), as an exact distillation loss needs it."""
    T = response_len
    backbone, head = model.get_decoder(), model.get_output_embeddings()
    if backbone is None or head is None or getattr(head, "bias", None) is not None:
        raise ValueError(f"{type(model).__name__}: needs get_decoder() and a bias-free get_output_embeddings()")
    weight, embed = head.weight, None
    # the head's [V, H] gradient, reserved now rather than at the start of the backward, when every activation is
    # live: made then, it needs a fresh block on top of the heap (docs/benchmarks.md)
    dw_buffer = torch.empty_like(weight) if torch.is_grad_enabled() and weight.requires_grad and not full else None
    tied = tied_trainable_weight(model)
    if tied is not None:              # both uses of the weight through one node (TiedEmbedding)
        padding_idx = model.get_input_embeddings().padding_idx

        def embed(ids):
            nonlocal weight
            embeds, weight = TiedEmbedding.apply(tied, ids, padding_idx)
            return embeds
    hidden = response_hidden(backbone, input_ids, attention_mask, T, pack_tokens=pack_tokens, embed=embed)  # [N, T, H]
    real = attention_mask[:, -T:].bool()                                         # [N, T]
    hidden, targets = hidden[real], input_ids[:, -T:][real]                      # [M, H], [M]
    if full:
        logits = F.linear(hidden, weight).float()                                # [M, V]
        logp_all = torch.log_softmax(logits / temperature if temperature != 1.0 else logits, -1)
        logp = logp_all.gather(-1, targets[:, None])[:, 0]                       # [M]
        entropy = -(logp_all.exp() * logp_all).sum(-1) if with_entropy else None
        return _scatter(real, logp), (_scatter(real, entropy) if with_entropy else None), logp_all
    outs = ChunkedHead.apply(hidden, weight, targets, temperature, chunk, with_entropy, dw_buffer)
    logp = _scatter(real, outs[0])
    return logp, (_scatter(real, outs[1]) if with_entropy else None)


class LogprobForward(nn.Module):
    """`response_logprobs(model, ...)` as a module's forward, so a DDP / FSDP wrapper's hooks see it."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, response_len: int, **kw):
        return response_logprobs(self.model, input_ids, attention_mask, response_len, **kw)


def policy_logprobs(policy, input_ids, attention_mask, response_len: int, **kw):
    """(logp [N, T], entropy [N, T] or None) through a wrapped policy's forward (a `LogprobForward`, as is or
    under DDP / FSDP2: distributed/parallel.py), or `response_logprobs` on a plain model."""
    if isinstance(policy, LogprobForward) or isinstance(getattr(policy, "module", None), LogprobForward):
        return policy(input_ids, attention_mask, response_len, **kw)
    return response_logprobs(policy, input_ids, attention_mask, response_len, **kw)


def _scatter(real: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """The values of the real positions (in order) back into [N, T] fp32, zeros elsewhere."""
    return torch.zeros(real.shape, dtype=torch.float32, device=real.device).masked_scatter(real, values.float())


def _response_hidden(model, input_ids, attention_mask, T):
    hidden = response_hidden(model.get_decoder(), input_ids, attention_mask, T)
    return hidden, model.get_output_embeddings().weight                          # [N, T, H], [V, H]


@torch.no_grad()
def response_kl(model, reference, input_ids, attention_mask, response_len: int, *, chunk: int = 16) -> torch.Tensor:
    """Exact KL(pi(. | s_t) || pi_ref(. | s_t)) summed over the vocabulary at each response position -> [N, T].

    Unlike a sampled estimator (k1/k3) this is exact per state and never negative, so it is the right number
    to report for responses that were not sampled from pi (greedy evaluation)."""
    h, w = _response_hidden(model, input_ids, attention_mask, response_len)
    h_ref, w_ref = _response_hidden(reference, input_ids, attention_mask, response_len)
    out = []
    for s in range(0, response_len, chunk):
        logp = torch.log_softmax(F.linear(h[:, s:s + chunk], w).float(), -1)       # [N, C, V]
        logq = torch.log_softmax(F.linear(h_ref[:, s:s + chunk], w_ref).float(), -1)
        out.append((logp.exp() * (logp - logq)).sum(-1))
    return torch.cat(out, 1).clamp(min=0)
