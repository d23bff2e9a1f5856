"""bench/time_to_accuracy.py's arithmetic: llmrl's training clock from metrics.jsonl and the headline."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

from time_to_accuracy import first_reaching, headline, llmrl_points  # noqa: E402


def test_llmrl_clock_sums_step_times_and_skips_evaluations():
    rows = [{"kind": "eval", "step": 0, "heldout_accuracy": 0.1, "time_eval": 50.0},
            {"kind": "train", "step": 1, "time_step": 30.0},
            {"kind": "train", "step": 2, "time_step": 90.0},
            {"kind": "eval", "step": 2, "heldout_accuracy": 0.3, "time_eval": 50.0},
            {"kind": "train", "step": 3, "time_step": 60.0},
            {"kind": "eval", "step": 3, "heldout_accuracy": 0.4, "time_eval": 50.0},
            {"kind": "eval", "step": 3, "heldout_accuracy": 0.5, "time_eval": 50.0}]   # final eval at the same step
    res = llmrl_points(rows)
    assert res["points"] == [[0.0, 0, 0.1], [2.0, 2, 0.3], [3.0, 3, 0.5]]
    assert res["minutes"] == 3.0 and res["steps"] == 3


def test_first_reaching_is_the_first_point_at_or_above_the_target():
    points = [[0.0, 0, 0.1], [1.0, 5, 0.5], [2.0, 10, 0.4], [3.0, 15, 0.7]]
    assert first_reaching(points, 0.5) == 1.0
    assert first_reaching(points, 0.6) == 3.0
    assert first_reaching(points, 0.8) is None


def test_headline_ratio_and_verdict():
    trl = {"points": [[0.0, 0, 0.1], [10.0, 20, 0.3], [20.0, 40, 0.5]]}
    fast = {"points": [[0.0, 0, 0.1], [4.0, 20, 0.5]]}
    slow = {"points": [[0.0, 0, 0.1], [4.0, 20, 0.4], [6.0, 30, 0.6]]}
    assert "**0.20x**" in headline(trl, fast, 5) and "**met**" in headline(trl, fast, 5)
    assert "**0.30x**" in headline(trl, slow, 8) and "**not met**" in headline(trl, slow, 8)
    assert "not reach it within 5 min" in headline(trl, {"points": [[0.0, 0, 0.1], [5.0, 25, 0.45]]}, 5)
    flat = {"points": [[0.0, 0, 0.3], [20.0, 40, 0.2]]}
    assert "no accuracy to race to" in headline(flat, fast, 5)
