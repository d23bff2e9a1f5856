"""Answer-balanced training prompts (`rollout.balance_answers: true`): a guard against the constant-answer collapse.

A group-normalised advantage sums to zero within each group, but its push toward one answer over the others does
not cancel across groups. A group whose reference answer is `Yes` rewards its `Yes` samples and a `No` group
penalises them, by the same amount when the two groups' pass rates match; so over a batch, the push toward
answering `Yes` to everything is proportional to (share of `Yes` prompts - share of `No` prompts). syllogism's
training stream is 72% `Yes`, and dapo on it ended giving `Answer: Yes` to every prompt (docs/benchmarks.md,
section learning_rg20). Drawn so that each reference answer comes up equally often, a batch gives a constant
answer no net advantage: only telling the prompts apart is rewarded.

    stream = answer_balanced(task.train_stream(seed), seed=seed)

Each draw picks a reference answer uniformly among those with a waiting prompt, then that answer's oldest waiting
prompt. An answer rarer than the others comes up as often as the stream brings it. Memory is bounded: at most
`per_answer` prompts wait per answer (one read while its answer's bucket is full is skipped; the stream is endless
and brings more), the stream is read `read` prompts per draw after a first `warmup`, and a stream with more than
`max_answers` distinct answers is refused (its answers do not repeat, e.g. spelled-out words: nothing to balance).
The draw is seeded, so a resumed run (which draws its batches again) gets the same prompts.

Measured (docs/benchmarks.md, sections learning_rg20 and learning_bal): alone, under dapo, it does not stop the
collapse but moves it (letter_counting: `2` to every prompt): once a group's samples all agree it has no reward
variance and nothing pushes back. With a KL term to the reference it gave a syllogism policy that tells Yes from No
prompts (0.615 by answer, not one answer to all), where the same run without it answers `Yes` to every prompt.
"""

from __future__ import annotations

import random
from collections import deque
from typing import Iterator

from llmrl.data.tasks import Example, answer_key


def answer_balanced(stream: Iterator[Example], *, seed: int, per_answer: int = 64, read: int = 4, warmup: int = 256,
                    max_answers: int = 256) -> Iterator[Example]:
    """The examples of `stream`, drawn so that every reference answer comes up equally often (module docstring)."""
    rng = random.Random(seed)
    buckets: dict[str, deque] = {}     # answer_key -> its waiting examples, oldest first (dicts keep order)

    def take(n: int) -> None:
        for _ in range(n):
            ex = next(stream, None)
            if ex is None:
                return
            key = answer_key(ex.answer)
            if key not in buckets:
                if len(buckets) >= max_answers:
                    raise ValueError(f"rollout.balance_answers: the training stream has more than {max_answers} "
                                     "distinct reference answers, so its answers do not repeat and there is "
                                     "nothing to balance; set rollout.balance_answers: false for this task")
                buckets[key] = deque()
            if len(buckets[key]) < per_answer:
                buckets[key].append(ex)

    take(warmup)
    while True:
        take(read)
        waiting = [q for q in buckets.values() if q]
        if not waiting:
            return
        yield rng.choice(waiting).popleft()
