"""Preference pieces: DPO / cDPO / IPO / Bradley-Terry losses (hand values, slow loops, gradients), pair files and
their errors, tokenising, building pairs from a task, padded sequence log-probs, micro-batch invariance."""

import itertools
import json
import math

import pytest
import torch

from llmrl.data import make_task
from llmrl.preference.batch import collate_pairs, pair_logps, sequence_logps
from llmrl.preference.common import accumulate
from llmrl.preference.data import (PreferencePair, build_pairs_from_task, encode_pair, load_pairs, save_pairs,
                                   split_heldout)
from llmrl.preference.losses import bradley_terry_loss, dpo_loss
from llmrl.rewards import RewardResult
from llmrl.rollout.collect import encode_prompt


def t(x, dtype=torch.float32):
    return torch.tensor(x, dtype=dtype)


def softplus(x):   # -log sigma(-x)
    return math.log1p(math.exp(x))


# ----------------------------------------------------------------------------- losses

def test_dpo_hand_computed():
    # pair 0: h = (-1 - -1.5) - (-2 - -1.5) = 1;  pair 1: h = (-3 - -2) - (-1 - -1) = -1
    out = dpo_loss(t([-1.0, -3.0]), t([-2.0, -1.0]), t([-1.5, -2.0]), t([-1.5, -1.0]), beta=0.5)
    expected = [softplus(-0.5), softplus(0.5)]                     # -log sigma(beta h)
    assert torch.allclose(out.per_pair_loss, t(expected), atol=1e-6)
    assert out.losses["loss_preference"].item() == pytest.approx(sum(expected) / 2, abs=1e-6)
    m = {k: v.item() for k, v in out.metrics.items()}
    assert m["preference_accuracy"] == 0.5
    assert m["chosen_reward"] == pytest.approx((0.5 * 0.5 + 0.5 * -1.0) / 2)     # beta * (logp - logp_ref)
    assert m["rejected_reward"] == pytest.approx((0.5 * -0.5 + 0.0) / 2)
    assert m["reward_margin"] == pytest.approx((0.5 * 1 + 0.5 * -1) / 2, abs=1e-7)
    assert m["chosen_logp"] == pytest.approx(-2.0) and m["rejected_logp"] == pytest.approx(-1.5)
    tie = dpo_loss(t([-1.0]), t([-1.0]), t([-1.0]), t([-1.0]), beta=0.5)       # h = 0: log 2, and not ranked right
    assert tie.total.item() == pytest.approx(math.log(2)) and tie.metrics["preference_accuracy"].item() == 0.0


def test_conservative_dpo_and_ipo_hand_computed():
    args = (t([-1.0, -3.0]), t([-2.0, -1.0]), t([-1.5, -2.0]), t([-1.5, -1.0]))     # h = 1, -1
    cdpo = dpo_loss(*args, beta=0.5, label_smoothing=0.1).per_pair_loss
    assert torch.allclose(cdpo, t([0.9 * softplus(-0.5) + 0.1 * softplus(0.5),
                                   0.9 * softplus(0.5) + 0.1 * softplus(-0.5)]), atol=1e-6)
    ipo = dpo_loss(*args, beta=0.5, kind="ipo").per_pair_loss      # (h - 1 / (2 beta))^2 = (h - 1)^2
    assert torch.allclose(ipo, t([0.0, 4.0]), atol=1e-6)


@pytest.mark.parametrize("kind,eps", [("dpo", 0.0), ("dpo", 0.2), ("ipo", 0.0)])
def test_losses_match_slow_loop(kind, eps):
    g = torch.Generator().manual_seed(0)
    pc, pr, rc, rr = (torch.randn(7, generator=g, dtype=torch.float64) * 3 for _ in range(4))
    beta = 0.3
    out = dpo_loss(pc, pr, rc, rr, beta=beta, label_smoothing=eps, kind=kind)
    for i in range(7):
        h = (pc[i].item() - rc[i].item()) - (pr[i].item() - rr[i].item())
        sig = lambda x: 1 / (1 + math.exp(-x))                                       # noqa: E731
        slow = ((h - 1 / (2 * beta)) ** 2 if kind == "ipo"
                else -(1 - eps) * math.log(sig(beta * h)) - eps * math.log(sig(-beta * h)))
        assert out.per_pair_loss[i].item() == pytest.approx(slow, abs=1e-9)
    assert out.losses["loss_preference"].item() == pytest.approx(out.per_pair_loss.mean().item(), abs=1e-12)


