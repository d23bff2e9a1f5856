"""compute/fused.py: the lean RMSNorm, SwiGLU and linear give HF's forward under autocast bit for bit, the same
gradients (exactly where the arithmetic is the same, to bf16 rounding where it is not), and keep about half the
activations for backward; the bf16 reference's linears give the fp32 reference's log-probs."""

import gc
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from llmrl.compute.fused import fuse_decoder_ops
from llmrl.models import build_tiny, load_reference
from llmrl.compute.fused import linear_recast, rmsnorm_cast, swiglu_down

BF16 = torch.bfloat16


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def grads(fn, *xs):
    """(output, grads of sum(output * fixed weights) w.r.t. xs), xs cloned as leaves."""
    xs = [x.detach().clone().requires_grad_(x.is_floating_point()) for x in xs]
    out = fn(*xs)
    w = torch.randn(out.shape, generator=gen(9)).to(out.dtype)
    (out * w).float().sum().backward()
    return out.detach(), [x.grad for x in xs]


def test_rmsnorm_cast_is_hf_rmsnorm_forward_and_backward():
    norm = LlamaRMSNorm(16, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(16, generator=gen(1)) + 0.5)
    x = torch.randn(3, 5, 16, generator=gen(2)) * 3

    ref, (rgx, rgw) = grads(lambda x, w: torch.func.functional_call(norm, {"weight": w}, (x,)), x, norm.weight)
    out, (gx, gw) = grads(lambda x, w: rmsnorm_cast(x, w, 1e-6, torch.float32), x, norm.weight)
    assert torch.equal(out, ref)
    torch.testing.assert_close(gx, rgx, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gw, rgw, rtol=1e-5, atol=1e-6)
    # the autocast dtype: HF's fp32 output, cast once
    assert torch.equal(rmsnorm_cast(x, norm.weight, 1e-6, BF16), ref.to(BF16))


def test_swiglu_down_matches_autograd_in_fp32_and_bf16():
    g, u = torch.randn(2, 7, 24, generator=gen(3)), torch.randn(2, 7, 24, generator=gen(4))
    w, b = torch.randn(16, 24, generator=gen(5)) * 0.2, torch.randn(16, generator=gen(6))
    plain = lambda g, u, w, b: F.linear(F.silu(g) * u, w.to(g.dtype), b.to(g.dtype))   # noqa: E731
    ref, rg = grads(plain, g, u, w, b)
    out, og = grads(swiglu_down, g, u, w, b)
    assert torch.equal(out, ref)
    for a, r in zip(og, rg):
        torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-5)
    # bf16 activations, fp32 weight: the same kernels in bf16
    ref, rg = grads(plain, g.to(BF16), u.to(BF16), w, b)
    out, og = grads(swiglu_down, g.to(BF16), u.to(BF16), w, b)
    assert torch.equal(out, ref)
    for a, r in zip(og, rg):
        assert a.dtype == r.dtype
        torch.testing.assert_close(a.float(), r.float(), rtol=2e-2, atol=2e-2)


def test_linear_recast_is_autocast_linear():
    lin = torch.nn.Linear(24, 16)
    x = torch.randn(2, 7, 24, generator=gen(7))
    with torch.autocast("cpu", dtype=BF16):
        ref, (rgx, rgw, rgb) = grads(lambda x, w, b: F.linear(x, w, b), x, lin.weight, lin.bias)
        out, (gx, gw, gb) = grads(linear_recast, x, lin.weight, lin.bias)
    assert out.dtype == BF16 and torch.equal(out, ref)
    assert gx.dtype == gw.dtype == torch.float32
    torch.testing.assert_close(gx, rgx, rtol=0, atol=0)
    torch.testing.assert_close(gw, rgw, rtol=0, atol=0)
    torch.testing.assert_close(gb, rgb, rtol=1e-6, atol=1e-6)


def _loss_and_grads(model, ids, amp: bool):
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=BF16, enabled=amp):
        logits = model(input_ids=ids).logits
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())
    loss.backward()
    return logits.detach(), loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def _saved_bytes(model, ids) -> int:
    """Bytes of the distinct non-parameter tensors autograd keeps for backward over one forward."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in params:
            seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", dtype=BF16):
        model(input_ids=ids).logits.float().sum().backward()
    return sum(seen.values())


def test_fused_model_same_forward_same_gradients_half_the_saved_activations():
    plain, _ = build_tiny(0)
    fused, _ = build_tiny(0)
    assert fuse_decoder_ops(fused) == 2 * (2 + 1 + 6)      # per layer: 2 norms, the MLP, q/k/v/o and gate/up
    assert fuse_decoder_ops(fused) == 18                    # idempotent
    ids = torch.randint(0, plain.config.vocab_size, (2, 40), generator=gen(8))
    rel = lambda a, b: ((a - b).norm() / b.norm()).item()          # noqa: E731
    logits32, loss32, g32 = _loss_and_grads(plain, ids, False)
    lf, loss_f, gf = _loss_and_grads(fused, ids, False)
    assert torch.equal(lf, logits32) and loss_f == loss32
    for n in g32:                                        # fp32: the same arithmetic
        torch.testing.assert_close(gf[n], g32[n], rtol=1e-5, atol=1e-6, msg=n)
    lp, loss_p, gp = _loss_and_grads(plain, ids, True)
    lf, loss_f, gf = _loss_and_grads(fused, ids, True)
    assert torch.equal(lf, lp) and loss_f == loss_p      # the forward is HF's under autocast, bit for bit
    for n in g32:     # bf16: the shared cast's gradients summed in bf16 -- as close to fp32 as HF's bf16 path
        assert rel(gf[n], g32[n]) <= 1.25 * rel(gp[n], g32[n]) + 1e-4, n
        assert rel(gf[n], gp[n]) < 0.02, n
    # a long sequence, so the activations dominate what is saved
    ids = torch.randint(0, plain.config.vocab_size, (4, 200), generator=gen(8))
    assert _saved_bytes(fused, ids) < 0.65 * _saved_bytes(plain, ids)     # 0.58 here; SmolLM2 on a GRPO batch: 0.50


def test_double_backward_through_the_fused_layers_is_hfs():
    """TRPO differentiates the gradient again (a Fisher-vector product): a Hessian-vector product in fp32 equals
    the plain model's (a saved intermediate detached from its input would drop a term here)."""
    hvps = []
    for fuse in (False, True):
        model, _ = build_tiny(0)
        model.config._attn_implementation = "eager"          # sdpa has no double backward on CPU
        ids = torch.randint(0, model.config.vocab_size, (2, 24), generator=gen(11))
        if fuse:
            fuse_decoder_ops(model)
        params = [p for p in model.parameters()]
        logits = model(input_ids=ids).logits
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
        g = torch.autograd.grad(loss, params, create_graph=True)
        v = [torch.randn(p.shape, generator=gen(12)) for p in params]
        hvps.append(torch.autograd.grad(sum((a * b).sum() for a, b in zip(g, v)), params))
    for a, b in zip(*hvps):
        assert ((b - a).norm() / a.norm()).item() < 1e-4


