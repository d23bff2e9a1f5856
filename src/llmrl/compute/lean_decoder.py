"""A lean forward for Llama-family decoders (llama, mistral, qwen2, qwen3), used by the sampler to decode fast.

Decoding 16 rows of a 135M model is overhead-bound: HF's forward spends its time in per-layer Python, in bf16
autocast re-casting every fp32 weight at every step, and in a KV cache that grows by concatenation. Here the
weights are read once per `generate` call from the HF module (a peft LoRA adapter merged in, as for vLLM), cast
once to the compute dtype, with q/k/v and gate/up fused into one matrix each; the KV cache is one pre-allocated
tensor, and each step is a handful of large ops per layer.

Numerics follow HF under autocast: the residual stream and RMSNorm stay in fp32, every matmul and the attention
run in the compute dtype (`autocast_dtype`, else the weights' own dtype: fp32 gives HF's logits to ~1e-6).

In bf16 on CPU the decode steps (one token a row) go through `decode`, which does the ops between the matmuls in
C (compute/decode_kernels.py: four calls a layer instead of ~20 PyTorch ops) on a cache with the keys transposed. On
SmolLM2-135M at 16 rows a step takes ~23 instead of ~30 ms (2026-12-03, 2-core Xeon); the prefill stays here.

On a GPU the sampler decodes through `decode_static` instead (rollout/static_decode.py): fixed shapes and no host
synchronisation, so that a step can be captured once as a CUDA graph and replayed.

Notation: n rows in the batch, S new positions, L cache capacity, H query heads, K key/value heads, D head dim.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from llmrl.compute.decode_kernels import kernels, ptr
from llmrl.compute.weights import policy_weights, write_rows

SUPPORTED = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")
ROPE_TYPES = ("default", "linear", "llama3", "yarn")     # position-independent inv_freq (not "dynamic")


def _base(model):
    return model.get_base_model() if hasattr(model, "peft_config") else model


def lean_supported(model, max_len: int) -> bool:
    """Whether `LeanDecoder` reproduces `model`'s forward for sequences of up to `max_len` tokens."""
    base = _base(model)
    if type(base).__name__ not in SUPPORTED or (base.training and _has_dropout(base.config)):
        return False
    if any(type(m).__name__.startswith("FSDP") for m in base.modules()):   # FSDP2 (fully_shard): its state_dict
        return False                                                          # holds shards; the HF forward gathers
    cfg = base.config
    rope = getattr(getattr(base.model, "rotary_emb", None), "rope_type", None)
    window = getattr(cfg, "sliding_window", None)
    windowed = window is not None and (type(base).__name__ == "MistralForCausalLM"
                                       or "sliding_attention" in (getattr(cfg, "layer_types", None) or ()))
    return (rope in ROPE_TYPES and cfg.hidden_act == "silu" and not getattr(cfg, "mlp_bias", False)
            and not (windowed and max_len > window))


def _has_dropout(cfg) -> bool:
    return float(getattr(cfg, "attention_dropout", 0.0) or 0.0) > 0