def test_dpo_gradient_closed_form_and_finite_differences():
    g = torch.Generator().manual_seed(1)
    pc, pr = (torch.randn(5, generator=g, dtype=torch.float64).requires_grad_() for _ in range(2))
    rc, rr = (torch.randn(5, generator=g, dtype=torch.float64) for _ in range(2))
    beta = 0.7
    dpo_loss(pc, pr, rc, rr, beta=beta).per_pair_loss.sum().backward()
    h = (pc - rc) - (pr - rr)
    closed = beta * torch.sigmoid(-beta * h.detach())                # d(-log sigma(beta h)) / dh = -beta sigma(-beta h)
    assert torch.allclose(pc.grad, -closed, atol=1e-12) and torch.allclose(pr.grad, closed, atol=1e-12)
    for x, grad in ((pc, pc.grad), (pr, pr.grad)):                   # central differences, one coordinate at a time
        for i in range(5):
            e = torch.zeros(5, dtype=torch.float64)
            e[i] = 1e-6
            with torch.no_grad():
                plus = dpo_loss(*[v + e if v is x else v for v in (pc, pr, rc, rr)], beta=beta).per_pair_loss.sum()
                minus = dpo_loss(*[v - e if v is x else v for v in (pc, pr, rc, rr)], beta=beta).per_pair_loss.sum()
            assert ((plus - minus) / 2e-6).item() == pytest.approx(grad[i].item(), abs=1e-7)


def test_ipo_gradient_closed_form():
    pc, pr = t([0.2], torch.float64).requires_grad_(), t([-0.4], torch.float64).requires_grad_()
    dpo_loss(pc, pr, t([0.0], torch.float64), t([0.0], torch.float64), beta=0.25, kind="ipo").total.backward()
    assert pc.grad.item() == pytest.approx(2 * (0.6 - 2.0)) and pr.grad.item() == pytest.approx(-2 * (0.6 - 2.0))


def test_bradley_terry_hand_computed():
    out = bradley_terry_loss(t([1.0, 0.0]), t([0.0, 2.0]))
    assert torch.allclose(out.per_pair_loss, t([softplus(-1.0), softplus(2.0)]), atol=1e-6)
    assert out.metrics["preference_accuracy"].item() == 0.5
    assert out.metrics["reward_margin"].item() == pytest.approx(-0.5)


def test_loss_input_errors():
    with pytest.raises(ValueError, match="same shape"):
        dpo_loss(t([1.0, 2.0]), t([1.0]), t([1.0]), t([1.0]), beta=0.1)
    with pytest.raises(ValueError, match="same shape"):
        bradley_terry_loss(t([[1.0]]), t([[1.0]]))
    with pytest.raises(KeyError, match="valid: dpo, ipo"):
        dpo_loss(t([1.0]), t([1.0]), t([1.0]), t([1.0]), beta=0.1, kind="kto")
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo_loss(t([1.0]), t([1.0]), t([1.0]), t([1.0]), beta=0.1, kind="ipo", label_smoothing=0.1)
    with pytest.raises(ValueError, match="beta > 0"):
        dpo_loss(t([1.0]), t([1.0]), t([1.0]), t([1.0]), beta=0.0)


# ----------------------------------------------------------------------------- pair files

CHAT = {"prompt": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}],
        "chosen": [{"role": "assistant", "content": "hello"}], "rejected": [{"role": "assistant", "content": "go"}]}


def write(tmp_path, *lines):
    p = tmp_path / "pairs.jsonl"
    p.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    return p


