"""The optimisation phase of one RL step, in three parts: minibatch planning (`plan_minibatches`: epochs over
shuffled minibatches of the rollout), gradient accumulation (`accumulate`: a minibatch split into micro-batches
whose gradients add up) and the optimizer step (`optimizer_step`: clip, step, free the gradients), for the policy
and, when there is one, the critic trained beside it (`CriticTraining`).

Micro-batching never changes the loss: every aggregation divides by counts of the whole minibatch
(`BatchCounts`), so the sum of micro-batch losses equals the minibatch loss.

Under torchrun (`distributed/runtime.py`, `distributed/parallel.py`) each rank holds its rows of the global batch
and `model` is the wrapped policy: the minibatch split is drawn once (rank 0) over the global rows, the counts are
the global minibatch's, and the wrapper's gradient sync sums the ranks' gradients, so the step equals the
single-process step on the global batch. In one process all of this is the identity.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Callable, Iterator

import torch

from llmrl.compute.batches import batched_logprobs, micro_batches_of, trim
from llmrl.compute.logprobs import policy_logprobs, response_logprobs
from llmrl.compute.settings import Execution
from llmrl.credit.teacher_kl import exact_token_kl
from llmrl.distributed import runtime as D
from llmrl.distributed.parallel import average_gradients, grad_sync, loss_scale
from llmrl.objectives.mismatch import Correction, mismatch_stats
from llmrl.objectives.policy import BatchCounts, ObjectiveOutput, aggregate


@dataclass(frozen=True)
class Passes:
    """How often the update goes over the rollout, and how far each optimizer step may go."""
    epochs: int = 1
    minibatches: int = 1
    max_grad_norm: float = 1.0
    early_stop_kl: float | None = None    # stop once a minibatch's approx KL(old || new) exceeds this

    @property
    def on_policy(self) -> bool:          # one pass: the old policy is the current one
        return self.epochs == 1 and self.minibatches == 1


@dataclass
class CriticTraining:
    """A critic trained alongside the policy on `returns` [N, T] with `objective` (a clipped value loss)."""
    critic: torch.nn.Module
    optimizer: torch.optim.Optimizer
    objective: Callable[..., ObjectiveOutput]
    returns: torch.Tensor | None = None


# ----------------------------------------------------------------------------- 1. minibatch planning


def plan_minibatches(N: int, passes: Passes, generator: torch.Generator | None) -> Iterator[tuple[torch.Tensor, int]]:
    """(this rank's rows of the minibatch [n], the global minibatch's row count) for each minibatch of each epoch.
    One split of the global rows, drawn by rank 0; lazy, so an early stop draws no further permutation."""
    W, offset = D.world(), D.rank() * N       # this rank holds global rows offset .. offset + N
    for _ in range(passes.epochs):
        order = (torch.randperm(N * W, generator=generator, device="cpu") if passes.minibatches > 1
                 else torch.arange(N * W, device="cpu"))       # row indices: host tensors, as are all of them
        for mb in D.broadcast_from_main(order).chunk(passes.minibatches):
            yield mb[(mb >= offset) & (mb < offset + N)] - offset, len(mb)


# ----------------------------------------------------------------------------- 2. gradient accumulation


def accumulate(model, rollout, rows: torch.Tensor, advantages: torch.Tensor, objective, counts: BatchCounts,
               ex: Execution, *, logp_old: torch.Tensor | None, critic: CriticTraining | None,
               engine_correction: Correction | None, chosen: list,
               teacher_coef: float = 0.0) -> tuple[dict[str, float], int]:
    """Forward and backward over `rows` micro-batch by micro-batch; gradients add up in the parameters. Returns
    (each named loss and metric summed over the micro-batches, the number of passes). Every rank runs as many
    passes: a rank short of rows runs row 0 with weight 0. `engine_correction`: pi_old is this forward's own
    log-probs and the rollout's logp_old is the sampling engine's; the correction's weight comes from both (a
    micro-batch holds whole rows, so sequence-level corrections see whole sequences), and the pairs go to
    `chosen` for the mismatch statistics. `teacher_coef` > 0 with `rollout.teacher_logp_all`: the loss gains
    teacher_coef * the exact KL(pi || pi_teacher) over the vocabulary, token-mean over the chosen tokens
    (`teacher_term`)."""
    sums: dict[str, float] = defaultdict(float)
    micro = micro_batches_of(rows, rollout, ex) if len(rows) else []
    n_micro = D.all_max(len(micro))
    for i in range(n_micro):
        idx, weight = (micro[i], 1.0) if i < len(micro) else (torch.tensor([0], device="cpu"), 0.0)
        part = trim(rollout.select(idx))
        T = part.response_mask.shape[1]
        dense = teacher_coef > 0 and part.teacher_logp_all is not None
        with ex.autocast():
            logp, entropy, *logp_all = policy_logprobs(model, part.input_ids, part.attention_mask, T,
                                                       temperature=ex.temperature, pack_tokens=ex.pack_tokens,
                                                       chunk=ex.head_chunk, full=dense)
        logp, entropy = logp.float(), entropy.float()
        is_weight = part.is_weight
        if engine_correction is not None:
            is_weight = engine_correction(logp.detach(), part.logp_old, part.response_mask)
            picked = part.response_mask.bool()
            chosen.append((logp.detach()[picked], part.logp_old[picked]))
        out = objective(logp, logp.detach() if logp_old is None else logp_old[idx, :T],
                        advantages[idx, :T], part.response_mask, counts, logp_ref=part.logp_ref,
                        entropy=entropy, is_weight=is_weight)
        loss, named = out.total, {**out.losses, **out.metrics}
        if dense:
            term = teacher_term(logp_all[0], part, counts, teacher_coef)
            loss, named = loss + term["loss_teacher_kl"], {**named, **term}
        if critic is not None:
            with ex.autocast():
                values = critic.critic(part.input_ids, part.attention_mask, T)
            vout = critic.objective(values, part.values, critic.returns[idx, :T], part.response_mask, counts)
            loss, named = loss + vout.total, {**named, **vout.losses, **vout.metrics}
        with grad_sync(model, sync=i == n_micro - 1):   # DDP: all-reduce on the last pass only
            (loss * (weight * loss_scale())).backward()
        for k, v in named.items():   # each is this micro-batch's share of the minibatch value
            sums[k] += weight * float(v.detach())
    return sums, n_micro


def teacher_term(logp_all: torch.Tensor, part, counts: BatchCounts, coef: float) -> dict[str, torch.Tensor]:
    """coef * token-mean over the chosen tokens of the exact KL(pi || pi_teacher) at each position, from the
    student's log pi [M, V] at the micro-batch's real response positions and the teacher's [n, T, V]
    (`rollout.teacher_logp_all`) -> {"loss_teacher_kl": the loss share, "teacher_kl_exact": its KL, detached}."""
    T = part.response_mask.shape[1]
    real = part.attention_mask[:, -T:].bool()                                       # [n, T], M of them true
    kl = exact_token_kl(logp_all, part.teacher_logp_all[real])                      # [M]
    per_token = torch.zeros(real.shape, dtype=kl.dtype).masked_scatter(real, kl)    # [n, T]
    value = aggregate(per_token, part.response_mask, "token-mean", counts)
    return {"loss_teacher_kl": coef * value, "teacher_kl_exact": value.detach()}


# ----------------------------------------------------------------------------- 3. the optimizer step


def optimizer_step(model, optimizer: torch.optim.Optimizer, max_grad_norm: float,
                   critic: CriticTraining | None = None) -> float:
    """Clip and step the policy (and the critic); the gradients are freed right after, not held through the next
    rollout (513 MiB at 135M). Returns the policy's gradient norm before clipping."""
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
    optimizer.step()
    if critic is not None:
        average_gradients(critic.critic.parameters())
        torch.nn.utils.clip_grad_norm_(critic.critic.parameters(), max_grad_norm)
        critic.optimizer.step()
    zero_grads(optimizer, critic)
    return float(getattr(norm, "full_tensor", lambda: norm)())   # FSDP: a DTensor