def _rms(h: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:      # fp32 in, fp32 out, as HF's RMSNorm
    return F.rms_norm(h, w.shape, w, eps)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:   # x [n, h, S, D], cos [n, 1, S, D]
    x = x.float()
    x1, x2 = x.chunk(2, -1)
    return x * cos + torch.cat([-x2, x1], -1) * sin


def _head_norm(x: torch.Tensor, w: torch.Tensor | None, eps: float, dtype: torch.dtype) -> torch.Tensor:
    """Qwen3's per-head RMSNorm of q or k (x [..., D]) as HF computes it: normalised in fp32, rounded to the
    activations' dtype, then scaled by the fp32 weight; x unchanged for a model without one (w None)."""
    if w is None:
        return x
    return F.rms_norm(x.float(), (x.shape[-1],), None, eps).to(dtype) * w


def _packs() -> bool:
    """Whether oneDNN's pre-packed bf16 linear is available: same results as F.linear, ~1.6x faster at 16 rows."""
    mkldnn = getattr(torch.ops, "mkldnn", None)
    return (torch.backends.mkldnn.is_available() and hasattr(mkldnn, "_reorder_linear_weight")
            and hasattr(mkldnn, "_linear_pointwise") and torch.ops.mkldnn._is_mkldnn_bf16_supported())


class _Linear:
    """y = x W^T + b; a bf16 CPU weight is re-laid out once into oneDNN's blocked format."""

    def __init__(self, w: torch.Tensor, b: torch.Tensor | None = None, packed: bool = False):
        self.w_in = w.shape[1]
        self.packed = packed and w.device.type == "cpu" and w.dtype == torch.bfloat16
        self.w = torch.ops.mkldnn._reorder_linear_weight(w, 16) if self.packed else w
        self.b = b

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed:
            return torch.ops.mkldnn._linear_pointwise(x, self.w, self.b, "none", [], "")
        return F.linear(x, self.w, self.b)


@dataclass
class _Layer:
    norm1: torch.Tensor          # [hidden] fp32
    qkv: _Linear                 # [(H + 2K) D, hidden], a bias for qwen2
    o: _Linear                   # [hidden, H D]
    norm2: torch.Tensor          # [hidden] fp32
    gate_up: _Linear             # [2 I, hidden]: gate rows then up rows
    down: _Linear                # [hidden, I]
    q_norm: torch.Tensor | None = None   # [D] fp32: qwen3's per-head norms of q and k (None: none)
    k_norm: torch.Tensor | None = None


class LeanDecoder:
    """The model's weights in the compute dtype, and `forward` over a pre-allocated KV cache."""

    def __init__(self, model, dtype: torch.dtype | None = None):

        base = _base(model)
        cfg = base.config
        sd = dict(policy_weights(model))
        self.dtype = dtype or sd["model.embed_tokens.weight"].dtype
        packed = _packs()

        def cast(*names):                  # the named tensors stacked along dim 0, in the compute dtype
            parts = [sd[x] for x in names]
            out = parts[0].new_empty((sum(map(len, parts)), *parts[0].shape[1:]), dtype=self.dtype)
            return write_rows(parts, out)

        fp32 = lambda name: sd[name].float()                                                 # noqa: E731
        self.H, self.K = cfg.num_attention_heads, cfg.num_key_value_heads
        self.D = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.H
        self.eps = cfg.rms_norm_eps
        self.embed = sd["model.embed_tokens.weight"]                                         # [V, hidden]
        self.lm_head = _Linear(cast("lm_head.weight" if "lm_head.weight" in sd else "model.embed_tokens.weight"),
                               packed=packed)
        self.norm = fp32("model.norm.weight")
        self.rotary = base.model.rotary_emb
        self.layers = []
        for i in range(cfg.num_hidden_layers):
            p = f"model.layers.{i}."
            attn = [f"{p}self_attn.{x}_proj" for x in "qkv"]
            bias = cast(*(a + ".bias" for a in attn)) if attn[0] + ".bias" in sd else None
            self.layers.append(_Layer(
                norm1=fp32(p + "input_layernorm.weight"),
                qkv=_Linear(cast(*(a + ".weight" for a in attn)), bias, packed),
                o=_Linear(cast(p + "self_attn.o_proj.weight"), packed=packed),
                norm2=fp32(p + "post_attention_layernorm.weight"),
                gate_up=_Linear(cast(p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight"), packed=packed),
                down=_Linear(cast(p + "mlp.down_proj.weight"), packed=packed),
                q_norm=fp32(p + "self_attn.q_norm.weight") if p + "self_attn.q_norm.weight" in sd else None,
                k_norm=fp32(p + "self_attn.k_norm.weight") if p + "self_attn.k_norm.weight" in sd else None,
            ))
        self.cos = self.sin = None
        qk_norm = self.layers[0].q_norm is not None       # the C decode step has no per-head norms
        self.c = (kernels() if self.dtype == torch.bfloat16 and self.norm.device.type == "cpu" and not qk_norm
                  else None)

    def new_cache(self, n: int, length: int) -> torch.Tensor:
        """An empty KV cache [layers, 2, n, K, L, D] in the compute dtype."""
        return torch.empty(len(self.layers), 2, n, self.K, length, self.D, dtype=self.dtype, device=self.norm.device)

    def _rope_tables(self, upto: int) -> None:
        """cos / sin [upto, D] for positions 0 .. upto-1, from the model's own rotary module (its scaling included)."""
        if self.cos is None or self.cos.shape[0] < upto:
            pos = torch.arange(upto, device=self.norm.device)[None]
            cos, sin = self.rotary(self.norm[None, None], pos)                                # fp32 [1, upto, D]
            self.cos, self.sin = cos[0], sin[0]

    def forward(
        self,
        ids: torch.Tensor,          # [n, S] long
        positions: torch.Tensor,    # [n, S] long, rotary positions
        cache: torch.Tensor,        # [layers, 2, n, K, L, D]; this call writes slots start .. start+S-1
        start: int,
        allowed: torch.Tensor,      # [n, S, start+S] bool: query s may attend to key j
    ) -> torch.Tensor:              # [n, V] logits at the last position, compute dtype
        n, S = ids.shape
        H, K, D, end = self.H, self.K, self.D, start + S
        self._rope_tables(int(positions.max()) + 1)
        cos, sin = self.cos[positions][:, None], self.sin[positions][:, None]                # [n, 1, S, D]
        rep = H // K          # query head h reads kv head h // rep: stack the rep heads as extra query rows
        mask = allowed[:, None, None].expand(n, 1, rep, S, end).reshape(n, 1, rep * S, end)
        h = self.embed[ids].float()                                                          # [n, S, hidden]
        for i, lay in enumerate(self.layers):
            x = _rms(h, lay.norm1, self.eps).to(self.dtype)
            qkv = lay.qkv(x).view(n, S, H + 2 * K, D).transpose(1, 2)                       # [n, H+2K, S, D]
            qk = _rope(self._qk_norms(qkv[:, :H + K], lay), cos, sin).to(self.dtype)        # [n, H+K, S, D]
            cache[i, 0, :, :, start:end] = qk[:, H:]
            cache[i, 1, :, :, start:end] = qkv[:, H + K:]
            q = qk[:, :H].reshape(n, K, rep * S, D)
            a = F.scaled_dot_product_attention(q, cache[i, 0, :, :, :end], cache[i, 1, :, :, :end], attn_mask=mask)
            a = a.reshape(n, H, S, D).transpose(1, 2).reshape(n, S, H * D)                      # [n, S, H D]
            h.add_(lay.o(a))                                                                 # fp32 += bf16
            gate, up = lay.gate_up(_rms(h, lay.norm2, self.eps).to(self.dtype)).chunk(2, -1)
            h.add_(lay.down(F.silu(gate) * up))
        return self.lm_head(_rms(h[:, -1], self.norm, self.eps).to(self.dtype))              # [n, V]

    def _qk_norms(self, qk: torch.Tensor, lay: _Layer) -> torch.Tensor:
        """qk [n, H+K, S, D] with qwen3's per-head norms applied (as is for the other families)."""
        if lay.q_norm is None:
            return qk
        return torch.cat([_head_norm(qk[:, :self.H], lay.q_norm, self.eps, self.dtype),
                          _head_norm(qk[:, self.H:], lay.k_norm, self.eps, self.dtype)], 1)

    def decode_static(
        self,
        ids: torch.Tensor,          # [n] long, one new token a row
        positions: torch.Tensor,    # [n] long, its rotary position (the rope tables must reach it: `_rope_tables`)
        cache: torch.Tensor,        # [layers, 2, n, K, L, D] (`new_cache`); this call writes slot `slot`
        slot: torch.Tensor,         # [1] long, the cache slot of the new token
        keys: torch.Tensor,         # [n, L] bool: the slots each row attends to (`slot` included)
    ) -> torch.Tensor:              # [n, V] logits, compute dtype
        """`forward` for one token a row with fixed shapes and no host synchronisation, so that a CUDA graph can
        capture it: the slot is a tensor (the new keys and values go in by `index_copy_`) and every row attends
        over all L slots under `keys` (the slots not yet written are masked out)."""
        n, H, K, D = len(ids), self.H, self.K, self.D
        rep = H // K
        cos, sin = self.cos[positions][:, None, None], self.sin[positions][:, None, None]       # [n, 1, 1, D]
        mask = keys[:, None, None, :]                                                         # [n, 1, 1, L]
        h = self.embed[ids].float()                                                           # [n, hidden]
        for i, lay in enumerate(self.layers):
            x = _rms(h, lay.norm1, self.eps).to(self.dtype)
            qkv = lay.qkv(x).view(n, H + 2 * K, 1, D)                                        # [n, H+2K, 1, D]
            qk = _rope(self._qk_norms(qkv[:, :H + K], lay), cos, sin).to(self.dtype)         # [n, H+K, 1, D]
            cache[i, 0].index_copy_(2, slot, qk[:, H:])
            cache[i, 1].index_copy_(2, slot, qkv[:, H + K:])
            q = qk[:, :H].reshape(n, K, rep, D)         # query head h reads kv head h // rep
            a = F.scaled_dot_product_attention(q, cache[i, 0], cache[i, 1], attn_mask=mask)  # [n, K, rep, D]
            h.add_(lay.o(a.reshape(n, H * D)))
            gate, up = lay.gate_up(_rms(h, lay.norm2, self.eps).to(self.dtype)).chunk(2, -1)
            h.add_(lay.down(F.silu(gate) * up))
        return self.lm_head(_rms(h, self.norm, self.eps).to(self.dtype))                      # [n, V]

    def new_decode_cache(self, n: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The C decode step's KV cache (`decode`): keys transposed [layers, n, K, D, L] and values
        [layers, n, K, L, D], L = `length` rounded up to a multiple of 16 (the kernel reads slots 16 at a time)."""
        L = -(-length // 16) * 16
        layers = len(self.layers)
        return (torch.empty(layers, n, self.K, self.D, L, dtype=self.dtype, device=self.norm.device),
                torch.empty(layers, n, self.K, L, self.D, dtype=self.dtype, device=self.norm.device))

    def decode(
        self,
        ids: torch.Tensor,          # [n] long, one new token a row
        positions: torch.Tensor,    # [n] long, its rotary position
        kt: torch.Tensor,           # [layers, n, K, D, L]: `new_decode_cache`; this call writes slot `start`
        vc: torch.Tensor,           # [layers, n, K, L, D]
        start: int,
        keys: torch.Tensor,         # [n, L] bool: the slots each row attends to (set through `start`, 0 after)
    ) -> torch.Tensor:              # [n, V] logits, compute dtype
        """`forward` for one token a row with the ops between the matmuls in C (compute/decode_kernels.py, needs `self.c`):
        four calls a layer instead of ~20 PyTorch ops. The same arithmetic to bf16 rounding (decode_kernels.c)."""
        c, n, H, K, D = self.c, len(ids), self.H, self.K, self.D
        E, I, L = self.norm.shape[0], self.layers[0].down.w_in, kt.shape[-1]
        assert kt.is_contiguous() and vc.is_contiguous() and keys.is_contiguous() and keys.shape == (n, L)
        self._rope_tables(int(positions.max()) + 1)
        h = self.embed[ids].float().contiguous()                                             # [n, E] fp32
        cos, sin = self.cos[positions].contiguous(), self.sin[positions].contiguous()          # [n, D]
        x = torch.empty(n, E, dtype=self.dtype, device=h.device)                             # normed, bf16
        att = torch.empty(n, H * D, dtype=self.dtype, device=h.device)
        act = torch.empty(n, I, dtype=self.dtype, device=h.device)
        rep, S = H // K, -(-(start + 1) // 16) * 16
        scratch = torch.empty(rep * (S + D) + max(D, S), device=h.device)
        norms = [lay.norm1 for lay in self.layers] + [self.norm]
        c.add_rms_cast(ptr(h), None, ptr(norms[0]), ptr(x), n, E, self.eps)
        for i, lay in enumerate(self.layers):   # (each matmul's output held in a name: C reads its memory)
            qkv = lay.qkv(x)                                                                  # [n, (H+2K) D]
            c.rope_attend(ptr(qkv), ptr(cos), ptr(sin), ptr(kt[i]), ptr(vc[i]), ptr(keys), L, ptr(att),
                          ptr(scratch), n, H, K, D, L, start, D ** -0.5)
            o = lay.o(att)
            c.add_rms_cast(ptr(h), ptr(o), ptr(lay.norm2), ptr(x), n, E, self.eps)
            gate_up = lay.gate_up(x)
            c.silu_mul(ptr(gate_up), ptr(act), n, I)
            down = lay.down(act)
            c.add_rms_cast(ptr(h), ptr(down), ptr(norms[i + 1]), ptr(x), n, E, self.eps)
        return self.lm_head(x)                                                               # [n, V]