def test_load_text_and_chat_pairs_and_round_trip(tmp_path):
    pairs = load_pairs(write(tmp_path, {"prompt": "2+2?", "chosen": "4", "rejected": "5", "source": "hand"}, "", CHAT))
    assert pairs[0] == PreferencePair("2+2?", "4", "5", {"source": "hand"})
    assert pairs[1].prompt == CHAT["prompt"] and pairs[1].chosen == CHAT["chosen"] and pairs[1].meta == {}
    assert load_pairs(save_pairs(pairs, tmp_path / "out" / "again.jsonl")) == pairs


@pytest.mark.parametrize("lines,message", [
    ([], "is empty"),
    (["   "], "is empty"),
    (["{not json"], r"pairs.jsonl:1: not valid JSON"),
    (["[1, 2]"], r"pairs.jsonl:1: each line must be a JSON object"),
    ([{"prompt": "a", "chosen": "b", "rejected": "c"}, {"prompt": "a", "chosen": "b"}],
     r"pairs.jsonl:2: missing key 'rejected'"),
    ([{"prompt": 3, "chosen": "b", "rejected": "c"}], r":1: 'prompt' must be a string or a non-empty list"),
    ([{"prompt": [], "chosen": "b", "rejected": "c"}], r"'prompt' must be a string or a non-empty list"),
    ([{"prompt": [{"role": "user"}], "chosen": "b", "rejected": "c"}], r"prompt\[0\] must be a message"),
    ([{**CHAT, "chosen": [{"role": "user", "content": "x"}]}], r"'chosen' as messages must be exactly one assistant"),
    ([{**CHAT, "rejected": CHAT["rejected"] * 2}], r"'rejected' as messages must be exactly one assistant"),
])
def test_load_pairs_errors(tmp_path, lines, message):
    with pytest.raises(ValueError, match=message):
        load_pairs(write(tmp_path, *lines))


def test_load_pairs_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_pairs(tmp_path / "nope.jsonl")


def test_split_heldout_by_prompt():
    pairs = [PreferencePair(f"q{i % 10}", f"a{i}", f"b{i}") for i in range(40)]
    train, held = split_heldout(pairs, 0.2, seed=3)
    assert len({p.prompt for p in held}) == 2 and not {p.prompt for p in held} & {p.prompt for p in train}
    assert len(train) + len(held) == 40 and split_heldout(pairs, 0.2, seed=3) == (train, held)
    assert split_heldout(pairs, 0.0, seed=3) == (pairs, [])


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
    monkeypatch.setattr("llmrl.preference.data.score", fake_scores(pattern))
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
    assert len({(p.chosen, p.rejected) for p in many[:4]}) == len({p.chosen for p in many[:4]}) * len({p.rejected for p in many[:4]})
    assert len(build_pairs_from_task(model, tok, task, 3, pairs_per_prompt=2, **kw)) == 2 + 2
    monkeypatch.setattr("llmrl.preference.data.score", fake_scores([1] * 12))
    assert build_pairs_from_task(model, tok, task, 3, **kw) == []                   # all pass: no pair


def test_build_pairs_real_scorer_runs(tiny):
    model, tok = tiny
    pairs = build_pairs_from_task(model, tok, make_task("arithmetic"), 2, samples_per_prompt=2, max_new_tokens=4)
    assert isinstance(pairs, list)          # the random tiny model almost surely never passes: usually []


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

        def loss_of(micro):
            c, r = pair_logps(model, collate_pairs([enc[i] for i in micro.tolist()], tok.pad_token_id))
            return dpo_loss(c, r, ref[0, micro], ref[1, micro], beta=0.1)

        sums = accumulate(torch.arange(4), micro_batch_size, loss_of)
        return [q.grad.clone() for q in model.parameters()], sums

    (g1, s1), (g4, s4) = grads(1), grads(4)
    assert all(torch.allclose(a, b, atol=1e-6, rtol=1e-4) for a, b in zip(g1, g4))
    assert s1["loss_preference"] == pytest.approx(s4["loss_preference"], abs=1e-5)
    model.zero_grad()
