"""Hierarchical rewards (gates, per-term normalisation), hangs, and the estimated rewards: judge, reward model,
Monte-Carlo average."""

import itertools
import math
import time

import pytest
import torch

from llmrl.data import Example
from llmrl.rewards import REWARDS, Term, score
from llmrl.rewards.learned import parse_score

EX = [Example("What is 1 + 1?", "2")] * 4
COMPLETIONS = ["Answer: 2", "2", "Answer: 3", "nothing"]


def test_gate_counts_correctness_only_where_the_format_passes():
    r = score(COMPLETIONS, EX, [Term("format", 0.5), Term("correct", 1.0, gate="format")])
    assert r.components["correct"].tolist() == [1.0, 1.0, 0.0, 0.0]      # raw scores are logged ungated
    assert r.components["format"].tolist() == [1.0, 0.0, 1.0, 0.0]
    assert r.total.tolist() == [1.5, 0.0, 0.5, 0.0]


def test_batch_normalised_subgoals_share_a_scale():
    r = score(COMPLETIONS, EX, [Term("format", 1.0, normalize="batch"), Term("correct", 1.0, normalize="batch")])
    f, c = r.components["format"], r.components["correct"]
    expected = (f - f.mean()) / (f.std() + 1e-6) + (c - c.mean()) / (c.std() + 1e-6)
    assert torch.allclose(r.total, expected, atol=1e-5)


def test_gate_on_a_missing_term_is_an_error():
    with pytest.raises(ValueError, match="not a term"):
        score(COMPLETIONS, EX, [Term("correct", gate="format")])


@REWARDS.register("test_hangs")
def _hangs(completions, examples):
    time.sleep(30)
    return [1.0] * len(completions)


def test_a_hanging_reward_is_cut_off_scored_zero_and_counted():
    t = time.perf_counter()
    r = score(COMPLETIONS, EX, [Term("correct"), Term("test_hangs", timeout_s=0.3)])
    assert time.perf_counter() - t < 5
    assert r.failures["test_hangs"] == 4 and r.components["test_hangs"].tolist() == [0.0] * 4
    assert r.total.tolist() == [1.0, 1.0, 0.0, 0.0]


_counter = itertools.count()


@REWARDS.register("test_noisy")
def _noisy(completions, examples):
    k = next(_counter)
    return [float(k % 2)] * len(completions)        # 0, 1, 0, 1, ...: mean 0.5 over an even number of calls


def test_monte_carlo_averages_repeated_calls():
    global _counter
    _counter = itertools.count()
    r = score(COMPLETIONS[:2], EX[:2], [Term("monte_carlo", options={"of": "test_noisy", "samples": 4})])
    assert r.components["monte_carlo"].tolist() == [0.5, 0.5]


@pytest.mark.parametrize("text, expected", [("8", 0.8), ("Score: 10/10", 1.0), ("12", 1.0), ("-3", 0.0),
                                            ("no idea", math.nan)])
def test_judge_score_parsing(text, expected):
    got = parse_score(text, 10.0)
    assert (math.isnan(got) and math.isnan(expected)) or got == pytest.approx(expected)


def test_judge_with_a_local_model_scores_in_range_or_counts_a_failure():
    r = score(COMPLETIONS, EX, [Term("judge", options={"model": "tiny", "max_new_tokens": 4})])
    values = r.components["judge"]
    assert values.shape == (4,) and torch.all((values >= 0) & (values <= 1))
    assert 0 <= r.failures["judge"] <= 4        # the random tiny model rarely writes a number: counted, not raised


def test_reward_model_scores_every_completion(tmp_path):
    r = score(COMPLETIONS, EX, [Term("reward_model", options={"path": "tiny"})])
    assert r.components["reward_model"].shape == (4,) and r.failures["reward_model"] == 0
    assert len(set(r.components["reward_model"].tolist())) > 1     # different completions, different scores
