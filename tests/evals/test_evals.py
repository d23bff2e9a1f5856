"""Eval suites: pass@k / maj@k arithmetic, the suites' data and scoring, decontamination, the runner and the CLI."""

import json
import math
from itertools import combinations

import pytest

from llmrl.cli import main
from llmrl.data.tasks import Example
from llmrl.evals import decontam, make_suite
from llmrl.evals.metrics import majority, pass_at_k, summarize
from llmrl.evals.runner import EvalOptions, run_suite, spread


@pytest.mark.parametrize("n,c,k", [(10, 3, 1), (10, 3, 2), (10, 3, 5), (5, 0, 2), (5, 5, 3), (7, 2, 6), (4, 1, 4)])
def test_pass_at_k_is_the_fraction_of_k_subsets_with_a_correct_sample(n, c, k):
    correct = set(range(c))
    subsets = list(combinations(range(n), k))
    expected = sum(bool(correct & set(s)) for s in subsets) / len(subsets)
    assert pass_at_k(n, c, k) == pytest.approx(expected)
    assert pass_at_k(n, c, k) == pytest.approx(1 - math.comb(n - c, k) / math.comb(n, k))


def test_pass_at_k_rejects_bad_counts():
    with pytest.raises(ValueError):
        pass_at_k(3, 4, 1)
    with pytest.raises(ValueError):
        pass_at_k(3, 1, 4)


def test_majority_votes_on_answers_and_ignores_non_answers():
    assert majority([("18", 1.0), ("17", 0.0), ("18", 1.0)]) == 1.0
    assert majority([("17", 0.0), (None, 1.0), ("17", 0.0), ("18", 1.0)]) == 0.0
    assert majority([("18", 1.0), ("17", 0.0)]) == 1.0            # a tie: the answer seen first
    assert majority([(None, 0.0), (None, 0.0)]) == 0.0


def test_summarize_reports_pass_and_maj():
    scores = [[1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]]
    keys = [["1", "2", "2", "2"], ["3", "3", "4", "5"]]
    out = summarize(scores, keys, [1, 4])
    assert out["pass@1"] == pytest.approx(0.125) and out["pass@4"] == pytest.approx(0.5)
    assert out["maj@4"] == 0.0
    assert "maj@1" not in summarize(scores, keys, [1]) and "maj@4" not in summarize(scores, None, [1, 4])


def test_partial_credit_never_adds_up_to_a_pass():
    """Four samples of 1/3 credit each (e.g. reasoning-gym's substring credit) are four failures, not one pass."""
    partial = [[1 / 3] * 4, [1.0, 0.5, 0.5, 0.0]]
    keys = [["123", "123", "123", "123"], ["3", "13", "13", "9"]]
    out = summarize(partial, keys, [1, 4])
    assert out["pass@1"] == pytest.approx((0 + 1 / 4) / 2) and out["pass@4"] == pytest.approx(0.5)
    assert out["maj@4"] == 0.0                          # the second problem's majority, `13`, has partial credit


def test_unknown_suite_lists_the_valid_ones():
    with pytest.raises(ValueError, match=r"unknown eval suite 'gsm9k'.*arithmetic.*bfcl.*gsm8k.*humaneval.*"
                                         r"reasoning_gym:<dataset>"):
        make_suite("gsm9k")
    with pytest.raises(ValueError, match="reasoning_gym:<dataset>"):
        make_suite("reasoning_gym")
    with pytest.raises(ValueError, match="takes no"):
        make_suite("gsm8k:main")


def test_gsm8k_suite_is_the_test_split_with_its_final_answers():
    suite = make_suite("gsm8k")
    assert len(suite.examples) == 1319 and suite.max_new_tokens == 256
    ex = suite.examples[0]
    assert ex.answer == "18" and ex.meta["question"].startswith("Janet")
    assert suite.score(["She makes 9 * 2 = 18 dollars.\nAnswer: 18", "Answer: 16", "no idea"], [ex] * 3) == [1, 0, 0]
    assert suite.answer_key("Answer: 1,200.0", ex) == suite.answer_key("so 1200", ex) == "1200"


def test_missing_gsm8k_data_names_the_path(monkeypatch, tmp_path):
    from llmrl.data import gsm8k

    monkeypatch.setattr(gsm8k, "data_path", lambda split: tmp_path / f"{split}.jsonl")
    with pytest.raises(FileNotFoundError, match=rf"{tmp_path}/test.jsonl.*reinstall llmrl"):
        make_suite("gsm8k")


def test_humaneval_suite_runs_the_canonical_solution_in_the_sandbox():
    suite = make_suite("humaneval")
    assert len(suite.examples) == 164
    ex = suite.examples[0]
    good = f"```python\n{ex.answer}```"
    bad = f"```python\n{ex.meta['prompt_code']}    return True\n```"
    assert suite.score([good, bad], [ex, ex]) == [1.0, 0.0]


