"""Memory-lean RMSNorm, SwiGLU and linear for the training forward of Llama-family decoders (llama, mistral,
qwen2, qwen3).

Under bf16 autocast, HF's decoder layer keeps for backward, per token and layer: the RMSNorm's fp32 output twice
(its weight product, 2 x H x 4 bytes), three bf16 casts of the same normed input (one each for q, k and v) and two
more for gate and up, and in the MLP the gate's output, silu(gate), up and their product (4 x I x 2 bytes). And
autocast keeps a bf16 cast of every weight from forward to backward (a 135M model: 203 MiB). Here:

- `rmsnorm_cast`: RMSNorm that keeps only its input, and returns its output already in the autocast dtype, cast
  once for all the linears that read it;
- `swiglu_down`: down(silu(g) * u) that keeps only g and u, and recomputes silu(g) * u in backward;
- `linear_recast`: a linear that keeps its input and the parameter itself, and casts the weight again in
  backward: one more pass over the weights a step (~0.08 s for SmolLM2's 106M linear weights here) for 203 MiB.

On SmolLM2-135M (H = 576, I = 1536), a GRPO batch of 616 packed tokens keeps 457 instead of 909 MiB besides the
parameters (measured with saved-tensor hooks); the peak RSS of 9-step runs drops from 4115-4412 to 3807-3832 MiB.
The update phase took 2.18-2.34 s a step against 2.32-2.34 s unfused (2026-11-25): the recast is paid for by the
casts and the saved tensors it no longer makes.

The forward is HF's under autocast bit for bit. The backward is the same arithmetic (silu's own backward kernel,
the same matmuls) with one difference: the gradients that reach a norm's shared bf16 output (from q, k and v;
from gate and up) are summed in bf16, where HF sums their fp32 casts; the result is as close to fp32's gradients
as HF's (tests/compute/test_fused.py).

`fuse_decoder_ops(model)` swaps the `forward` of each decoder layer's `input_layernorm`, `post_attention_layernorm`,
`mlp` and plain linears for these, on the model types above only, after checking on a random input that the
swapped forward gives the original's output. Gradient checkpointing, LoRA (a LoRA-wrapped down_proj keeps HF's
MLP; the adapters' and base layers' linears are swapped), DDP, and a double backward (TRPO's Fisher-vector
product) work unchanged.

Shapes: x [..., H] the residual stream, g and u [..., I] the gate and up outputs, weight [H, I] (down_proj).
"""

from __future__ import annotations

import logging
import types

import torch
import torch.nn.functional as F

from llmrl.compute.logprobs import compute_dtype

log = logging.getLogger(__name__)

MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")       # pre-norm layers: each norm's output feeds only linears


def _rrms(xf: torch.Tensor, eps: float) -> torch.Tensor:
    """1 / rms(x) [.., 1] of fp32 x [.., H], as HF's RMSNorm computes it."""
    return torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)


