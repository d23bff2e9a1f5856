"""Answer-balanced training prompts: every reference answer comes up equally often, deterministically, in bounded
memory; a stream whose answers do not repeat is refused; and the option reaches a run's batches."""

import itertools
import random
from collections import Counter

import pytest

from llmrl.data.balance import answer_balanced, answer_key
from llmrl.data.tasks import Example


def skewed(shares: dict[str, float], seed: int = 0):
    """An endless stream whose answers follow `shares` (syllogism's is {Yes: 0.72, No: 0.28})."""
    rng, answers, weights = random.Random(seed), list(shares), list(shares.values())
    for i in itertools.count():
        yield Example(f"q{i}", rng.choices(answers, weights)[0])


class Counting:
    def __init__(self, it):
        self.it, self.read = it, 0

    def __iter__(self):
        return self

    def __next__(self):
        self.read += 1
        return next(self.it)


def shares(examples) -> dict[str, float]:
    c = Counter(answer_key(ex.answer) for ex in examples)
    return {k: v / len(examples) for k, v in c.items()}


def test_a_skewed_yes_no_stream_comes_out_even():
    out = list(itertools.islice(answer_balanced(skewed({"Yes": 0.72, "No": 0.28}), seed=0), 2000))
    assert shares(out) == pytest.approx({"yes": 0.5, "no": 0.5}, abs=0.03)
    assert len({ex.prompt for ex in out}) == len(out)              # no prompt twice


def test_many_answers_come_out_near_uniform_and_a_rare_one_as_often_as_it_arrives():
    weights = {"1": 0.33, "2": 0.25, "0": 0.2, "3": 0.15, "4": 0.06, "5": 0.01}
    out = list(itertools.islice(answer_balanced(skewed(weights), seed=1), 3000))
    got = shares(out)
    for k in "01234":
        assert got[k] == pytest.approx(0.2, abs=0.03), (k, got)      # the five common enough: 1/5 each
    assert got["5"] == pytest.approx(0.01 * 4, abs=0.015)             # read 4 a draw: all of its 1% arrive


def test_case_and_white_space_fold_into_one_answer():
    stream = iter([Example("a", "Yes"), Example("b", " yes "), Example("c", "No")] * 100)
    out = list(itertools.islice(answer_balanced(stream, seed=0, warmup=3), 60))
    assert set(shares(out)) == {"yes", "no"}


def test_the_same_seed_draws_the_same_prompts_and_memory_stays_bounded():
    def draw(seed):
        src = Counting(skewed({"Yes": 0.72, "No": 0.28}))
        out = [ex.prompt for ex in itertools.islice(answer_balanced(src, seed=seed, warmup=32, read=4), 500)]
        return out, src.read

    (a, read), (b, _) = draw(3), draw(3)
    assert a == b and a != draw(4)[0]
    assert read <= 32 + 4 * 500 + 1                                   # warmup, then `read` a draw


def test_a_stream_whose_answers_do_not_repeat_is_refused():
    distinct = (Example(f"spell {i}", f"word{i}") for i in itertools.count())
    with pytest.raises(ValueError, match="do not repeat"):
        next(answer_balanced(distinct, seed=0, max_answers=50))


def test_a_finite_stream_ends_after_its_last_prompt():
    stream = iter([Example(str(i), "Yes" if i % 4 else "No") for i in range(40)])
    out = list(answer_balanced(stream, seed=0, warmup=8, per_answer=64))
    assert sorted(ex.prompt for ex in out) == sorted(str(i) for i in range(40))


def test_the_option_balances_a_run_s_batches():
    from llmrl.config import TrainConfig
    from llmrl.config_loader import config_from_dict
    from llmrl.train.build import _task

    def answers(balance: bool) -> dict[str, float]:
        task = {"name": "arithmetic", "options": {"digits": 1, "ops": ["+"]}, "heldout_size": 4}
        cfg = config_from_dict({"task": task, "rollout": {"balance_answers": balance, "prompts_per_step": 8}},
                               TrainConfig)
        _, batches, _ = _task(cfg)
        return shares([ex for batch in itertools.islice(batches, 150) for ex in batch])

    plain, balanced = answers(False), answers(True)      # 1-digit sums: 9 is 10x as common as 18 or 0
    assert max(plain.values()) / min(plain.values()) > 5
    assert max(balanced.values()) / min(balanced.values()) < 1.6
