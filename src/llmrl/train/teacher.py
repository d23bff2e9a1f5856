"""The teacher of on-policy distillation (config section `teacher`): loaded and checked once by `build`, read
once per step by the stage `teacher_logprobs` (train/stages.py), which fills the per-token teacher term of the
rewards (`credit/teacher_kl.py`: -coef * (log pi - log pi_teacher) of each sampled token).

    teacher.source=checkpoint   any local model with the student's tokenizer (refused otherwise, at setup)
    teacher.source=self         the student itself, reading the prompt with teacher.hint appended (the reference
                                answer or a worked answer): self-distillation with only the bundled model
    teacher.estimator=sampled   the term is a per-token reward of each sampled token, through credit (default)
    teacher.estimator=exact     the term is the exact KL(pi || pi_teacher) over the vocabulary at each response
                                position, a loss term beside the policy gradient (the update reads
                                rollout.teacher_logp_all [N, T, V]; credit/teacher_kl.py `exact_token_kl`)

The teacher's log-probs of the student's tokens come from the same packed no-grad forward as the reference's
(`compute/batches.batched_logprobs`); with self-distillation the rows' prompts are first swapped for the hinted
ones (the response columns, tool outputs included, stay as sampled).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from llmrl.compute.batches import batched_full_logprobs, batched_logprobs
from llmrl.credit.teacher_kl import teacher_token_rewards
from llmrl.data.sft import worked_answer
from llmrl.models import load_model
from llmrl.rollout.collect import encode_prompt
from llmrl.rollout.sampler import left_pad


@dataclass
class Teacher:
    model: Any                 # a frozen causal LM, or None: the student itself (self-distillation)
    hint: str | None           # self-distillation: appended to each user prompt ({answer}, {demonstration})
    coef: float
    exact: bool = False        # teacher.estimator=exact: the full KL over the vocabulary as a loss term (GKD)


def check_same_tokenizer(student, teacher, where: str) -> None:
    """Refuse a teacher whose tokenizer is not the student's: its log-probs would be of other tokens."""
    diffs = []
    if len(student) != len(teacher):
        diffs.append(f"vocabulary size {len(teacher)} vs the student's {len(student)}")
    elif student.get_vocab() != teacher.get_vocab():
        n = sum(student.get_vocab().get(t) != i for t, i in teacher.get_vocab().items())
        diffs.append(f"{n} tokens map to other ids")
    for name in ("eos_token_id", "bos_token_id"):
        if getattr(student, name, None) != getattr(teacher, name, None):
            diffs.append(f"{name} {getattr(teacher, name, None)} vs the student's {getattr(student, name, None)}")
    if diffs:
        raise ValueError(f"teacher {where} does not share the student's tokenizer ({'; '.join(diffs)}); "
                         "on-policy distillation scores the student's own tokens, so the teacher must use the same "
                         "tokenizer, or use teacher.source=self")


def make_teacher(cfg, tokenizer) -> Teacher | None:
    """The config's teacher (None without a `teacher` section): a checkpoint, loaded frozen and checked."""
    t = cfg.teacher
    if t is None:
        return None
    if t.source == "self":
        return Teacher(None, t.hint, t.coef, t.estimator == "exact")
    model, teacher_tok = load_model(t.path, dtype=getattr(torch, cfg.model.dtype))
    check_same_tokenizer(tokenizer, teacher_tok, repr(t.path))
    model.config.use_cache = False
    model.eval().requires_grad_(False)
    return Teacher(model, None, t.coef, t.estimator == "exact")


def hinted_prompt(ex, hint: str) -> str:
    """The user prompt the self-distillation teacher reads: the prompt, then the hint with the answer filled in."""
    return ex.prompt + hint.format(answer=ex.answer, demonstration=worked_answer(ex))


def with_prompts(rollout, prompts: list[list[int]], pad_id: int):
    """The rollout with each row's prompt tokens replaced (left-padded), its response columns unchanged."""
    ids, mask = left_pad(prompts, pad_id)                                            # [N, P']
    P = rollout.prompt_len
    return rollout.with_(input_ids=torch.cat([ids, rollout.input_ids[:, P:]], 1),
                         attention_mask=torch.cat([mask, rollout.attention_mask[:, P:]], 1))


def teacher_logprobs(r, rollout):
    """log pi_teacher of the sampled tokens [N, T] and the teacher term of the per-token rewards, in
    rollout.extras ("logp_teacher", "teacher_rewards"); metrics: the teacher's mean per-sequence k1 KL estimate."""
    teacher: Teacher = r.teacher
    rows = rollout
    if teacher.hint is not None:
        kw = r.prompt_kw
        prompts = [encode_prompt(r.tokenizer, hinted_prompt(ex, teacher.hint), chat_template=kw["chat_template"],
                                 system_prompt=kw["system_prompt"]) for ex in rollout.examples]
        rows = with_prompts(rollout, prompts, r.tokenizer.pad_token_id)
    model = teacher.model if teacher.model is not None else r.model
    if teacher.exact:       # the whole distribution for the loss term; the sampled tokens' log-probs read from it
        logp_all = batched_full_logprobs(model, rows, r.ex)                                    # [N, T, V]
        logp_teacher = logp_all.gather(-1, rollout.response_ids[..., None])[..., 0] * rollout.response_mask
    else:
        logp_teacher = batched_logprobs(model, rows, r.ex)                                      # [N, T]
    shown = teacher_token_rewards(rollout.logp_old, logp_teacher, rollout.response_mask, teacher.coef)
    # exact: the teacher's term is in the loss (train/update.py) and adds no reward; the report still shows the
    # sampled term under each token, the one-sample estimate of what the loss term measures
    rewards = torch.zeros_like(shown) if teacher.exact else shown
    kl = ((rollout.logp_old - logp_teacher) * rollout.response_mask).sum(-1)         # [N] sampled k1 per sequence
    extras = {"logp_teacher": logp_teacher, "teacher_rewards": rewards, "teacher_shown": shown}
    rollout = rollout.with_(extras={**rollout.extras, **extras})
    if teacher.exact:
        rollout = rollout.with_(teacher_logp_all=logp_all)
    return rollout, {"teacher_kl_per_seq": float(kl.mean())}


def token_rewards(rollout, kl_rewards: torch.Tensor | None) -> torch.Tensor | None:
    """The per-token rewards credit reads: the KL penalty's (or None) plus the teacher's term when there is one."""
    teacher = rollout.extras.get("teacher_rewards")
    if teacher is None:
        return kl_rewards
    return teacher if kl_rewards is None else kl_rewards + teacher
