"""pass@k and maj@k from n scored samples per problem.

    pass_at_k(n=10, c=3, k=1)      # 0.3: the unbiased estimator 1 - C(n-c, k) / C(n, k) (Chen et al. 2021)
    majority([("18", 1.0), ("17", 0.0), ("18", 1.0)])   # 1.0: the most common answer's score
"""

from __future__ import annotations

from collections import Counter

from llmrl.data.tasks import full_credit


def pass_at_k(n: int, c: int, k: int) -> float:
    """P(at least one of k samples drawn without replacement from n, c of them correct, is correct).
    = 1 - prod_{i=n-c+1}^{n} (1 - k / i), the numerically stable form of 1 - C(n-c, k) / C(n, k)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass_at_k: need 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    prob_all_wrong = 1.0
    for i in range(n - c + 1, n + 1):
        prob_all_wrong *= 1.0 - k / i
    return 1.0 - prob_all_wrong


def majority(keyed: list[tuple[str | None, float]]) -> float:
    """maj@k of one problem: the score of the most common answer key among the k samples (ties: the one seen
    first); samples with no answer (key None) do not vote; 0.0 when none answered."""
    votes = Counter(key for key, _ in keyed if key is not None)
    if not votes:
        return 0.0
    top = max(votes.values())
    winner = next(key for key, _ in keyed if key is not None and votes[key] == top)
    return next(s for key, s in keyed if key == winner)


def summarize(scores: list[list[float]], keys: list[list[str | None]] | None, ks: list[int]) -> dict:
    """scores[p][j]: the score of sample j of problem p, in [0, 1]. -> {"pass@k": mean over problems, ...,
    "maj@k": ...}. A sample passes only with full credit (1.0): a checker's partial credit (reasoning-gym gives
    1/6 to `123456` on a count of 3) never adds up to a pass. maj@k uses each problem's first k samples; it is
    left out when `keys` is None (no answer to vote on)."""
    n = len(scores[0])
    scores = [[full_credit(x) for x in s] for s in scores]                 # [P][n] passed or not
    out = {}
    for k in ks:
        out[f"pass@{k}"] = sum(pass_at_k(n, int(sum(s)), k) for s in scores) / len(scores)
        if keys is not None and k > 1:
            out[f"maj@{k}"] = sum(majority(list(zip(kk[:k], s[:k]))) for s, kk in zip(scores, keys)) / len(scores)
    return out