def zero_grads(optimizer: torch.optim.Optimizer, critic: CriticTraining | None) -> None:
    optimizer.zero_grad(set_to_none=True)
    if critic is not None:
        critic.optimizer.zero_grad(set_to_none=True)


# ----------------------------------------------------------------------------- the update


def policy_update(model, optimizer: torch.optim.Optimizer, rollout, advantages: torch.Tensor,
                  objective: Callable[..., ObjectiveOutput], ex: Execution, passes: Passes = Passes(), *,
                  generator: torch.Generator | None = None, critic: CriticTraining | None = None,
                  skip_zero_advantage: bool = False, engine_correction: Correction | None = None,
                  teacher_coef: float = 0.0) -> dict[str, float]:
    """Run the update on `advantages` [N, T]; returns metrics averaged over the optimizer steps taken
    (`update_rows`: this rank's). `skip_zero_advantage`: rows with A = 0 everywhere add exactly zero gradient
    (no KL or entropy term, no critic) and are not computed.

    `engine_correction` (one on-policy pass only): the rollout's `logp_old` holds the log-probs of the engine that
    sampled it (vLLM), and each micro-batch's own forward supplies pi_old = logp.detach() and the correction's
    weight, e.g. token TIS min(pi_old / mu, cap) (objectives/mismatch.py), with no separate forward over the
    rollout first. The mismatch statistics are then over the rows the update computed.

    `teacher_coef` > 0 (teacher.estimator=exact): each micro-batch adds the exact distillation loss term
    (`teacher_term`); no row is skipped then, whatever its advantages."""
    if engine_correction is not None and not passes.on_policy:
        raise ValueError("engine_correction: the weight comes from the update's forward only with one on-policy "
                         "pass (epochs = minibatches = 1)")
    N = advantages.shape[0]                   # this rank's rows
    logp_old = None if passes.on_policy else batched_logprobs(model, rollout, ex)
    skip_zero = skip_zero_advantage and critic is None and not teacher_coef
    sums: dict[str, float] = defaultdict(float)
    chosen: list[tuple[torch.Tensor, torch.Tensor]] = []   # engine_correction: (logp_policy, logp_engine) chosen
    steps, stopped = 0, False
    for mb, num_seqs in plan_minibatches(N, passes, generator):
        counts = D.batch_counts(rollout.response_mask[mb], num_seqs, ex.max_len)
        if skip_zero:
            mb = mb[(advantages[mb] != 0).any(-1)]
        zero_grads(optimizer, critic)
        mb_sums, n_micro = accumulate(model, rollout, mb, advantages, objective, counts, ex, logp_old=logp_old,
                                      critic=critic, engine_correction=engine_correction, chosen=chosen,
                                      teacher_coef=teacher_coef)
        # token-mean metrics were divided by all the minibatch's tokens; rescale to the rows actually computed
        mb_sums["_active"] = float(rollout.response_mask[mb].sum()) if len(mb) else 0.0
        mb_sums = D.sum_values(mb_sums)                           # the global minibatch's values
        active = mb_sums.pop("_active")
        for k, v in mb_sums.items():
            sums[k] += v if k.startswith("loss_") or not active else v * counts.num_tokens / active
        if n_micro:
            sums["grad_norm"] += optimizer_step(model, optimizer, passes.max_grad_norm, critic)
        sums["update_rows"] += len(mb)
        steps += 1
        # the KL measured on this minibatch before its step: how far the earlier steps already moved the policy
        if passes.early_stop_kl is not None and mb_sums.get("approx_kl_old", 0.0) > passes.early_stop_kl:
            stopped = True
            break
    out = {k: v / max(1, steps) for k, v in sums.items()}
    out["update_passes"], out["early_stopped"] = float(steps), float(stopped)
    if chosen:            # (a step whose rows were all skipped measured no mismatch: no keys rather than zeros)
        policy, engine = (torch.cat(x) for x in zip(*chosen))
        out |= {k: float(v) for k, v in mismatch_stats(policy, engine, torch.ones_like(policy),
                                                         cap=engine_correction.cap).items()}
    return out