def _silu_grad(grad: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """grad * silu'(g): torch's own kernel, or the formula where the backward is itself differentiated."""
    if not torch.is_grad_enabled():
        return torch.ops.aten.silu_backward(grad, g)
    sig = torch.sigmoid(g)
    return grad * sig * (1 + g * (1 - sig))


class _RMSNormCast(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps: float, out_dtype: torch.dtype):
        xf = x.float()                                                 # [.., H]
        y = weight * (xf * _rrms(xf, eps)).to(x.dtype)                 # HF's RMSNorm, op for op
        ctx.save_for_backward(x, weight)
        ctx.eps = eps
        return y.to(out_dtype)

    @staticmethod
    def backward(ctx, gy):
        x, weight = ctx.saved_tensors     # r recomputed from x: a double backward (TRPO's) reaches x through it
        with torch.autocast(x.device.type, enabled=False):
            gy = gy.float()
            r = _rrms(x.float(), ctx.eps)                              # [.., 1]
            xhat = x.float() * r                                       # [.., H]
            gw = (gy * xhat).reshape(-1, xhat.shape[-1]).sum(0)        # [H]
            gn = gy * weight.float()                                   # dL/dxhat
            gx = r * (gn - xhat * (gn * xhat).mean(-1, keepdim=True))  # through r = (mean(x^2) + eps)^-1/2
        return gx.to(x.dtype), gw.to(weight.dtype), None, None


def rmsnorm_cast(x: torch.Tensor, weight: torch.Tensor, eps: float, out_dtype: torch.dtype) -> torch.Tensor:
    """weight * x / rms(x) [.., H], computed as HF's RMSNorm and returned in `out_dtype`; keeps only x."""
    return _RMSNormCast.apply(x, weight, eps, out_dtype)


def _linear_grads(ctx, gout, xc, weight, bias):
    """(dL/dxc, dL/dweight, dL/dbias) of out = xc @ weight.T + bias, with the weight cast again to xc's dtype
    (nothing but the parameter itself was kept); each None where autograd does not need it."""
    w = weight.to(xc.dtype)                                            # [O, I]
    gout = gout.to(xc.dtype)                                           # [.., O]
    gx = gout @ w if ctx.needs_input_grad[0] or ctx.needs_input_grad[1] else None             # [.., I]
    flat = gout.reshape(-1, gout.shape[-1])                            # [N, O]
    gw = (flat.t() @ xc.reshape(-1, xc.shape[-1])).to(weight.dtype) if ctx.needs_input_grad[-2] else None   # [O, I]
    gb = flat.sum(0).to(bias.dtype) if bias is not None and ctx.needs_input_grad[-1] else None
    return gx, gw, gb


class _LinearRecast(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias):
        dt = compute_dtype(x)
        out = F.linear(x.to(dt), weight.to(dt), None if bias is None else bias.to(dt))   # [.., O]
        ctx.save_for_backward(x, weight, bias)        # x: in practice already in dt (a fused norm's output)
        ctx.dtype = dt
        return out

    @staticmethod
    def backward(ctx, gout):
        x, weight, bias = ctx.saved_tensors
        with torch.autocast(x.device.type, enabled=False):
            gx, gw, gb = _linear_grads(ctx, gout, x.to(ctx.dtype), weight, bias)
        return None if gx is None else gx.to(x.dtype), gw, gb


def linear_recast(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear in the autocast dtype, as autocast computes it, keeping the parameter rather than its cast: the
    weight is cast again in backward (a pass over it) instead of a bf16 copy living from forward to backward."""
    return _LinearRecast.apply(x, weight, bias)


class _SwiGLUDown(torch.autograd.Function):
    @staticmethod
    def forward(ctx, g, u, weight, bias):
        p = F.silu(g) * u                                              # [.., I]
        out = F.linear(p, weight.to(g.dtype), None if bias is None else bias.to(g.dtype))   # [.., H]
        ctx.save_for_backward(g, u, weight, bias)
        return out

    @staticmethod
    def backward(ctx, gout):
        g, u, weight, bias = ctx.saved_tensors
        with torch.autocast(g.device.type, enabled=False):
            s = F.silu(g)                                              # [.., I] recomputed
            gp, gw, gb = _linear_grads(ctx, gout, s * u, weight, bias)    # gp: dL/d(silu(g) * u)
            gu = gp * s
            gg = _silu_grad(gp * u, g)
        return gg, gu, gw, gb


def swiglu_down(g: torch.Tensor, u: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
                ) -> torch.Tensor:
    """down(silu(g) * u) [.., H] in g's dtype; keeps g and u (and the parameter), recomputes the product and the
    weight's cast in backward."""
    return _SwiGLUDown.apply(g, u, weight, bias)


# The swapped forwards are bound methods (types.MethodType), not closures: copy.deepcopy rebinds a bound method to
# the copied module (a critic's trunk, a merged LoRA copy), where a closure would go on reading the original.

def _linear_forward(self, x):
    return linear_recast(x, self.weight, self.bias)


def _norm_forward(self, x):
    return rmsnorm_cast(x, self.weight, self.variance_epsilon, compute_dtype(x))


def _mlp_forward(self, x):
    return swiglu_down(self.gate_proj(x), self.up_proj(x), self.down_proj.weight, self.down_proj.bias)


def _same_output(module, forward, hidden: int) -> bool:
    """Whether `forward` gives `module`'s own output on a random fp32 input [2, 3, width] (no autocast)."""
    p = next(module.parameters())
    width = getattr(module, "in_features", hidden)
    x = torch.randn(2, 3, width, generator=torch.Generator().manual_seed(0)).to(p.device, p.dtype)
    with torch.no_grad(), torch.autocast(p.device.type, enabled=False):
        return torch.allclose(type(module).forward(module, x), forward(x), rtol=1e-5, atol=1e-6)


def _candidates(layer):
    """(module, its forward to swap in) for the layer's norms, MLP and plain linears that can take one."""
    for name in ("input_layernorm", "post_attention_layernorm"):
        norm = getattr(layer, name, None)
        if norm is not None and hasattr(norm, "variance_epsilon"):
            yield norm, _norm_forward
    mlp = getattr(layer, "mlp", None)
    fused_mlp = mlp is not None and type(getattr(mlp, "down_proj", None)) is torch.nn.Linear \
        and hasattr(mlp, "gate_proj") and hasattr(mlp, "up_proj")
    if fused_mlp:
        yield mlp, _mlp_forward
    for lin in layer.modules():                # q/k/v/o, gate/up (and a LoRA layer's base and A/B matrices)
        if type(lin) is torch.nn.Linear and not (fused_mlp and lin is mlp.down_proj):
            yield lin, _linear_forward


def fuse_decoder_ops(model) -> int:
    """Swap in `rmsnorm_cast`, `swiglu_down` and `linear_recast` for the decoder layers' norms, MLPs and linears
    (see the module docstring); returns how many modules use them now (0 for a model type outside MODEL_TYPES,
    or not a HF model).
    Idempotent."""
    base = model.get_base_model() if hasattr(model, "peft_config") else model
    cfg = getattr(base, "config", None)          # None: not a HF model (e.g. a LoRA policy's adapter-off reference)
    if getattr(cfg, "model_type", None) not in MODEL_TYPES or getattr(cfg, "hidden_act", None) != "silu":
        return 0
    layers = getattr(getattr(base, "model", None), "layers", None) or []
    fused = failed = 0
    for layer in layers:
        for module, make in _candidates(layer):
            if not getattr(module, "llmrl_fused", False):
                forward = types.MethodType(make, module)
                if not _same_output(module, forward, cfg.hidden_size):
                    failed += 1
                    continue
                module.forward, module.llmrl_fused = forward, True
            fused += 1
    if failed:
        log.warning("fused ops: %d modules kept their own forward (output check failed), %d swapped", failed, fused)
    return fused
