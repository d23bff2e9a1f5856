"""Held-out evaluation's scores: `accuracy` counts a checker's partial credit, `exact` only full credit."""

from types import SimpleNamespace

import pytest
import torch

from llmrl.data.tasks import make_task
from llmrl.train.evaluate import evaluate


def _replies(texts: list[str]):
    """A collector that answers each prompt with the next of `texts` (the scoring is what is under test)."""
    it = iter(texts)

    def collect(model, tokenizer, batch, **kw):
        completions = [next(it) for _ in batch]
        return SimpleNamespace(completions=completions, examples=list(batch), extras={},
                               response_lengths=torch.tensor([len(c) for c in completions]))
    return collect


def test_exact_counts_only_full_credit_where_accuracy_counts_partial_credit():
    task = make_task("reasoning_gym:letter_counting", options={})
    e = [x for x in task.heldout(50) if len(x.answer) == 1 and x.answer in "123456"][:4]
    # right, right, reasoning-gym's substring credit (1/6 for `123456`), wrong
    replies = [f"Answer: {e[0].answer}", f"Answer: {e[1].answer}", "Answer: 123456", "Answer: 99"]
    ev = evaluate(None, None, e, max_new_tokens=8, batch_size=3, collect=_replies(replies))
    assert ev["accuracy"] == pytest.approx((1 + 1 + 1 / 6 + 0) / 4)
    assert ev["exact"] == 0.5
    assert ev["n"] == 4


def test_exact_equals_accuracy_on_a_right_or_wrong_task():
    task = make_task("arithmetic", options={"digits": 1, "ops": ["+"]})
    e = task.heldout(5)
    replies = [f"Answer: {x.answer}" for x in e[:3]] + ["Answer: -1", "no answer"]
    ev = evaluate(None, None, e, max_new_tokens=8, collect=_replies(replies))
    assert ev["accuracy"] == ev["exact"] == pytest.approx(0.6)
