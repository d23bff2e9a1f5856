"""Process rewards: a score for each reasoning step of a completion, for the `process` credit estimator.

Outcome supervision scores the final answer; process supervision scores every step (Uesato et al. 2022, "Solving
math word problems with process- and outcome-based feedback"; Lightman et al. 2023, "Let's Verify Step by Step",
whose PRM800K labels are human step ratings; Wang et al. 2024, Math-Shepherd, whose labels are Monte-Carlo
completion rates, built by `llmrl.train.prm.build_step_labels`). One registry, one signature:

    fn(completions: list[str], step_texts: list[list[str]], examples: list[Example], **options) -> list[list[float]]

one score per step of each completion, NaN = that step is not scored (the estimator counts it as 0). Steps come
from the segmenter (`llmrl.credit.step_ids_for_batch`) and `step_texts` turns its step ids into text:

    texts = step_texts(tokenizer, rollout.response_ids, step_ids)                       # [N][S_i] str
    step_scores, failures = score_steps("equations", rollout.completions, texts, rollout.examples, {})  # [N, S]

Built-ins: `equations` (a rule: the arithmetic a step states is true), `step_judge` (an LLM judge per step) and
`prm` (a trained process reward model, `llmrl prm`). `score_steps` contains failures as `llmrl.rewards.score` does.
"""

from __future__ import annotations

import logging
import math
import numbers
import re

import torch

from llmrl.data.tasks import Example
from llmrl.registry import Registry
from llmrl.rewards.learned import _judge_model, _prm_model, parse_score, prm_step_scores
from llmrl.rewards.score import RewardTimeout, _time_limit

log = logging.getLogger("llmrl.rewards")

STEP_REWARDS = Registry("step reward")
NAN = float("nan")


# ----------------------------------------------------------------------------- steps as text and as a tensor

def step_texts(tokenizer, response_ids: torch.Tensor, step_ids: torch.Tensor) -> list[list[str]]:
    """response_ids [N, T], step_ids [N, T] -> texts[i][s]: the decoded tokens of row i whose step id is s.

    Steps are in order of id (0, 1, ..., as `step_ids_for_batch` numbers them); a token with id -1 (padding, a tool
    output) belongs to no step; an id missing from a row would give ''. Special tokens are dropped, as in the
    decoded completions, so the steps of a row without holes join into its completion.
    """
    if response_ids.shape != step_ids.shape:
        raise ValueError(f"response_ids {tuple(response_ids.shape)} and step_ids {tuple(step_ids.shape)} differ")
    out = []
    for ids, steps in zip(response_ids.tolist(), step_ids.tolist()):
        tokens: list[list[int]] = [[] for _ in range(max(steps, default=-1) + 1)]
        for token, s in zip(ids, steps):
            if s >= 0:
                tokens[s].append(token)
        out.append(tokenizer.batch_decode(tokens, skip_special_tokens=True, clean_up_tokenization_spaces=False)
                   if tokens else [])
    return out


def step_scores_tensor(scores: list[list[float]], num_steps: int | None = None) -> torch.Tensor:
    """Ragged per-step scores -> [N, S] float32, NaN where a row has no such step; S = num_steps or the longest row."""
    S = max((len(row) for row in scores), default=0) if num_steps is None else num_steps
    out = torch.full((len(scores), S), NAN)
    for i, row in enumerate(scores):
        if len(row) > S:
            raise ValueError(f"row {i} has {len(row)} step scores but num_steps={S}")
        out[i, :len(row)] = torch.tensor(row, dtype=torch.float32)
    return out


# ----------------------------------------------------------------------------- contained scoring

