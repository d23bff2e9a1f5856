"""The sampler's lean Llama decoder against the HF model: the recorded log-probs equal a plain full-sequence forward,
with left padding, groups, rows dropped from the batch mid-way, a LoRA adapter, and bf16."""

import copy

import pytest
import torch

from llmrl.rollout.collect import encode_prompt
from llmrl.compute.lean_decoder import LeanDecoder, lean_supported
from llmrl.rollout.sampler import generate


def prompts(tok, texts):
    return [encode_prompt(tok, t) for t in texts]


def full_logp(model, s, temperature: float, amp=None) -> torch.Tensor:
    """log softmax(logits / T) of each response token from one plain HF forward over prompt + response: [N, T]."""
    ids = torch.cat([s.prompt_ids, s.response_ids], 1)
    mask = torch.cat([s.prompt_mask, s.response_mask.long()], 1)
    with torch.no_grad(), torch.autocast("cpu", dtype=amp or torch.bfloat16, enabled=amp is not None):
        logits = model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits
    T = s.response_ids.shape[1]
    logp = torch.log_softmax(logits[:, -T - 1:-1].float() / temperature, -1)
    return logp.gather(-1, s.response_ids[..., None])[..., 0] * s.response_mask


TEXTS = ["1 + 1 =", "Name a colour, any colour:", "x"]          # three prompt lengths: left padding


def test_lean_applies_to_the_tiny_llama(tiny):
    model, _ = tiny
    assert lean_supported(model, 128)


def test_prefill_logits_equal_the_hf_forward(tiny):
    model, tok = tiny
    from llmrl.rollout.sampler import left_pad

    ids, mask = left_pad(prompts(tok, TEXTS), tok.pad_token_id)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        want = torch.log_softmax(model(input_ids=ids, attention_mask=mask, position_ids=pos).logits[:, -1], -1)
        lean = LeanDecoder(model)
        P = ids.shape[1]
        allowed = torch.ones(P, P, dtype=torch.bool).tril() & mask.bool()[:, None, :] | torch.eye(P, dtype=torch.bool)
        got = torch.log_softmax(lean.forward(ids, pos, lean.new_cache(len(TEXTS), P), 0, allowed), -1)
    assert torch.allclose(got, want, atol=1e-5)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_recorded_logp_equals_a_full_forward(tiny, temperature):
    model, tok = tiny
    s = generate(model, prompts(tok, TEXTS), group_size=3, max_new_tokens=12, temperature=temperature,
                 stop_ids=(tok.eos_token_id,), pad_id=tok.pad_token_id, generator=torch.Generator().manual_seed(0))
    assert s.response_mask.sum() > 9 * 6
    assert torch.allclose(s.logp, full_logp(model, s, temperature), atol=1e-5)


@pytest.mark.parametrize("lean", [True, False])
def test_rows_dropped_mid_batch_keep_their_positions(tiny, lean):
    """Many stop ids end rows at different steps, so the batch is compacted several times (both decoders)."""
    model, tok = tiny
    stops = tuple(range(0, len(tok), 3))
    s = generate(model, prompts(tok, TEXTS), group_size=6, max_new_tokens=16, temperature=1.0, stop_ids=stops,
                 pad_id=tok.pad_token_id, generator=torch.Generator().manual_seed(3), lean=lean)
    lengths = s.response_mask.sum(1)
    assert len(set(lengths.tolist())) >= 4 and lengths.max() >= 6          # rows stopped at many different steps
    assert torch.allclose(s.logp, full_logp(model, s, 1.0), atol=1e-5)
    for row, n in zip(s.response_ids, lengths.long().tolist()):
        assert all(t not in stops for t in row[:n - 1].tolist()) and torch.all(row[n:] == tok.pad_token_id)
    assert torch.equal(s.truncated, lengths == 16)


def test_lean_and_hf_paths_agree_greedily(tiny):
    model, tok = tiny
    kw = dict(group_size=2, max_new_tokens=10, temperature=0.0, stop_ids=(tok.eos_token_id,), pad_id=tok.pad_token_id)
    lean = generate(model, prompts(tok, TEXTS), **kw)
    hf = generate(model, prompts(tok, TEXTS), lean=False, **kw)
    assert torch.equal(lean.response_ids, hf.response_ids) and torch.equal(lean.response_mask, hf.response_mask)
    assert torch.allclose(lean.logp, hf.logp, atol=1e-5)


def test_same_seed_same_samples(tiny):
    model, tok = tiny
    kw = dict(group_size=4, max_new_tokens=10, stop_ids=tuple(range(0, len(tok), 4)), pad_id=tok.pad_token_id)
    a, b = (generate(model, prompts(tok, TEXTS), generator=torch.Generator().manual_seed(5), **kw) for _ in range(2))
    assert torch.equal(a.response_ids, b.response_ids) and torch.equal(a.logp, b.logp)


def test_lora_adapter_is_merged_into_the_lean_weights(tiny):
    from peft import LoraConfig, get_peft_model

    model, tok = tiny
    peft = get_peft_model(copy.deepcopy(model), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "up_proj"],
                                                           init_lora_weights=False)).eval()   # a non-zero delta
    assert lean_supported(peft, 64)
    s = generate(peft, prompts(tok, TEXTS), group_size=2, max_new_tokens=8, stop_ids=(tok.eos_token_id,),
                 pad_id=tok.pad_token_id, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(s.logp, full_logp(peft, s, 1.0), atol=1e-5)
    assert not torch.allclose(s.logp, full_logp(model, s, 1.0), atol=1e-3)


def test_bf16_logp_matches_an_autocast_forward(tiny):
    model, tok = tiny
    s = generate(model, prompts(tok, TEXTS), group_size=3, max_new_tokens=12, stop_ids=(tok.eos_token_id,),
                 pad_id=tok.pad_token_id, generator=torch.Generator().manual_seed(0), autocast_dtype=torch.bfloat16)
    diff = (s.logp - full_logp(model, s, 1.0, amp=torch.bfloat16)).abs().max()
    assert diff < 0.05, diff