def critic_update(critic: CriticTraining, rollout, ex: Execution, max_grad_norm: float) -> dict[str, float]:
    """One optimizer step of the critic alone on its returns (used when the policy moves by TRPO)."""
    counts = BatchCounts.of(rollout.response_mask, ex.max_len)
    critic.optimizer.zero_grad(set_to_none=True)
    sums: dict[str, float] = defaultdict(float)
    for idx in micro_batches_of(torch.arange(critic.returns.shape[0], device="cpu"), rollout, ex):
        part = trim(rollout.select(idx))
        T = part.response_mask.shape[1]
        with ex.autocast():
            values = critic.critic(part.input_ids, part.attention_mask, T)
        out = critic.objective(values, part.values, critic.returns[idx, :T], part.response_mask, counts)
        out.total.backward()
        for k, v in {**out.losses, **out.metrics}.items():
            sums[k] += float(v.detach())
    torch.nn.utils.clip_grad_norm_(critic.critic.parameters(), max_grad_norm)
    critic.optimizer.step()
    critic.optimizer.zero_grad(set_to_none=True)      # dead from here, as in policy_update
    return dict(sums)


def trpo_update(model, rollout, advantages: torch.Tensor, *, max_kl: float, cg_iters: int, cg_damping: float,
                rows: int | None, ex: Execution, aggregation: str = "token-mean", constraint: str = "k3",
                generator: torch.Generator | None = None) -> dict[str, float]:
    """The policy moved by one TRPO step (objectives/trpo.py) on the surrogate r A aggregated by `aggregation`,
    under KL(old || new) <= max_kl estimated by the `constraint` estimator (objectives/kl.py; k3 is unbiased for
    KL(old || new) on samples of the old policy and never negative).

    Runs in fp32 without autocast (the line search compares values across forwards) and with the composite
    attention kernel, which differentiates twice. `rows` subsamples the sequences the step is computed on. The
    step's rows split into micro-batches by `ex` (optim.micro_batch_size, micro_batch_tokens) as the gradient
    update's do: with more than one, each Fisher-vector product is summed micro-batch by micro-batch, so memory is
    bounded by one micro-batch's double-backward graph instead of the whole batch's.
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from llmrl.objectives.kl import kl_estimate
    from llmrl.objectives.trpo import trpo_step

    N = advantages.shape[0]
    active = (advantages != 0).any(-1).nonzero()[:, 0]            # rows with A = 0 add nothing to the surrogate
    if rows is not None and len(active) > rows:
        active = active[torch.randperm(len(active), generator=generator, device="cpu")[:rows]]
    if len(active) == 0:
        return {"trpo_accepted": 0.0, "update_rows": 0.0}
    part = trim(rollout.select(active))
    counts = BatchCounts.of(part.response_mask)                   # the whole step's denominators, for every piece

    def closures(idx: torch.Tensor):
        """(surrogate, KL) of rows `idx` of `part`, each the piece's share of the whole step's aggregate."""
        piece = trim(part.select(idx))
        T = piece.response_mask.shape[1]
        A, mask = advantages[active[idx], :T], piece.response_mask
        w = piece.is_weight if piece.is_weight is not None else torch.ones_like(A)   # TIS weight of the engine

        def logp_now():
            return response_logprobs(model, piece.input_ids, piece.attention_mask, T, temperature=ex.temperature,
                                     with_entropy=False)[0].float()
        with torch.no_grad():
            logp_old = logp_now()
        return (lambda: aggregate(torch.exp(logp_now() - logp_old) * A * w, mask, aggregation, counts),
                lambda: aggregate(kl_estimate(logp_old, logp_now(), constraint), mask, aggregation, counts))

    was_training = model.training
    model.eval()
    try:
        with sdpa_kernel(SDPBackend.MATH):
            pieces = [closures(idx) for idx in micro_batches_of(torch.arange(len(active), device="cpu"), part, ex)]
            stats = trpo_step(
                model, [p for p in model.parameters() if p.requires_grad],
                lambda: sum(surrogate() for surrogate, _ in pieces), lambda: sum(kl() for _, kl in pieces),
                max_kl=max_kl, cg_iters=cg_iters, cg_damping=cg_damping,
                micro_batches=pieces if len(pieces) > 1 else None)
    finally:
        model.train(was_training)
    return ({f"trpo_{k}": float(v) for k, v in stats.items()}
            | {"update_rows": float(len(active)), "rollout_rows": float(N), "trpo_micro_batches": float(len(pieces))})