def _clean(values, texts: list[list[str]]) -> tuple[list[list[float]], list[str]]:
    """`values` as one float (or NaN) per step, and a description of each step set to NaN because of a fault."""
    n_steps = sum(map(len, texts))
    if isinstance(values, torch.Tensor):
        values = values.tolist()
    try:
        values = list(values)
    except TypeError:
        return [[NAN] * len(t) for t in texts], [f"returned {type(values).__name__}, not a list"] * n_steps
    if len(values) != len(texts):
        return [[NAN] * len(t) for t in texts], [f"returned {len(values)} rows for {len(texts)} completions"] * n_steps
    rows, errors = [], []
    for row, t in zip(values, texts):
        try:
            row = row.tolist() if isinstance(row, torch.Tensor) else list(row)
        except TypeError:
            row = None
        if row is None or len(row) != len(t):
            rows.append([NAN] * len(t))
            errors += [f"returned {row!r} for {len(t)} steps"] * len(t)
            continue
        clean = []
        for v in row:
            v = v.item() if isinstance(v, torch.Tensor) and v.numel() == 1 else v
            ok = isinstance(v, numbers.Real) and (math.isfinite(v) or math.isnan(v))    # NaN = not scored: fine
            clean.append(float(v) if ok else NAN)
            errors += [] if ok else [f"returned {v!r}"]
        rows.append(clean)
    return rows, errors


def _run(fn, completions, texts, examples, options, timeout_s) -> tuple[list[list[float]], list[str]]:
    """The batch in one call; if it raises, one completion at a time, so only the failing ones lose their scores."""
    try:
        with _time_limit(timeout_s):
            return _clean(fn(completions, texts, examples, **options), texts)
    except RewardTimeout as e:
        return [[NAN] * len(t) for t in texts], [f"timed out: {e}"] * sum(map(len, texts))
    except Exception:
        pass
    rows, errors = [], []
    for c, t, ex in zip(completions, texts, examples):
        try:
            with _time_limit(timeout_s):
                row, row_errors = _clean(fn([c], [t], [ex], **options), [t])
        except Exception as e:
            row, row_errors = [[NAN] * len(t)], [f"raised {type(e).__name__}: {e}"] * len(t)
        rows += row
        errors += row_errors
    return rows, errors


def score_steps(name: str, completions: list[str], step_texts: list[list[str]], examples: list,
                options: dict | None = None, *, num_steps: int | None = None, timeout_s: float | None = 60.0
                ) -> tuple[torch.Tensor, int]:
    """(step_scores [N, S] float32 with NaN = not scored, failures): the step reward `name` on a batch.

    A fault never stops training: a function that raises is retried completion by completion; a wrong number of
    rows or of steps in a row, or a value that is not a real number (NaN is allowed), makes those steps NaN.
    `failures` counts the steps lost that way; a failing function is logged once per call, with its first error.
    """
    if not len(completions) == len(step_texts) == len(examples):
        raise ValueError(f"score_steps: {len(completions)} completions, {len(step_texts)} step lists and "
                         f"{len(examples)} examples")
    rows, errors = _run(STEP_REWARDS.get(name), completions, step_texts, examples, dict(options or {}), timeout_s)
    if errors:
        log.warning("step reward %r failed on %d of %d steps (not scored): %s", name, len(errors),
                    sum(map(len, step_texts)), errors[0])
    return step_scores_tensor(rows, num_steps), len(errors)


# ----------------------------------------------------------------------------- equations: a rule

_INT = r"-?\d+"
_EXPR = rf"{_INT}(?:[ \t]*[-+*×][ \t]*{_INT})*"
EQUATION = re.compile(rf"(?<![\w.]){_EXPR}(?:[ \t]*=[ \t]*{_EXPR})+")
_CONTINUES_BEFORE = re.compile(r"(?:[-+*/^×%][ \t]*|\d[.,])$")      # "(3+4)*2=14", "1.5+1=2.5": not read
_CONTINUES_AFTER = re.compile(r"[ \t]*[-+*/^×%(]|[.,]\d|\w")        # "2+2=4/2", "=4.5", "=4x": not read
_TERM = re.compile(rf"([-+*×]?)[ \t]*({_INT})")


def _evaluate(expr: str) -> int | None:
    """An expression of integers with + - * (usual precedence); None when a number is implausibly long."""
    total, product = 0, None
    for op, number in _TERM.findall(expr):
        if len(number) > 64:
            return None
        n = int(number)
        if op in ("*", "×"):
            product *= n
        else:
            total += product if product is not None else 0
            product = -n if op == "-" else n
    return total + product


