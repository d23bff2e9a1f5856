"""TurnSampler: caches kept across turns, observations appended to them. The recorded log-probs equal one plain HF
forward over each row's whole sequence (prompt, sampled turns, observations), with left padding, groups, rows idle
after their stop, rows dropped between turns, a cache that must grow, the HF path, and bf16 (the C decode path)."""

import pytest
import torch

from llmrl.rollout.collect import encode_prompt
from llmrl.rollout.turns import TurnSampler

TEXTS = ["1 + 1 =", "Name a colour, any colour:", "x"]


def full_logp(model, seqs: list[list[int]], chosen: list[list[bool]], temperature: float, amp=None) -> list:
    """log softmax(logits / T) of every chosen token of each sequence, from one HF forward over the sequence."""
    out = []
    for ids, mask in zip(seqs, chosen):
        x = torch.tensor([ids])
        with torch.no_grad(), torch.autocast("cpu", dtype=amp or torch.bfloat16, enabled=amp is not None):
            logits = model(input_ids=x).logits[0].float()
        logp = torch.log_softmax(logits[:-1] / temperature, -1).gather(-1, x[0, 1:, None])[:, 0]
        out.append([float(lp) for lp, c in zip(logp.tolist(), mask[1:]) if c])
    return out


def play(model, tok, *, capacity=24, lean=True, amp=None, temperature=1.0, seed=0, limit=lambda r, turn: 5):
    """Three turns of 3 prompts x 2 rows: turn limits `limit(row, turn)` (5), observations of 1..4 tokens, row 1
    dropped after turn 1."""
    prompts = [encode_prompt(tok, t) for t in TEXTS]
    G = 2
    turns = TurnSampler(model, prompts, group_size=G, capacity=capacity, temperature=temperature,
                        stop_ids=(tok.eos_token_id,), pad_id=tok.pad_token_id,
                        generator=torch.Generator().manual_seed(seed), autocast_dtype=amp, lean=lean)
    seqs = {r: list(prompts[r // G]) for r in range(len(prompts) * G)}
    chosen = {r: [False] * len(seqs[r]) for r in seqs}
    logps = {r: [] for r in seqs}
    rows = list(seqs)
    for turn in range(3):
        out = turns.sample({r: limit(r, turn) for r in rows})
        for r in rows:
            seqs[r] += out[r].ids
            chosen[r] += [True] * len(out[r].ids)
            logps[r] += out[r].logp
        rows = [r for r in rows if not (turn == 0 and r == 1)]
        obs = {r: tok(" ok" * (1 + (r + turn) % 4), add_special_tokens=False)["input_ids"][:1 + (r + turn) % 4]
               for r in rows}
        if turn < 2:
            turns.extend(obs)
            for r in rows:
                seqs[r] += obs[r]
                chosen[r] += [False] * len(obs[r])
    return seqs, chosen, logps


@pytest.mark.parametrize("lean,capacity", [(True, 64), (True, 3), (False, 64)])
def test_recorded_logp_equals_a_full_forward_over_every_turn(tiny, lean, capacity):
    model, tok = tiny
    seqs, chosen, logps = play(model, tok, lean=lean, capacity=capacity, temperature=0.7)
    want = full_logp(model, [seqs[r] for r in seqs], [chosen[r] for r in seqs], 0.7)
    for r, w in zip(seqs, want):
        assert len(logps[r]) == len(w) > 0
        torch.testing.assert_close(torch.tensor(logps[r]), torch.tensor(w), atol=1e-5, rtol=0)
    assert sum(chosen[1]) <= 5 < sum(chosen[0])                  # row 1 was dropped after its first turn


@pytest.mark.parametrize("amp", [None, torch.bfloat16])
def test_rows_parked_mid_turn_come_back_with_their_own_cache(tiny, amp, monkeypatch):
    """Limits from 1 to 9 tokens a row: rows stop one after another, so the stopped ones are parked (set aside)
    while the rest decode, and put back at the turn's end. Every recorded log-prob still equals a full forward, and
    the lean runner parked rows (bf16: the C decode layout; fp32: the plain lean cache)."""
    from llmrl.rollout import turns as turns_module
    parks = []
    real = turns_module._LeanTurns.park
    monkeypatch.setattr(turns_module._LeanTurns, "park", lambda self, out, stay: parks.append(len(out)) or
                        real(self, out, stay))
    model, tok = tiny
    seqs, chosen, logps = play(model, tok, amp=amp, temperature=0.7, limit=lambda r, turn: 1 + (2 * r + turn) % 9)
    want = full_logp(model, [seqs[r] for r in seqs], [chosen[r] for r in seqs], 0.7, amp=amp)
    for r, w in zip(seqs, want):
        assert len(logps[r]) == len(w) > 0
        torch.testing.assert_close(torch.tensor(logps[r]), torch.tensor(w), atol=0.05 if amp else 1e-5, rtol=0)
    assert len(parks) >= 3 and sum(parks) >= 6, parks


def test_bf16_on_the_c_decode_path_matches_an_autocast_forward(tiny):
    model, tok = tiny
    seqs, chosen, logps = play(model, tok, amp=torch.bfloat16)
    want = full_logp(model, [seqs[r] for r in seqs], [chosen[r] for r in seqs], 1.0, amp=torch.bfloat16)
    diff = max(abs(a - b) for r, w in zip(seqs, want) for a, b in zip(logps[r], w))
    assert diff < 0.05, diff


def test_sample_needs_a_budget_and_extend_a_token(tiny):
    model, tok = tiny
    turns = TurnSampler(model, [encode_prompt(tok, "x")], group_size=1, capacity=8, temperature=1.0,
                        stop_ids=(tok.eos_token_id,), pad_id=tok.pad_token_id)
    with pytest.raises(ValueError, match="limit >= 1"):
        turns.sample({0: 0})
