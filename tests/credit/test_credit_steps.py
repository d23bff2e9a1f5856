"""Reasoning steps: the segmenter (`credit/steps.py`) and the step-level estimators `process` and `vineppo`
(hand-computed values and slow loop references; the shared masking invariances and sign test run for every
estimator in test_credit_estimators.py)."""

import itertools
import math

import pytest
import torch

from llmrl.credit import CreditInputs, assign_credit, segment_steps, step_boundaries, step_ids_for_batch
from test_credit_estimators import NAN, chosen_lists, close, make, random_inputs, t

# ----------------------------------------------------------------------------- segmenter


def test_blank_line_split_across_and_inside_tokens():
    tokens = ["First", " step", ".\n", "\n", "Second", "\n\nThird", " end", "\n\n"]
    # ".\n" + "\n" ends step 0; "\n\nThird" holds the first character of step 2; a trailing blank line opens nothing
    assert segment_steps(tokens, [1] * 8, mode="blank_line") == [0, 0, 0, 0, 1, 2, 2, 2]
    assert segment_steps(["a", "\n \n", "  ", "b", "\n\n\n\n", "c"], [1] * 6) == [0, 0, 0, 1, 1, 2]
    assert segment_steps(["a\r\n", "\r\n", "b"], [1] * 3) == [0, 0, 1]
    assert segment_steps(["a", "\n", "b", ".\n", "\n", "c"], [1] * 6) == [0, 0, 0, 0, 0, 1]  # one newline is no step


def test_numbered_markers_at_line_starts():
    tokens = ["Let", " me", "\n", "Step", " 1", ":", " add", "\n", "**Step", " 2", ":**", " mul", "\n",
              "3", ".", " so", " 3", ".", "\n", "3", ".5", " is", "\n", "4", ")", " done"]
    ids = [0, 0, 0, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2,
           3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 4, 4, 4]  # " 3." mid-line and "3.5" at a line start are no markers
    assert segment_steps(tokens, [1] * len(tokens), mode="numbered") == ids
    assert segment_steps(["1", ".", " a", "\n", "2", ")", " b"], [1] * 7, mode="numbered") == [0, 0, 0, 0, 1, 1, 1]


def test_regex_matches_only_at_token_starts():
    tokens = ["x", "\n", "Therefore", " y", " Therefore", "\nTherefore"]
    assert segment_steps(tokens, [1] * 6, mode="regex", pattern=r"(?m)^Therefore") == [0, 0, 1, 1, 1, 1]
    assert segment_steps(tokens, [1] * 6, mode="regex", pattern=r" ?Therefore") == [0, 0, 1, 1, 2, 2]
    with pytest.raises(ValueError, match="pattern"):
        segment_steps(tokens, [1] * 6, mode="regex")


def test_masked_tokens_are_in_no_step_and_end_the_step():
    tokens = ["a", "b", "<tool>", "\n\nout", "c", "d", "<pad>"]
    assert segment_steps(tokens, [1, 1, 0, 0, 1, 1, 0]) == [0, 0, -1, -1, 1, 1, -1]
    assert segment_steps(["t", "a", "b"], torch.tensor([0.0, 1.0, 1.0])) == [-1, 0, 0]
    # a marker at a line start right after a tool output still counts as a line start
    tokens = ["a", "\n", "res\n", "Step", " 2", ":", "x", "\n", "Step", " 3", ":"]
    mask = [1, 1, 0, 1, 1, 1, 1, 1, 1, 1, 1]
    assert segment_steps(tokens, mask, mode="numbered") == [0, 0, -1, 1, 1, 1, 1, 1, 2, 2, 2]


def test_segmenter_rejects_bad_arguments():
    with pytest.raises(ValueError, match="valid: 'blank_line'"):
        segment_steps(["a"], [1], mode="lines")
    with pytest.raises(ValueError, match="2 token texts"):
        segment_steps(["a", "b"], [1])


class WordTokenizer:
    """Decodes each id to a fixed piece of text, like a real tokenizer's batch_decode of single ids."""

    pieces = ["<pad>", "Step", " 1", ":", " x", "\n", "\n\n", "y", "<tool>"]

    def batch_decode(self, ids, skip_special_tokens=False, clean_up_tokenization_spaces=False):
        return ["".join(self.pieces[i] for i in row) for row in ids]