def equation_truths(text: str) -> list[bool]:
    """Whether each integer equation stated in `text` holds (`12 + 34 = 46`, `3*4=12`, `2+2=4=4`).

    Equations inside a longer expression (parentheses, /, ^, decimals, variables before a minus) are not read.
    """
    out = []
    for m in EQUATION.finditer(text) if "=" in text else ():
        before, after, eq = text[:m.start()], text[m.end():], m.group()
        if _CONTINUES_BEFORE.search(before) or _CONTINUES_AFTER.match(after):
            continue
        if eq.startswith("-") and re.search(r"[\w)][ \t]*$", before):   # "x - 3 = 5": a binary minus, not a sign
            continue
        sides = [_evaluate(side) for side in eq.split("=")]
        if None not in sides:
            out.append(len(set(sides)) == 1)
    return out


@STEP_REWARDS.register("equations")
def equations(completions: list[str], step_texts: list[list[str]], examples: list[Example]) -> list[list[float]]:
    """1.0 for a step whose every arithmetic equation is true, 0.0 if any is false, NaN if it states none."""
    scores = []
    for steps in step_texts:
        truths = [equation_truths(s) for s in steps]
        scores.append([NAN if not t else float(all(t)) for t in truths])
    return scores


# ----------------------------------------------------------------------------- step_judge: an LLM judge per step

STEP_JUDGE_RUBRIC = (
    "You are grading one step of a solution.\nQuestion: {prompt}\nReference answer: {answer}\n"
    "Solution so far: {previous}\nNext step: {step}\n"
    "Is this step a correct step toward answering the question? Reply with a single score from 0 (wrong) to "
    "{scale} (correct)."
)


@STEP_REWARDS.register("step_judge")
def step_judge(completions: list[str], step_texts: list[list[str]], examples: list[Example], *,
               model: str = "smollm2-135m-instruct", rubric: str = STEP_JUDGE_RUBRIC, scale: float = 10.0,
               max_new_tokens: int = 8, temperature: float = 0.0, batch_size: int = 32,
               seed: int | None = None) -> list[list[float]]:
    """LLM-as-judge per step: the rubric filled with the question, reference answer, the steps before and the step;
    the parsed score / scale (`parse_score`; NaN when the reply has no number). Empty steps are not judged."""
    from llmrl.rollout.collect import collect_rollout

    judge_model, tokenizer = _judge_model(model)
    jobs = [(i, s, Example(rubric.format(prompt=ex.prompt, answer=ex.answer, previous="".join(steps[:s]), step=text,
                                         scale=int(scale)), ""))
            for i, (steps, ex) in enumerate(zip(step_texts, examples)) for s, text in enumerate(steps) if text.strip()]
    scores = [[NAN] * len(steps) for steps in step_texts]
    gen = None if seed is None else torch.Generator().manual_seed(seed)
    for start in range(0, len(jobs), batch_size):
        chunk = jobs[start:start + batch_size]
        r = collect_rollout(judge_model, tokenizer, [ex for _, _, ex in chunk], group_size=1,
                            max_new_tokens=max_new_tokens, temperature=temperature, generator=gen)
        for (i, s, _), reply in zip(chunk, r.completions):
            scores[i][s] = parse_score(reply, scale)
    return scores


# ----------------------------------------------------------------------------- prm: a trained process reward model

@STEP_REWARDS.register("prm")
def prm(completions: list[str], step_texts: list[list[str]], examples: list[Example], *, path: str,
        batch_size: int = 16, chat_template: bool = True, system_prompt: str | None = None) -> list[list[float]]:
    """P(step is good) from a process reward model (`llmrl prm`), read at each step's last token (Lightman et al.
    2023, sec. 2.6). chat_template / system_prompt must match how the PRM was trained."""
    model, tokenizer = _prm_model(path)
    return prm_step_scores(model, tokenizer, [ex.prompt for ex in examples], step_texts, batch_size=batch_size,
                           chat_template=chat_template, system_prompt=system_prompt)
