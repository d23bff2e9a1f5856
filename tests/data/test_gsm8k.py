"""GSM8K as a training task: the shipped data, the `####` answer, the split between stream and held-out set."""

import itertools

import pytest

from llmrl.data import make_task
from llmrl.data.gsm8k import final_answer, read_gsm8k
from llmrl.rewards.functions import correct


def test_final_answer_is_the_number_after_the_last_marker():
    assert final_answer("16 - 3 - 4 = 9\n#### 18") == "18"
    assert final_answer("so #### is used\n#### 1,200") == "1200"
    with pytest.raises(ValueError, match="####"):
        final_answer("no marker")


def test_shipped_splits_have_their_published_sizes():
    assert len(read_gsm8k("train")) == 7473 and len(read_gsm8k("test")) == 1319


def test_task_streams_train_and_holds_out_test():
    task = make_task("gsm8k")
    stream = list(itertools.islice(task.train_stream(0), 500))
    held = task.heldout(50)
    assert len({ex.prompt for ex in stream}) == 500
    test_questions = {ex.meta["question"] for ex in read_gsm8k("test")}
    assert not test_questions & {ex.meta["question"] for ex in stream}
    assert held[0].answer == "18" and held[0].prompt.endswith("'Answer: <number>'.")
    assert [ex.prompt for ex in itertools.islice(make_task("gsm8k").train_stream(0), 5)] == [
        ex.prompt for ex in stream[:5]]                                           # seeded


def test_the_correct_reward_checks_the_gsm8k_answer():
    ex = make_task("gsm8k").heldout(1)[0]
    assert correct(["9 eggs at $2 each.\nAnswer: $18", "Answer: 18.00", "Answer: 16", "18 or 20"], [ex] * 4) == [
        1.0, 1.0, 0.0, 0.0]


def test_bad_options_and_files_are_refused():
    with pytest.raises(ValueError, match="unknown option"):
        make_task("gsm8k", options={"split": "test"})
    with pytest.raises(ValueError, match="generates its own data|do not give"):
        make_task("gsm8k", train_path="x.jsonl")
    with pytest.raises(ValueError, match="heldout_size"):
        make_task("gsm8k").heldout(5000)
