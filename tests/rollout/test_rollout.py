"""The native sampler and the chunked log-prob computation, on the tiny model."""

import pytest
import torch

from llmrl.compute.logprobs import response_logprobs
from llmrl.rollout.collect import collect_rollout, encode_prompt
from llmrl.rollout.sampler import categorical, generate, left_pad, sample_next
from llmrl.data import Example


def prompts(tok, texts):
    return [encode_prompt(tok, t) for t in texts]


def test_greedy_matches_transformers_generate(tiny):
    model, tok = tiny
    ids = prompts(tok, ["What is 12 + 34?"])
    s = generate(model, ids, max_new_tokens=12, temperature=0.0, stop_ids=(tok.eos_token_id,), pad_id=tok.pad_token_id)
    ref = model.generate(torch.tensor(ids), attention_mask=torch.ones(1, len(ids[0]), dtype=torch.long),
                         max_new_tokens=12, do_sample=False, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    n = int(s.response_mask.sum())
    assert s.response_ids[0, :n].tolist() == ref[0, len(ids[0]):len(ids[0]) + n].tolist()


def test_left_padding_does_not_change_greedy_output(tiny):
    model, tok = tiny
    short, long = prompts(tok, ["Hi", "A much longer prompt with many more characters in it"])
    kw = dict(max_new_tokens=10, temperature=0.0, stop_ids=(tok.eos_token_id,), pad_id=tok.pad_token_id)
    alone = generate(model, [short], **kw)
    batched = generate(model, [long, short], **kw)
    n = int(alone.response_mask.sum())
    assert batched.response_ids[1, :n].tolist() == alone.response_ids[0, :n].tolist()
    assert torch.allclose(batched.logp[1, :n], alone.logp[0, :n], atol=1e-4)


def test_recorded_logp_matches_recomputed(tiny):
    model, tok = tiny
    g = torch.Generator().manual_seed(0)
    s = generate(model, prompts(tok, ["1 + 1 =", "Name a colour:"]), group_size=3, max_new_tokens=8, temperature=0.8,
                 stop_ids=(tok.eos_token_id,), pad_id=tok.pad_token_id, generator=g)
    ids = torch.cat([s.prompt_ids, s.response_ids], 1)
    mask = torch.cat([s.prompt_mask, s.response_mask.long()], 1)
    with torch.no_grad():
        logp, _ = response_logprobs(model, ids, mask, s.response_ids.shape[1], temperature=0.8)
    assert torch.allclose(logp * s.response_mask, s.logp, atol=1e-4)


def test_stop_token_ends_the_response_and_masks_the_rest(tiny):
    model, tok = tiny
    logits = torch.full((2, len(tok)), -1e9)
    logits[:, tok.eos_token_id] = 0.0
    token, logp = sample_next(logits, 1.0, 1.0)
    assert token.tolist() == [tok.eos_token_id] * 2 and torch.allclose(logp, torch.zeros(2))
    s = generate(model, prompts(tok, ["x"]), group_size=4, max_new_tokens=30, temperature=1.0,
                 stop_ids=(tok.eos_token_id,), pad_id=tok.pad_token_id, generator=torch.Generator().manual_seed(1))
    for row, m in zip(s.response_ids, s.response_mask):
        n = int(m.sum())
        assert torch.all(m[:n] == 1) and torch.all(m[n:] == 0)
        assert (tok.eos_token_id not in row[:n - 1].tolist())
        assert torch.all(row[n:] == tok.pad_token_id)


def test_top_p_keeps_only_the_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    seen = {int(sample_next(logits, 1.0, 0.7, torch.Generator().manual_seed(i))[0]) for i in range(200)}
    assert seen == {0, 1}


def test_categorical_draws_each_token_at_its_probability():
    probs = torch.tensor([[0.5, 0.0, 0.2, 0.3, 0.0], [0.0, 0.0, 0.0, 0.0, 2.0], [1e-3, 0.0, 0.0, 0.999, 0.0]])
    g = torch.Generator().manual_seed(0)
    draws = torch.stack([categorical(probs, g) for _ in range(20_000)])             # [20000, 3]
    freq = torch.stack([(draws == v).float().mean(0) for v in range(5)], -1)        # [3, 5]
    want = probs / probs.sum(-1, keepdim=True)
    assert torch.all(freq[want == 0] == 0)                                          # a zero is never drawn
    assert torch.allclose(freq, want, atol=0.012), freq                            # ~3.5 sigma at p = 0.5
    assert 5 <= int((draws[:, 2] == 0).sum()) <= 40                                # the 1e-3 token: ~20 of 20000
    wide = torch.zeros(2, 700)                          # three blocks of 256 (the last one partial)
    wide[0, [3, 255, 256, 699]] = torch.tensor([0.1, 0.2, 0.3, 0.4])
    wide[1, 511] = 5.0
    draws = torch.stack([categorical(wide, g) for _ in range(20_000)])
    assert set(draws[:, 1].tolist()) == {511} and set(draws[:, 0].tolist()) == {3, 255, 256, 699}
    freq = torch.tensor([(draws[:, 0] == v).float().mean() for v in (3, 255, 256, 699)])
    assert torch.allclose(freq, torch.tensor([0.1, 0.2, 0.3, 0.4]), atol=0.012), freq


def test_group_rows_share_their_prompt(tiny):
    model, tok = tiny
    exs = [Example("What is 1 + 2?", "3"), Example("What is 40 + 2?", "42")]
    r = collect_rollout(model, tok, exs, group_size=3, max_new_tokens=5, temperature=1.0,
                        generator=torch.Generator().manual_seed(0))
    assert r.group_ids.tolist() == [0, 0, 0, 1, 1, 1]
    assert [e.answer for e in r.examples] == ["3"] * 3 + ["42"] * 3
    P = r.prompt_len
    assert torch.equal(r.input_ids[0, :P], r.input_ids[2, :P]) and not torch.equal(r.input_ids[0, :P], r.input_ids[3, :P])
    assert len(r.completions) == 6


@pytest.mark.parametrize("chunk", [1, 3, 64])
def test_chunked_logprobs_equal_full_logits(tiny, chunk):
    model, tok = tiny
    ids, mask = left_pad(prompts(tok, ["abc def", "longer prompt here!"]), tok.pad_token_id)
    T = 5
    with torch.no_grad():
        full = torch.log_softmax(model(input_ids=ids, attention_mask=mask,
                                       position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits.float(), -1)
    want = full[:, -T - 1:-1].gather(-1, ids[:, -T:, None])[..., 0]
    got, ent = response_logprobs(model, ids, mask, T, chunk=chunk)
    assert torch.allclose(got, want, atol=1e-5)
    p = full[:, -T - 1:-1].exp()
    assert torch.allclose(ent, -(p * full[:, -T - 1:-1]).sum(-1), atol=1e-4)


def test_chunking_does_not_change_gradients(tiny):
    model, tok = tiny
    ids, mask = left_pad(prompts(tok, ["abc def", "xyz"]), tok.pad_token_id)
    grads = []
    for chunk in (2, 64):
        model.zero_grad()
        logp, _ = response_logprobs(model, ids, mask, 6, chunk=chunk)
        logp.sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    model.zero_grad()
    assert torch.allclose(grads[0], grads[1], atol=1e-5)
