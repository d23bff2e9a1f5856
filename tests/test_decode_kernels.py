"""The decode step's C kernels (compute/decode_kernels.c) against the PyTorch ops they replace, and the decoder's
C decode step against its PyTorch path."""

import shutil

import pytest
import torch
import torch.nn.functional as F

from llmrl.compute import decode_kernels as K
from llmrl.compute.lean_decoder import LeanDecoder, _rope
from llmrl.rollout.sampler import LeanRunner, left_pad

pytestmark = pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler")
ptr = K.ptr
BF = torch.bfloat16


@pytest.fixture(scope="module")
def c():
    lib = K.kernels()
    assert lib is not None
    return lib


def ulps(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Distance in bf16 units in the last place, elementwise."""
    return (a.view(torch.int16).int() - b.view(torch.int16).int()).abs()


def test_add_rms_cast_matches_torch(c):
    g = torch.Generator().manual_seed(0)
    h, w = 0.2 * torch.randn(5, 576, generator=g), torch.randn(576, generator=g)
    delta = (0.2 * torch.randn(5, 576, generator=g)).to(BF)
    want_h = h + delta.float()
    eps = 0.05                                                            # large enough to matter at this scale
    want = F.rms_norm(want_h, (576,), w, eps).to(BF)
    out = torch.empty(5, 576, dtype=BF)
    c.add_rms_cast(ptr(h), ptr(delta), ptr(w), ptr(out), 5, 576, eps)
    assert torch.equal(h, want_h)
    assert ulps(out, want).max() <= 1 and (out == want).float().mean() > 0.99
    out2 = torch.empty_like(out)
    c.add_rms_cast(ptr(h), None, ptr(w), ptr(out2), 5, 576, eps)          # no residual: the norm alone
    assert torch.equal(h, want_h) and torch.equal(out2, out)


def test_silu_mul_matches_torch(c):
    gu = (3 * torch.randn(7, 2 * 1536, generator=torch.Generator().manual_seed(1))).to(BF)
    gu[0, :4] = torch.tensor([100.0, -100.0, 0.0, -1e-30])                # saturated, zero, tiny
    gate, up = gu.chunk(2, -1)
    want = F.silu(gate) * up
    out = torch.empty(7, 1536, dtype=BF)
    c.silu_mul(ptr(gu), ptr(out), 7, 1536)
    assert ulps(out, want).max() <= 1 and (out == want).float().mean() > 0.99


@pytest.mark.parametrize("n, H, Kh, D", [(3, 4, 2, 16), (16, 9, 3, 64), (2, 8, 2, 128), (2, 6, 6, 32)])
def test_rope_attend_matches_sdpa(c, n, H, Kh, D):
    """RoPE on q and k, k and v written into slot `start`, masked attention over the slots: against the PyTorch
    decoder's ops, with NaN garbage in the slots after `start` and masked-out slots before it."""
    g = torch.Generator().manual_seed(n + D)
    rep, start, L = H // Kh, 21, 32
    qkv = torch.randn(n, (H + 2 * Kh) * D, generator=g).to(BF)
    angle = torch.rand(n, D // 2, generator=g) * 6
    cos, sin = angle.cos().repeat(1, 2), angle.sin().repeat(1, 2)                    # [n, D]
    kt = torch.randn(n, Kh, D, L, generator=g).to(BF)
    vc = torch.randn(n, Kh, L, D, generator=g).to(BF)
    kt[..., start + 1:], vc[:, :, start + 1:] = float("nan"), float("nan")
    keys = torch.zeros(n, L, dtype=torch.bool)
    keys[:, 3:start + 1] = True                                                      # slots 0-2: left padding
    keys[0, 7] = False
    k_before, v_before = kt.transpose(-1, -2).clone(), vc.clone()
    out = torch.empty(n, H * D, dtype=BF)
    S = 32
    scratch = torch.empty(rep * (S + D) + max(D, S))
    c.rope_attend(ptr(qkv), ptr(cos), ptr(sin), ptr(kt), ptr(vc), ptr(keys), L, ptr(out), ptr(scratch),
                  n, H, Kh, D, L, start, D ** -0.5)

    x = qkv.view(n, 1, H + 2 * Kh, D).transpose(1, 2)                                # [n, H+2K, 1, D]
    qk = _rope(x[:, :H + Kh], cos[:, None, None], sin[:, None, None]).to(BF)         # the decoder's RoPE
    k_want, v_want = k_before, v_before
    k_want[:, :, start], v_want[:, :, start] = qk[:, H:, 0], x[:, H + Kh:, 0]
    assert torch.equal(kt.transpose(-1, -2)[:, :, :start + 1], k_want[:, :, :start + 1])
    assert torch.equal(vc[:, :, :start + 1], v_want[:, :, :start + 1])
    q = qk[:, :H].reshape(n, Kh, rep, D)
    mask = keys[:, None, None, :start + 1].expand(n, 1, rep, start + 1)
    want = F.scaled_dot_product_attention(q.float(), k_want[:, :, :start + 1].float(), v_want[:, :, :start + 1].float(),
                                          attn_mask=mask)                            # [n, Kh, rep, D]
    got = out.view(n, Kh, rep, D).float()
    assert (got - want).abs().max() < 0.02 * want.abs().max()                         # bf16 output rounding


def test_decode_step_matches_the_pytorch_path(tiny):
    """The whole decode step through the kernels against `LeanDecoder.forward` (bf16, the same cache contents),
    over several steps with rows dropped in between."""
    model, tok = tiny
    from llmrl.rollout.collect import encode_prompt

    prompts = [encode_prompt(tok, t) for t in ["1 + 1 =", "Name a colour, any colour:", "x"]]
    ids, mask = left_pad(prompts, tok.pad_token_id)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    logits = []
    for use_c in (True, False):
        runner = LeanRunner(model, BF)
        if not use_c:
            runner.lean.c = None
        assert (runner.lean.c is not None) == use_c
        with torch.no_grad():
            lg = runner.prefill(ids, mask, pos, 2, 8)
            token, nxt = lg.argmax(-1), pos[:, -1].repeat_interleave(2) + 1
            steps = []
            for t in range(6):
                if t == 3:                                             # drop rows 1 and 4
                    keep = torch.tensor([0, 2, 3, 5])
                    runner.keep(keep)
                    token, nxt = token[keep], nxt[keep]
                lg = runner.decode(token, nxt).float()
                steps.append(lg)
                token, nxt = lg.argmax(-1), nxt + 1
        logits.append(steps)
    for a, b in zip(*logits):
        assert torch.equal(a.argmax(-1), b.argmax(-1))
        assert (a.log_softmax(-1) - b.log_softmax(-1)).abs().max() < 0.05


def test_disabled_by_environment(monkeypatch, tiny):
    monkeypatch.setenv("LLMRL_DECODE_KERNELS", "0")
    K.kernels.cache_clear()
    try:
        assert K.kernels() is None and LeanDecoder(tiny[0], BF).c is None
    finally:
        monkeypatch.delenv("LLMRL_DECODE_KERNELS")
        K.kernels.cache_clear()


def test_a_failed_build_falls_back(monkeypatch, tmp_path, caplog):
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    (tmp_path / "no-such-compiler").write_text("#!/bin/sh\necho 'cc: error: boom' >&2\nexit 1\n")
    (tmp_path / "no-such-compiler").chmod(0o755)
    K.kernels.cache_clear()
    try:
        assert K.kernels() is None
        assert "decode kernels unavailable" in caplog.text
    finally:
        monkeypatch.delenv("CC")
        K.kernels.cache_clear()