def test_step_ids_for_batch_decodes_token_by_token(tiny):
    ids = torch.tensor([[4, 6, 7, 5, 8, 7, 0], [1, 2, 3, 5, 1, 2, 3]])
    mask = torch.tensor([[1, 1, 1, 1, 0, 1, 0], [1, 1, 1, 1, 1, 1, 1]])
    out = step_ids_for_batch(WordTokenizer(), ids, mask)
    assert out.dtype == torch.long and out.tolist() == [[0, 0, 1, 1, -1, 2, -1], [0, 0, 0, 0, 0, 0, 0]]
    assert step_ids_for_batch(WordTokenizer(), ids, mask, mode="numbered")[1].tolist() == [0, 0, 0, 0, 1, 1, 1]
    _, tok = tiny  # the real (character-level) tokenizer of the tiny test model
    text = "ab\n\ncd\n\ne"
    row = torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])
    assert step_ids_for_batch(tok, row, torch.ones_like(row)).tolist() == [segment_steps(list(text), [1] * len(text))]


def test_step_boundaries():
    step_ids = torch.tensor([[0, 0, 1, 1, -1, 2], [-1, 0, 0, -1, 0, -1], [-1, -1, -1, -1, -1, -1]])
    assert step_boundaries(step_ids) == [[0, 2, 5], [1], []]


# ----------------------------------------------------------------------------- process rewards


def test_process_hand_computed():
    # step 0 = tokens 0, 1 (score 1); step 1 = tokens 2, 4 across a tool output (score -0.5); outcome 1
    x = make([1], [[1, 1, 1, 0, 1]], step_ids=[[0, 0, 1, -1, 1]], step_scores=[[1.0, -0.5]])
    run = lambda **kw: assign_credit("process", x, **kw).advantages  # noqa: E731
    assert close(run(outcome="none"), [[0.5, 0.5, -0.25, 0, -0.25]])  # spread evenly: 1/2, -0.5/2
    assert close(run(outcome="none", spread="full"), [[1, 1, -0.5, 0, -0.5]])
    assert close(run(), [[1.5, 1.5, 0.75, 0, 0.75]])  # + the outcome R = 1 on every token
    # cumulative: token t gets the steps ending at or after it: 1 + (-0.5) for step 0's tokens
    assert close(run(outcome="none", spread="full", cumulative=True), [[0.5, 0.5, -0.5, 0, -0.5]])


def test_process_group_normalised_grpo_process_supervision():
    # one group, step scores {1, 0} and {1, NaN}: mean 2/3, unbiased std sqrt(((1/3)^2 * 2 + (2/3)^2) / 2)
    # = sqrt(1/3); normalised 1 -> 1/sqrt(3), 0 -> -2/sqrt(3). Row 0: steps at tokens 0 and 1 -> cumulative
    # (1 - 2) / sqrt(3), -2/sqrt(3); row 1: one step over both tokens -> 1/sqrt(3) each
    x = make([1, 0], [[1, 1], [1, 1]], step_ids=[[0, 1], [0, 0]], step_scores=[[1.0, 0.0], [1.0, NAN]])
    a = assign_credit("process", x, spread="full", normalize="group", cumulative=True, outcome="none", eps=0.0)
    r3 = math.sqrt(3)
    assert close(a.advantages, [[-1 / r3, -2 / r3], [1 / r3, 1 / r3]])
    # outcome "add" with group normalisation adds GRPO's outcome advantage (1 - 0.5) / sqrt(1/2) = +-0.7071
    b = assign_credit("process", x, spread="full", normalize="group", cumulative=True, eps=0.0)
    assert close(b.advantages - a.advantages, [[0.5 / math.sqrt(0.5)] * 2, [-0.5 / math.sqrt(0.5)] * 2])


def slow_process(x, spread, outcome, normalize, cumulative, eps=1e-6):
    N, S = x.step_scores.shape
    scores = [[None if math.isnan(v) else v for v in row] for row in x.step_scores.tolist()]
    groups = x.group_ids.tolist()
    if normalize == "group":
        for g in set(groups):
            pool = [v for i in range(N) if groups[i] == g for v in scores[i] if v is not None]
            mean = sum(pool) / max(1, len(pool))
            std = math.sqrt(sum((v - mean) ** 2 for v in pool) / max(1, len(pool) - 1))
            for i in (i for i in range(N) if groups[i] == g):
                scores[i] = [None if v is None else (v - mean) / (std + eps) for v in scores[i]]
    R = (x.scores + (x.token_rewards * x.response_mask).sum(-1)).tolist()
    Rs = [R[i] - sum(R[j] for j in range(N) if groups[j] == groups[i]) / groups.count(groups[i]) for i in range(N)]
    stds = [math.sqrt(sum(Rs[j] ** 2 for j in range(N) if groups[j] == groups[i]) / max(1, groups.count(groups[i]) - 1))
            for i in range(N)]
    ref = torch.zeros_like(x.values)
    for i in range(N):
        pos, (ids,) = chosen_lists(x, i, "step_ids")
        value = {}
        for s in set(s for s in ids if s >= 0):
            p = scores[i][s] or 0.0
            value[s] = p / ids.count(s) if spread == "even" else p
        last = {s: max(j for j, s2 in zip(pos, ids) if s2 == s) for s in value}
        for j, s in zip(pos, ids):
            if cumulative:
                a = sum(v for s2, v in value.items() if last[s2] >= j)
            else:
                a = value.get(s, 0.0)
            if outcome == "add":
                a += Rs[i] / (stds[i] + eps) if normalize == "group" else R[i]
            ref[i, j] = a
    return ref


