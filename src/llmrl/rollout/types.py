"""The `Rollout`: one batch of sampled episodes, as tensors every later stage reads.

Notation (used in every shape comment of the package):
    B  prompts in the batch
    G  samples per prompt (the group)
    N  = B * G sequences
    P  prompt tokens (left-padded to the longest prompt)
    T  response tokens (right-padded to the longest response)

Token layout of one row of `input_ids` ([N, P + T]):

    [pad pad p0 p1 p2 | r0 r1 r2 r3 pad pad]
     <--- prompt P ---> <---- response T ---->

`attention_mask` marks tokens that exist (prompt, sampled tokens, tool outputs); `response_mask` marks
the response tokens the *policy chose* — 0 for padding and for tool observations — and is the mask
every loss and advantage uses.

A multi-turn episode (`rollout/episodes.py`) also leaves an `Episode` record on each row's example, at
`example.meta["episode"]` (read it with `episode_of`): that is how reward functions, which see text and
examples only, learn how many tool calls a row made and which text is its final answer.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import torch


@dataclass(frozen=True)
class Episode:
    """How one multi-turn row went (the same numbers are in `Rollout.extras` as [N] tensors)."""
    tool_calls: int           # calls the model made (unknown, malformed and turn-limit-cut calls included)
    turns: int                # model turns (generate calls) the row took
    tool_errors: int          # calls whose output starts with "error:"
    answer: str | None        # text of the final turn when it made no call (the answer); None: it ended on a call
    reward: float | None = None   # an environment episode (llmrl/envs): the environment's own reward
    error: str | None = None      # an environment episode that failed (raised, hung, malformed): why; it scores 0


def episode_of(example) -> Episode | None:
    """The `Episode` a multi-turn rollout attached to a row's example, or None (single-turn)."""
    meta = getattr(example, "meta", None)
    return meta.get("episode") if isinstance(meta, dict) else None


@dataclass(frozen=True)
class Rollout:
    input_ids: torch.Tensor          # [N, P+T] long
    attention_mask: torch.Tensor     # [N, P+T] long, 1 = a real token (prompt, response or tool output)
    response_mask: torch.Tensor      # [N, T] float, 1 = a token the policy chose
    logp_old: torch.Tensor           # [N, T] float, log-prob under the sampling policy (0 where masked)
    group_ids: torch.Tensor          # [N] long, which prompt each sequence answers
    completions: list[str]           # N decoded responses
    examples: list[Any]              # N task examples (the prompt's example, repeated G times)
    logp_ref: torch.Tensor | None = None   # [N, T] float, log-prob under the frozen reference
    values: torch.Tensor | None = None     # [N, T] float, critic values
    step_ids: torch.Tensor | None = None   # [N, T] long, which reasoning step each token is in (-1: none)
    is_weight: torch.Tensor | None = None  # [N, T] float, truncated IS weight pi_old / mu when another engine sampled
    step_scores: torch.Tensor | None = None  # [N, S] float, a score per reasoning step (NaN: no such step)
    teacher_logp_all: torch.Tensor | None = None  # [N, T, V] float, log pi_teacher over the vocabulary
                                                  # (teacher.estimator=exact: train/teacher.py)
    extras: dict = field(default_factory=dict)  # anything else a stage wants to carry (not tensors the math reads)

    @property
    def prompt_len(self) -> int:
        return self.input_ids.shape[1] - self.response_mask.shape[1]

    @property
    def response_ids(self) -> torch.Tensor:  # [N, T]
        return self.input_ids[:, self.prompt_len:]

    @property
    def response_lengths(self) -> torch.Tensor:  # [N]
        return self.response_mask.sum(-1)

    def with_(self, **changes) -> "Rollout":
        """A copy with some fields replaced; stages never mutate a Rollout in place."""
        return replace(self, **changes)

    def to(self, device: torch.device | str) -> "Rollout":
        """The same rollout with every tensor (the extras' too) on `device` (itself when they all are already)."""
        move = lambda x: x.to(device) if isinstance(x, torch.Tensor) else x  # noqa: E731
        tensors = {f: move(getattr(self, f)) for f in ("input_ids", "attention_mask", "response_mask", "logp_old",
                                                       "group_ids", "logp_ref", "values", "step_ids", "is_weight",
                                                       "step_scores", "teacher_logp_all")}
        return replace(self, **tensors, extras={k: move(v) for k, v in self.extras.items()})

    def select(self, idx: torch.Tensor) -> "Rollout":
        """Rows `idx` (a micro-batch), with every per-sequence field sliced alike."""
        rows = idx.tolist()

        def pick(x):
            return None if x is None else x[idx]

        return replace(
            self,
            input_ids=self.input_ids[idx], attention_mask=self.attention_mask[idx],
            response_mask=self.response_mask[idx], logp_old=self.logp_old[idx], group_ids=self.group_ids[idx],
            completions=[self.completions[i] for i in rows], examples=[self.examples[i] for i in rows],
            logp_ref=pick(self.logp_ref), values=pick(self.values), step_ids=pick(self.step_ids),
            is_weight=pick(self.is_weight), step_scores=pick(self.step_scores),
            teacher_logp_all=pick(self.teacher_logp_all),
        )


def concat_rollouts(parts: list[Rollout], pad_id: int) -> Rollout:
    """One rollout of the rows of `parts`, in order: prompts left-padded to the longest prompt (P), responses
    right-padded to the longest response (T), group ids renumbered so groups of different parts never merge.
    Only freshly sampled rollouts (before the stages fill logp_ref, values, ...); `extras` of [N] tensors are
    concatenated."""
    if len(parts) == 1:
        return parts[0]
    for p in parts:
        if any(x is not None for x in (p.logp_ref, p.values, p.step_ids, p.is_weight, p.step_scores)):
            raise ValueError("concat_rollouts joins freshly sampled rollouts only (before the stages run)")
    P = max(p.prompt_len for p in parts)
    T = max(p.response_mask.shape[1] for p in parts)

    def pad(x, left, right, value):   # [n, L] -> [n, left + L + right]
        return torch.nn.functional.pad(x, (left, right), value=value)

    ids, att, resp, logp, groups, offset = [], [], [], [], [], 0
    for p in parts:
        dp, dt = P - p.prompt_len, T - p.response_mask.shape[1]
        ids.append(pad(p.input_ids, dp, dt, pad_id))
        att.append(pad(p.attention_mask, dp, dt, 0))
        resp.append(pad(p.response_mask, 0, dt, 0))
        logp.append(pad(p.logp_old, 0, dt, 0))
        groups.append(p.group_ids + offset)
        offset += int(p.group_ids.max()) + 1 if len(p.group_ids) else 0
    keys = set(parts[0].extras)
    if any(set(p.extras) != keys for p in parts):
        raise ValueError("concat_rollouts: the parts carry different extras")
    return Rollout(
        input_ids=torch.cat(ids), attention_mask=torch.cat(att), response_mask=torch.cat(resp),
        logp_old=torch.cat(logp), group_ids=torch.cat(groups),
        completions=[c for p in parts for c in p.completions], examples=[e for p in parts for e in p.examples],
        extras={k: torch.cat([p.extras[k] for p in parts]) for k in keys})
