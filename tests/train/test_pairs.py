"""Building and tokenising preference pairs for the trainers: the chat template and EOS, pairing passing with
failing samples of a task, padded sequence log-probs against an unpadded loop, micro-batch invariance of the
gradient."""

import itertools

import pytest
import torch

from llmrl.data import make_task
from llmrl.data.pairs import PreferencePair
from llmrl.objectives.preference import dpo_loss
from llmrl.rewards import RewardResult
from llmrl.rollout.collect import encode_prompt
from llmrl.train.dpo import collate_pairs, pair_logps, sequence_logps
from llmrl.train.pairs import build_pairs_from_task, encode_pair
from llmrl.train.supervised import accumulate, sum_parts

CHAT = {"prompt": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}],
        "chosen": [{"role": "assistant", "content": "hello"}], "rejected": [{"role": "assistant", "content": "go"}]}


def t(x, dtype=torch.float32):
    return torch.tensor(x, dtype=dtype)


# ----------------------------------------------------------------------------- tokenising

def test_encode_pair_text_and_chat(tiny):
    _, tok = tiny
    eos = tok.eos_token_id
    prompt, chosen, rejected = encode_pair(tok, PreferencePair("2+2?", "4", "56"), system_prompt="sys")
    assert prompt == encode_prompt(tok, "2+2?", system_prompt="sys")
    assert tok.decode(prompt).endswith("<|im_start|>assistant\n")
    assert chosen == tok("4", add_special_tokens=False)["input_ids"] + [eos] and len(rejected) == 3
    prompt, chosen, _ = encode_pair(tok, PreferencePair(CHAT["prompt"], CHAT["chosen"], CHAT["rejected"]))
    assert tok.decode(prompt) == ("<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n"
                                  "<|im_start|>assistant\n")
    assert tok.decode(chosen) == "hello<|im_end|>"
    plain, _, _ = encode_pair(tok, PreferencePair("2+2?", "4", "5"), chat_template=False)
    assert tok.decode(plain) == "2+2?"
    with pytest.raises(ValueError, match="needs chat_template=True"):
        encode_pair(tok, PreferencePair(CHAT["prompt"], "a", "b"), chat_template=False)


# ----------------------------------------------------------------------------- building from a task

def fake_scores(pattern):
    """A stand-in for `score`: row i of every call gets pattern[i] (the tiny model never answers right)."""
    def score(completions, examples, terms):
        return RewardResult(total=t(pattern[:len(completions)]), components={}, failures={})
    return score


def test_build_pairs_pairs_pass_with_fail(tiny, monkeypatch):
    model, tok = tiny
    # 3 prompts x 4 samples: prompt 0 mixed, prompt 1 all fail, prompt 2 mixed
    pattern = [1, 0, 0, 1] + [0, 0, 0, 0] + [0, 0, 1, 0]
    monkeypatch.setattr("llmrl.train.pairs.score", fake_scores(pattern))
    task = make_task("arithmetic")
    kw = dict(samples_per_prompt=4, max_new_tokens=5, seed=7)
    pairs = build_pairs_from_task(model, tok, task, 3, **kw)
    prompts = [ex.prompt for ex in itertools.islice(task.train_stream(7), 3)]
    assert [p.prompt for p in pairs] == [prompts[0], prompts[2]]
    assert all(p.meta["chosen_score"] == 1.0 and p.meta["rejected_score"] == 0.0 for p in pairs)
    assert build_pairs_from_task(model, tok, task, 3, **kw) == pairs               # deterministic per seed
    many = build_pairs_from_task(model, tok, task, 3, pairs_per_prompt=10, **kw)
    # prompt 0: 2 passing x 2 failing = 4 combinations; prompt 2: 1 x 3 = 3; each combination once
    assert [p.prompt for p in many] == [prompts[0]] * 4 + [prompts[2]] * 3
    assert len({(p.chosen, p.rejected) for p in many[:4]}) == \
        len({p.chosen for p in many[:4]}) * len({p.rejected for p in many[:4]})
    assert len(build_pairs_from_task(model, tok, task, 3, pairs_per_prompt=2, **kw)) == 2 + 2
    monkeypatch.setattr("llmrl.train.pairs.score", fake_scores([1] * 12))
    assert build_pairs_from_task(model, tok, task, 3, **kw) == []                   # all pass: no pair


# ----------------------------------------------------------------------------- padded log-probs

def slow_sequence_logp(model, prompt, response):
    ids = torch.tensor([prompt + response])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0].float(), -1)
    return sum(logp[len(prompt) - 1 + i, tok].item() for i, tok in enumerate(response))


def test_sequence_logps_match_unpadded_loop(tiny):
    model, tok = tiny
    pairs = [PreferencePair("2+2?", "4", "five"), PreferencePair("a much longer prompt here", "yes indeed", "n")]
    enc = [encode_pair(tok, p) for p in pairs]
    batch = collate_pairs(enc, tok.pad_token_id)
    with torch.no_grad():
        total, lengths = sequence_logps(model, batch)
        chosen, rejected = pair_logps(model, batch)
        c_mean, _ = pair_logps(model, batch, per_token_mean=True)
    for i, (p, c, r) in enumerate(enc):
        assert chosen[i].item() == pytest.approx(slow_sequence_logp(model, p, c), abs=1e-4)
        assert rejected[i].item() == pytest.approx(slow_sequence_logp(model, p, r), abs=1e-4)
        assert c_mean[i].item() == pytest.approx(chosen[i].item() / len(c), abs=1e-5)
    assert lengths.tolist() == [len(c) for _, c, _ in enc] + [len(r) for _, _, r in enc]


def test_gradient_does_not_depend_on_micro_batch_size(tiny):
    model, tok = tiny
    pairs = [PreferencePair(f"q{i}" * (i + 1), "ab"[: i % 2 + 1], "xyz"[: i % 3 + 1]) for i in range(4)]
    enc = [encode_pair(tok, p) for p in pairs]
    ref = torch.randn(2, 4, generator=torch.Generator().manual_seed(0))

    def grads(micro_batch_size):
        model.zero_grad()

        def loss_of(micro):      # as DpoTask.loss: each micro-batch's mean, weighted by its share of the batch
            c, r = pair_logps(model, collate_pairs([enc[i] for i in micro.tolist()], tok.pad_token_id))
            out, weight = dpo_loss(c, r, ref[0, micro], ref[1, micro], beta=0.1), len(micro) / 4
            return out.total * weight, {k: float(v.detach()) * weight for k, v in {**out.losses, **out.metrics}.items()}

        sums = sum_parts(accumulate(torch.arange(4), micro_batch_size, loss_of))
        return [q.grad.clone() for q in model.parameters()], sums

    (g1, s1), (g4, s4) = grads(1), grads(4)
    assert all(torch.allclose(a, b, atol=1e-6, rtol=1e-4) for a, b in zip(g1, g4))
    assert s1["loss_preference"] == pytest.approx(s4["loss_preference"], abs=1e-5)
    model.zero_grad()
