"""Process rewards (llmrl.rewards.process): the `equations` rule, step texts from step ids, NaN-padded step-score
tensors, failure containment in `score_steps`, the per-step judge, and the flow the `process` credit estimator
consumes: step scores -> CreditInputs(step_scores=...) -> per-token advantages."""

import logging
import math
from types import SimpleNamespace

import pytest
import torch

from llmrl.credit import CreditInputs, assign_credit, step_ids_for_batch
from llmrl.data import Example
from llmrl.rewards.process import (STEP_REWARDS, equation_truths, equations, score_steps, step_judge,
                                   step_scores_tensor, step_texts)


@pytest.fixture(autouse=True)
def _one_thread():
    """One torch thread: these tiny models run faster so, and on a shared machine far faster."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


NAN = float("nan")
EX = Example("What is 2 + 2?", "4")


def same(a, b) -> bool:
    """Equal lists of floats, NaN equal to NaN."""
    return len(a) == len(b) and all((math.isnan(x) and math.isnan(y)) or x == y for x, y in zip(a, b))


# ----------------------------------------------------------------------------- the equations rule

@pytest.mark.parametrize("text, expected", [
    ("12 + 34 = 46", 1.0),
    ("3*4=12", 1.0),
    ("3*4=13", 0.0),
    ("2 + 3 * 4 = 14", 1.0),              # * before +
    ("2 + 3 * 4 = 20", 0.0),
    ("10 - 3 - 2 = 5", 1.0),              # left to right
    ("-3 * 4 = -12", 1.0),
    ("5 - -3 = 8", 1.0),
    ("7 × 6 = 42", 1.0),
    ("2+2=4=4", 1.0),                     # a chain: every side equal
    ("2+2=4=5", 0.0),
    ("3 + 4 = 7 * 2", 0.0),               # 7 != 14
    ("So the total is 7 + 8 = 15.", 1.0),
    ("First 2+2=4, then 4*3=12.", 1.0),
    ("First 2+2=4, then 4*3=13.", 0.0),   # one false equation makes the step wrong
    ("Step 1: 30 - 12 = 18", 1.0),
    ("Total = 12 + 34 = 46", 1.0),        # a word before the first '=' is not an equation side
    ("Add the numbers.", NAN),            # no equation: not scored
    ("Answer: 15", NAN),
    ("", NAN),
    ("1.5 + 1 = 2.5", NAN),               # decimals are not read
    ("2+2=4.5", NAN),
    ("x - 3 = 5", NAN),                   # a variable: not read
    ("x-3=5", NAN),
    ("(3+4)*2=14", NAN),                  # parentheses: not read
    ("2**3=8", NAN),
    ("8/2=4", NAN),
    ("3 + 4 =\n7", NAN),                  # an equation stays on one line
    ("2 + 2 = 4 and 1,000 + 1 = 1001", 1.0),
])
def test_equations_rule(text, expected):
    assert same(equations([text], [[text]], [EX])[0], [expected])


def test_equation_truths_lists_each_equation():
    assert equation_truths("1+1=2; 2*2=5; 3-1=2") == [True, False, True]
    assert equation_truths("no maths here") == []


def test_equations_scores_each_step_of_each_completion():
    texts = [["2+2=4\n\n", "Then 4*4=15\n\n", "Answer: 15"], [], ["9-1=8"]]
    assert [len(r) for r in equations(["", "", ""], texts, [EX] * 3)] == [3, 0, 1]
    out = equations(["", "", ""], texts, [EX] * 3)
    assert same(out[0], [1.0, 0.0, NAN]) and same(out[2], [1.0])


# ----------------------------------------------------------------------------- step texts and tensors

def test_step_texts_decodes_each_step_and_skips_masked_tokens(tiny):
    _, tok = tiny
    enc = lambda text: tok(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    pad, eos = tok.pad_token_id, tok.eos_token_id
    ids = torch.tensor([enc("abcdefghi") + [pad], enc("xyz") + [eos] + [pad] * 6])
    steps = torch.tensor([[0, 0, 0, -1, -1, 1, 1, 2, 2, -1],      # "de" is a tool output: in no step
                          [0, 1, 1, 1, -1, -1, -1, -1, -1, -1]])   # EOS is in step 1 but is not text
    assert step_texts(tok, ids, steps) == [["abc", "fg", "hi"], ["x", "yz"]]
    assert step_texts(tok, ids[:, :0], steps[:, :0]) == [[], []]
    with pytest.raises(ValueError, match="differ"):
        step_texts(tok, ids, steps[:, :3])


def test_step_texts_of_segmented_steps_join_into_the_completion(tiny):
    _, tok = tiny
    texts = ["Step 1: 2+2=4\nStep 2: 4*2=8\nStep 3: done", "1. a\n2. b"]
    rows = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    ids = torch.full((2, max(map(len, rows))), tok.pad_token_id)
    mask = torch.zeros(ids.shape)
    for i, r in enumerate(rows):
        ids[i, :len(r)], mask[i, :len(r)] = torch.tensor(r), 1
    out = step_texts(tok, ids, step_ids_for_batch(tok, ids, mask, mode="numbered"))
    assert out[0] == ["Step 1: 2+2=4\n", "Step 2: 4*2=8\n", "Step 3: done"]
    assert ["".join(s) for s in out] == texts


def test_step_scores_tensor_pads_with_nan():
    x = step_scores_tensor([[1.0, 0.0], [], [0.5]])
    assert x.shape == (3, 2) and x.dtype == torch.float32
    assert same(x.flatten().tolist(), [1.0, 0.0, NAN, NAN, 0.5, NAN])
    assert step_scores_tensor([[1.0]], num_steps=3).shape == (1, 3)
    assert step_scores_tensor([]).shape == (0, 0)
    with pytest.raises(ValueError, match="row 0 has 2 step scores but num_steps=1"):
        step_scores_tensor([[1.0, 2.0]], num_steps=1)


# ----------------------------------------------------------------------------- containment

@STEP_REWARDS.register("test_step_raises_on_boom")
def _raises_on_boom(completions, step_texts, examples):
    if any("boom" in c for c in completions):
        raise RuntimeError("boom")
    return [[0.5] * len(t) for t in step_texts]


@STEP_REWARDS.register("test_step_short_row")
def _short_row(completions, step_texts, examples):
    return [[1.0] * (len(t) - (i == 1)) for i, t in enumerate(step_texts)]   # row 1 is one step short


@STEP_REWARDS.register("test_step_bad_values")
def _bad_values(completions, step_texts, examples, *, rows: int | None = None):
    out = [[NAN, "high", float("inf"), torch.tensor(0.25)][:len(t)] for t in step_texts]
    return out[:rows] if rows is not None else out


TEXTS = [["a", "b"], ["c", "d", "e"], ["f"]]


def test_a_raising_function_loses_only_the_completions_it_fails_on(caplog):
    with caplog.at_level(logging.WARNING, logger="llmrl.rewards"):
        x, failures = score_steps("test_step_raises_on_boom", ["ok", "boom", "ok"], TEXTS, [EX] * 3)
    assert same(x.flatten().tolist(), [0.5, 0.5, NAN, NAN, NAN, NAN, 0.5, NAN, NAN])
    assert failures == 3
    assert len(caplog.records) == 1 and "failed on 3 of 6 steps" in caplog.text and "boom" in caplog.text


def test_a_wrong_shape_sets_those_steps_to_nan_and_counts_them():
    x, failures = score_steps("test_step_short_row", ["", "", ""], TEXTS, [EX] * 3)
    assert same(x.flatten().tolist(), [1.0, 1.0, NAN, NAN, NAN, NAN, 1.0, NAN, NAN]) and failures == 3
    x, failures = score_steps("test_step_bad_values", ["", "", ""], TEXTS, [EX] * 3, {"rows": 2})
    assert torch.isnan(x).all() and x.shape == (3, 3) and failures == 6           # 2 rows for 3 completions


def test_non_numbers_are_failures_but_nan_is_not_scored():
    x, failures = score_steps("test_step_bad_values", ["", "", ""], TEXTS, [EX] * 3)
    # NaN = "not scored" (no failure); "high" and inf are failures; a 0-d tensor is a number
    assert same(x[1].tolist(), [NAN, NAN, NAN]) and failures == 3                # "high" x2, inf x1
    x, failures = score_steps("test_step_bad_values", [""], [["a", "b", "c", "d"]], [EX])
    assert same(x[0].tolist(), [NAN, NAN, NAN, 0.25]) and failures == 2


def test_score_steps_checks_lengths_and_names():
    with pytest.raises(ValueError, match="2 completions, 1 step lists"):
        score_steps("equations", ["", ""], [[]], [EX, EX])
    with pytest.raises(KeyError, match="unknown step reward 'nope'; valid: .*equations"):
        score_steps("nope", [""], [[]], [EX])
    x, failures = score_steps("equations", ["2+2=4"], [["2+2=4"]], [EX], num_steps=3)
    assert same(x[0].tolist(), [1.0, NAN, NAN]) and failures == 0


# ----------------------------------------------------------------------------- the flow into `process` credit

def test_equation_step_scores_drive_process_credit(tiny):
    _, tok = tiny
    completions = ["2+2=4\n\n3*3=10", "Hmm.\n\n5-1=4"]
    rows = [tok(c, add_special_tokens=False)["input_ids"] for c in completions]
    T = max(map(len, rows))
    ids, mask = torch.full((2, T), tok.pad_token_id), torch.zeros(2, T)
    for i, r in enumerate(rows):
        ids[i, :len(r)], mask[i, :len(r)] = torch.tensor(r), 1
    step_ids = step_ids_for_batch(tok, ids, mask, mode="blank_line")
    texts = step_texts(tok, ids, step_ids)
    assert texts == [["2+2=4\n\n", "3*3=10"], ["Hmm.\n\n", "5-1=4"]]
    step_scores, failures = score_steps("equations", completions, texts, [EX, EX])
    assert same(step_scores.flatten().tolist(), [1.0, 0.0, NAN, 1.0]) and failures == 0
    inputs = CreditInputs(scores=torch.tensor([1.0, 0.0]), response_mask=mask, group_ids=torch.tensor([0, 0]),
                          step_ids=step_ids, step_scores=step_scores)
    # spread "even": a step's score split over its tokens (7 and 6 tokens in row 0; 6 and 5 in row 1, 2 pads)
    even = assign_credit("process", inputs, spread="even", outcome="none").advantages
    expected = torch.tensor([[1 / 7] * 7 + [0.0] * 6, [0.0] * 6 + [1 / 5] * 5 + [0.0] * 2])
    torch.testing.assert_close(even, expected, rtol=0, atol=1e-7)
    # spread "full" plus the outcome: each token gets its step's score + R (NaN step: 0; pads: 0)
    full = assign_credit("process", inputs, spread="full", outcome="add").advantages
    expected = torch.tensor([[2.0] * 7 + [1.0] * 6, [0.0] * 6 + [1.0] * 5 + [0.0] * 2])
    torch.testing.assert_close(full, expected, rtol=0, atol=0)


# ----------------------------------------------------------------------------- the per-step judge

def test_step_judge_asks_about_each_nonempty_step(monkeypatch):
    prompts, calls = [], []
    replies = iter(["7", "I give it 3/10", "no idea"])

    def fake_collect(model, tokenizer, examples, **kw):
        assert model == "judge-model" and kw["group_size"] == 1
        prompts.extend(ex.prompt for ex in examples)
        calls.append(len(examples))
        return SimpleNamespace(completions=[next(replies) for _ in examples])

    monkeypatch.setattr("llmrl.rewards.process._judge_model", lambda name: ("judge-model", "judge-tokenizer"))
    monkeypatch.setattr("llmrl.rollout.collect.collect_rollout", fake_collect)
    texts = [["s1 ", "  ", "s2 "], [], ["s3"]]
    scores = step_judge(["s1   s2 ", "", "s3"], texts, [EX, EX, Example("Q2", "A2")], batch_size=2)
    assert same(scores[0], [0.7, NAN, 0.3]) and scores[1] == [] and same(scores[2], [NAN])
    assert calls == [2, 1]                                   # 3 judged steps in batches of 2; blank steps skipped
    assert "Solution so far: s1   \nNext step: s2 " in prompts[1] and "Question: What is 2 + 2?" in prompts[1]
    assert "Question: Q2\nReference answer: A2\nSolution so far: \nNext step: s3" in prompts[2]
