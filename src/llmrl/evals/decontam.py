"""Decontamination: training-stream questions that equal, or nearly equal, evaluation questions.

    hits = contamination(train_texts, eval_texts, n=8, threshold=0.5)
    # [Hit(eval_index=3, train_index=17, overlap=1.0, exact=True), ...]

Texts are normalised (case folded, punctuation dropped, whitespace collapsed). A pair is `exact` when the
normalised texts are equal; otherwise an evaluation question is near-contaminated by the training question that
shares the largest fraction of its word n-grams (n = 8 by default; GPT-3 used 13-grams, the shorter GSM8K
questions need less), when that fraction is at least `threshold`. Questions shorter than n words are compared
whole (as one n-gram).
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from dataclasses import dataclass

_WORD = re.compile(r"[a-z0-9]+")


def normalize(text: str) -> str:
    return " ".join(_WORD.findall(text.casefold()))


def ngrams(text: str, n: int) -> set[tuple[str, ...]]:
    words = normalize(text).split()
    if len(words) < n:
        return {tuple(words)} if words else set()
    return {tuple(words[i:i + n]) for i in range(len(words) - n + 1)}


@dataclass(frozen=True)
class Hit:
    eval_index: int
    train_index: int
    overlap: float          # fraction of the eval question's n-grams found in that training question
    exact: bool


def contamination(train_texts: list[str], eval_texts: list[str], *, n: int = 8, threshold: float = 0.5) -> list[Hit]:
    """For each evaluation text, the training text it overlaps most, reported when exact or >= threshold."""
    if n < 1 or not 0.0 < threshold <= 1.0:
        raise ValueError(f"decontamination: need n >= 1 and 0 < threshold <= 1, got n={n}, threshold={threshold}")
    exact = {}
    index: dict[tuple, list[int]] = defaultdict(list)       # n-gram -> training texts holding it
    for j, text in enumerate(train_texts):
        exact.setdefault(normalize(text), j)
        for g in ngrams(text, n):
            index[g].append(j)
    hits = []
    for i, text in enumerate(eval_texts):
        if normalize(text) in exact:
            hits.append(Hit(i, exact[normalize(text)], 1.0, True))
            continue
        grams = ngrams(text, n)
        shared = Counter(j for g in grams for j in set(index.get(g, ())))
        if shared:
            j, count = max(shared.items(), key=lambda kv: (kv[1], -kv[0]))
            if count / len(grams) >= threshold:
                hits.append(Hit(i, j, count / len(grams), False))
    return hits


def question_text(example) -> str:
    """The text compared: the bare question where the task keeps one (meta["question"]), else the prompt."""
    return example.meta.get("question", example.prompt)


def report(train_examples: list, eval_examples: list, *, n: int = 8, threshold: float = 0.5, show: int = 3) -> dict:
    hits = contamination([question_text(e) for e in train_examples], [question_text(e) for e in eval_examples],
                         n=n, threshold=threshold)
    return {"train_checked": len(train_examples), "eval_checked": len(eval_examples), "ngram": n,
            "threshold": threshold, "exact": sum(h.exact for h in hits), "near": sum(not h.exact for h in hits),
            "examples": [{"eval": question_text(eval_examples[h.eval_index])[:200],
                          "train": question_text(train_examples[h.train_index])[:200],
                          "overlap": round(h.overlap, 3), "exact": h.exact} for h in hits[:show]]}