def test_a_norm_that_is_not_rmsnorm_keeps_its_forward():
    class OffsetNorm(LlamaRMSNorm):           # Gemma's (1 + weight) * x / rms(x): the output check rejects it
        def forward(self, x):
            return super().forward(x) + x / x.pow(2).mean(-1, keepdim=True).add(self.variance_epsilon).sqrt()

    model, _ = build_tiny(0)
    norm = model.model.layers[0].input_layernorm
    norm.__class__ = OffsetNorm
    assert fuse_decoder_ops(model) == 17
    assert not getattr(norm, "llmrl_fused", False)


def test_a_copy_of_a_fused_model_computes_with_its_own_weights():
    """A critic's trunk is a deepcopy of the policy's: its swapped forwards must read the copy's parameters."""
    import copy

    model, _ = build_tiny(0)
    fuse_decoder_ops(model)
    twin = copy.deepcopy(model)
    ids = torch.randint(0, model.config.vocab_size, (1, 12), generator=gen(13))
    with torch.no_grad():
        for p in twin.model.layers.parameters():
            p.mul_(0.5)
        assert not torch.allclose(twin(input_ids=ids).logits, model(input_ids=ids).logits)
        assert all(getattr(m.forward, "__self__", m) is m for m in twin.modules() if getattr(m, "llmrl_fused", 0))


def test_lora_on_every_linear_same_gradients_as_unfused():
    """LoRA after fusing would have the MLP skip a LoRA-wrapped down_proj; fused after LoRA, the MLP keeps HF's
    forward and the adapters' gradients are the unfused model's."""
    from llmrl.models.lora import add_lora

    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    ids = torch.randint(0, 100, (2, 20), generator=gen(14))
    out = []
    for fuse in (False, True):
        model, _ = build_tiny(0)
        model = add_lora(model, r=4, alpha=8.0, dropout=0.0, targets=targets)
        torch.manual_seed(0)
        for n, p in model.named_parameters():
            if "lora_B" in n:
                torch.nn.init.normal_(p, std=0.1)              # a non-zero adapter: its delta shows in the logits
        if fuse:
            assert fuse_decoder_ops(model) > 0
            assert not any(getattr(layer.mlp, "llmrl_fused", False) for layer in model.base_model.model.model.layers)
        logits = model(input_ids=ids).logits
        logits.float().pow(2).mean().backward()
        out.append((logits.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}))
    assert torch.allclose(out[1][0], out[0][0], atol=1e-6)
    for n, g in out[0][1].items():
        torch.testing.assert_close(out[1][1][n], g, rtol=1e-5, atol=1e-6, msg=n)


def _mapped(path: str) -> bool:
    return any(line.endswith(path) for line in Path("/proc/self/maps").read_text().splitlines())


def test_bf16_linear_reference_same_logprobs_and_lets_the_weights_file_go():
    ref32 = load_reference("tiny", dtype=torch.float32)
    ref16 = load_reference("tiny", dtype=torch.float32, linear_dtype=BF16)
    emb = ref16.get_input_embeddings().weight
    linears = [m for m in ref16.modules() if isinstance(m, torch.nn.Linear) and m.weight is not emb]
    assert linears and all(m.weight.dtype == BF16 for m in linears)
    assert emb.dtype == torch.float32 and ref16.model.norm.weight.dtype == torch.float32
    ids = torch.randint(0, ref32.config.vocab_size, (2, 30), generator=gen(10))
    with torch.no_grad(), torch.autocast("cpu", dtype=BF16):
        assert torch.equal(ref16(input_ids=ids).logits, ref32(input_ids=ids).logits)
        fuse_decoder_ops(ref16)
        assert torch.equal(ref16(input_ids=ids).logits, ref32(input_ids=ids).logits)
    if Path("/proc/self/maps").exists():
        weights = next(Path(ref32.name_or_path).glob("*.safetensors")).resolve()
        assert _mapped(str(weights))                     # the fp32 reference reads it zero-copy ...
        del ref32
        gc.collect()
        assert not _mapped(str(weights)), "the bf16 reference still holds the weights file's mapping"