@pytest.mark.parametrize("spread,outcome,normalize,cumulative",
                         list(itertools.product(["even", "full"], ["add", "none"], ["none", "group"], [False, True])))
def test_process_matches_slow_loop(spread, outcome, normalize, cumulative):
    x = random_inputs(10)
    a = assign_credit("process", x, spread=spread, outcome=outcome, normalize=normalize, cumulative=cumulative)
    assert close(a.advantages, slow_process(x, spread, outcome, normalize, cumulative))


def test_process_rejects_bad_steps_and_options():
    x = make([1], [[1, 1]], step_ids=[[0, 2]], step_scores=[[1.0, 1.0]])
    with pytest.raises(ValueError, match="step_scores has S=2"):
        assign_credit("process", x)
    with pytest.raises(ValueError, match="spread='mean'; valid: 'even', 'full'"):
        assign_credit("process", make([1], [[1]], step_ids=[[0]], step_scores=[[1.0]]), spread="mean")
    with pytest.raises(ValueError, match=r"step_scores is \(3, 2\), expected \[N, S\] with N=1"):
        make([1], [[1]], step_scores=[[1.0, 1.0]] * 3)


# ----------------------------------------------------------------------------- VinePPO


def test_vineppo_hand_computed():
    # steps 0 (tokens 0, 1), 1 (token 2), tool output, 2 (tokens 4, 5); V(before) read at each step's first token:
    # 0.5, 0.7, 0.4 (the 9s are not read); outcome 1 -> step advantages 0.7-0.5, 0.4-0.7, 1-0.4
    mask, steps = [[1, 1, 1, 0, 1, 1]], [[0, 0, 1, -1, 2, 2]]
    x = make([1], mask, step_ids=steps, values=[[0.5, 9, 0.7, 9, 0.4, 9]])
    assert close(assign_credit("vineppo", x).advantages, [[0.2, 0.2, -0.3, 0, 0.6, 0.6]])
    # token rewards -0.1 each: plus the rewards from t to the end of its step
    x = make([1], mask, step_ids=steps, values=[[0.5, 9, 0.7, 9, 0.4, 9]], token_rewards=[[-0.1] * 6])
    assert close(assign_credit("vineppo", x).advantages, [[0.0, 0.1, -0.4, 0, 0.4, 0.5]])


def test_vineppo_matches_slow_loop():
    x = random_inputs(11)
    ref = torch.zeros_like(x.values)
    for i in range(x.scores.shape[0]):
        pos, (ids, v, r) = chosen_lists(x, i, "step_ids", "values", "token_rewards")
        runs = []  # [(step id, [(position, reward)], V before)] over chosen tokens that are in a step
        for j, s, vj, rj in zip(pos, ids, v, r):
            if s < 0:
                continue
            if not runs or runs[-1][0] != s:
                runs.append((s, [], vj))
            runs[-1][1].append((j, rj))
        for k, (_, tokens, v_before) in enumerate(runs):
            v_after = runs[k + 1][2] if k + 1 < len(runs) else x.scores[i].item()
            for m, (j, _) in enumerate(tokens):
                ref[i, j] = sum(rj for _, rj in tokens[m:]) + v_after - v_before
    assert close(assign_credit("vineppo", x).advantages, ref)


def test_segmenter_feeds_the_step_estimators():
    tokens = ["a", "\n\n", "b", "<tool>", "c", "\n\n", "d"]
    mask = [1, 1, 1, 0, 1, 1, 1]
    step_ids = t([segment_steps(tokens, mask)], torch.long)  # [[0, 0, 1, -1, 2, 2, 3]]
    assert step_boundaries(step_ids) == [[0, 2, 4, 6]]
    x = CreditInputs(t([1.0]), t([mask]), t([0], torch.long), step_ids=step_ids, step_scores=t([[1.0, 0.0, 1.0, 0.0]]),
                     values=t([[0.2, 0, 0.4, 0, 0.6, 0, 0.8]]))
    assert close(assign_credit("process", x, spread="full", outcome="none").advantages, [[1, 1, 0, 0, 1, 1, 0]])
    assert close(assign_credit("vineppo", x).advantages, [[0.2, 0.2, 0.2, 0, 0.2, 0.2, 0.2]])