def test_bfcl_suite_checks_calls_with_bfcl_own_ast_checker():
    suite = make_suite("bfcl")
    assert len(suite.examples) == 2351
    simple = make_suite("bfcl:simple_python")
    ex = simple.examples[0]                     # calculate_triangle_area(base=10, height=5)
    assert ex.meta["id"] == "simple_python_0"
    system = simple.messages(ex)[0]
    assert system["role"] == "system" and "calculate_triangle_area" in system["content"]
    right = "[calculate_triangle_area(base=10, height=5)]"
    wrong = ["[calculate_triangle_area(base=10, height=6)]", "[area(base=10, height=5)]", "The area is 25."]
    assert simple.score([right, *wrong], [ex] * 4) == [1.0, 0.0, 0.0, 0.0]
    assert simple.answer_key(right, ex) == simple.answer_key(" calculate_triangle_area(height=5, base=10) ", ex)
    with pytest.raises(ValueError, match="unknown category.*simple_python"):
        make_suite("bfcl:simple_java")


def test_decontamination_finds_exact_and_near_copies_only():
    train = ["What is 2 plus 2? Answer quickly.",
             "Janet's ducks lay 16 eggs per day and she eats three for breakfast every single morning today",
             "A completely different question about trains leaving a station at noon"]
    evals = ["what is 2 plus 2?  answer QUICKLY", "Janet's ducks lay 16 eggs per day and she eats three for "
             "breakfast every single morning", "How many apples fit in a very large basket of unusual size"]
    hits = decontam.contamination(train, evals, n=5, threshold=0.5)
    assert [(h.eval_index, h.train_index, h.exact) for h in hits] == [(0, 0, True), (1, 1, False)]
    assert hits[1].overlap == pytest.approx(1.0)


def test_spread_covers_the_whole_suite():
    assert spread(list(range(10)), 3) == [0, 3, 6]
    assert spread(list(range(4)), None) == [0, 1, 2, 3] == spread(list(range(4)), 9)


def test_run_suite_on_the_tiny_model(tiny):
    model, tok = tiny
    suite = make_suite("arithmetic")
    greedy = run_suite(model, tok, suite, EvalOptions(limit=4, max_new_tokens=4, autocast_dtype=None), progress=False)
    assert greedy["n"] == 4 and greedy["k"] == 1 and greedy["temperature"] == 0.0 and "maj@1" not in greedy
    assert greedy["top_answer_share"] in (0.0, 0.25, 0.5, 0.75, 1.0)     # 4 problems: quarters
    assert greedy["constant_answer_accuracy"] == 0.25                        # 4 different sums
    sampled = run_suite(model, tok, suite, EvalOptions(k=3, limit=4, max_new_tokens=4, autocast_dtype=None),
                        progress=False)
    assert {"pass@1", "pass@3", "maj@3"} <= sampled.keys() and sampled["pass@3"] >= sampled["pass@1"]
    with pytest.raises(ValueError, match="temperature"):
        run_suite(model, tok, suite, EvalOptions(k=2, temperature=0.0, limit=2), progress=False)


def test_cli_writes_results_and_compares(tmp_path, capsys):
    out = tmp_path / "a.json"
    args = ["eval", "--model", "tiny", "--suite", "arithmetic", "--limit", "2", "--max-new-tokens", "3",
            "--autocast", "none", "--no-progress", "--out", str(out), "--train-task", "arithmetic",
            "--decontam-samples", "300"]
    assert main(args) == 0
    data = json.loads(out.read_text())
    r = data["suites"]["arithmetic"]
    assert data["model"] == "tiny" and r["n"] == 2 and r["decontamination"]["exact"] == 0   # disjoint by design
    assert "| arithmetic" in capsys.readouterr().out
    b = tmp_path / "b.json"
    b.write_text(json.dumps({**data, "model": "after", "suites": {"arithmetic": {**r, "pass@1": r["pass@1"] + 0.5}}}))
    assert main(["eval", "--compare", str(out), str(b)]) == 0
    assert "+0.500" in capsys.readouterr().out
    assert main(["eval", "--model", "tiny", "--suite", "gsm8k,nope"]) == 2
    assert "valid: arithmetic, bfcl" in capsys.readouterr().err


def test_decontamination_flags_a_task_trained_on_its_benchmark():
    from llmrl.data.humaneval import HumanEvalTask

    task = HumanEvalTask()
    report = decontam.report(task.train, make_suite("humaneval").examples)
    assert report["exact"] == len(task.train) == 164 - len(task.held)
    assert isinstance(Example("q", "a"), Example)


def test_decontamination_only_needs_no_model(capsys):
    assert main(["eval", "--suite", "humaneval", "--train-task", "humaneval", "--decontam-samples", "144"]) == 0
    out = capsys.readouterr().out
    assert "decontamination humaneval vs humaneval (144 training questions" in out and "144 exact" in out
    assert main(["eval", "--suite", "arithmetic"]) == 2
    assert "--train-task" in capsys.readouterr().err
