"""The optimisation phase of one RL step: epochs over shuffled minibatches of the rollout, each minibatch
split into micro-batches whose gradients accumulate, then one clipped optimizer step (policy, and the
critic when there is one).

Micro-batching never changes the loss: every aggregation divides by counts of the whole minibatch
(`BatchCounts`), so the sum of micro-batch losses equals the minibatch loss.

Under torchrun (`train/distributed.py`, `train/parallel.py`) each rank holds its rows of the global batch and
`model` is the wrapped policy: the minibatch split is drawn once (rank 0) over the global rows, the counts are
the global minibatch's, and the wrapper's gradient sync sums the ranks' gradients, so the step equals the
single-process step on the global batch. In one process all of this is the identity.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Callable

import torch

from llmrl.objectives.logprobs import response_logprobs
from llmrl.objectives.mismatch import mismatch_stats, truncated_is_weight
from llmrl.objectives.policy import BatchCounts, ObjectiveOutput
from llmrl.rollout.types import Rollout
from llmrl.train import distributed as D
from llmrl.train.parallel import average_gradients, grad_sync, loss_scale, policy_logprobs


def trim(rollout: Rollout) -> Rollout:
    """Drop prompt columns that are padding in every row and response columns past the longest response."""
    T_used = int(rollout.response_mask.sum(0).nonzero().max()) + 1 if rollout.response_mask.any() else 1
    P = rollout.prompt_len
    first = int(rollout.attention_mask[:, :P].sum(0).nonzero().min()) if P else 0
    keep = lambda x: None if x is None else x[:, :T_used]  # noqa: E731
    return rollout.with_(
        input_ids=rollout.input_ids[:, first:P + T_used], attention_mask=rollout.attention_mask[:, first:P + T_used],
        response_mask=rollout.response_mask[:, :T_used], logp_old=rollout.logp_old[:, :T_used],
        logp_ref=keep(rollout.logp_ref), values=keep(rollout.values), step_ids=keep(rollout.step_ids),
        is_weight=keep(rollout.is_weight),
    )


def micro_batches(rows: torch.Tensor, rollout: Rollout, max_rows: int, max_tokens: int | None) -> list[torch.Tensor]:
    """Split `rows` [n] (in order) into micro-batches of at most `max_rows` rows whose trimmed forward,
    rows x (longest prompt + longest response), stays within `max_tokens` (None: no token bound). A row longer
    than `max_tokens` goes alone. Activation memory grows with those tokens, not with the row count: long
    multi-turn prompts need fewer rows per pass than short ones."""
    if max_tokens is None:
        return list(rows.split(max_rows))
    P = rollout.prompt_len
    prompt_len = rollout.attention_mask[rows, :P].sum(-1).tolist()     # [n] real prompt tokens
    resp_len = rollout.attention_mask[rows, P:].sum(-1).tolist()       # [n] response (and observation) tokens
    out, start, p_max, r_max = [], 0, 0, 0
    for i in range(len(rows)):
        p, r = max(p_max, prompt_len[i]), max(r_max, resp_len[i])
        if i > start and ((i - start + 1) * (p + r) > max_tokens or i - start == max_rows):
            out.append(rows[start:i])
            start, p, r = i, prompt_len[i], resp_len[i]
        p_max, r_max = p, r
    if len(rows):
        out.append(rows[start:])
    return out


def _amp(dtype):
    return torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None)


@torch.no_grad()
def batched_logprobs(model, rollout: Rollout, *, micro_batch_size: int, temperature: float, autocast_dtype,
                     pack_tokens: int | None = None, micro_batch_tokens: int | None = None) -> torch.Tensor:
    """logp [N, T] of every response under `model`, without gradient, micro-batch by micro-batch
    (padding-free in packs of at most `pack_tokens` tokens when given: objectives/packing.py)."""
    T = rollout.response_mask.shape[1]
    out = []
    for idx in micro_batches(torch.arange(len(rollout.completions)), rollout, micro_batch_size, micro_batch_tokens):
        r = trim(rollout.select(idx))
        with _amp(autocast_dtype):
            lp, _ = policy_logprobs(model, r.input_ids, r.attention_mask, r.response_mask.shape[1],
                                    temperature=temperature, with_entropy=False, pack_tokens=pack_tokens)
        out.append(torch.nn.functional.pad(lp.float(), (0, T - lp.shape[1])))
    return torch.cat(out) * rollout.response_mask


@torch.no_grad()
def batched_values(critic, rollout: Rollout, *, micro_batch_size: int, autocast_dtype,
                   micro_batch_tokens: int | None = None) -> torch.Tensor:
    """V(s_t) [N, T] of every response position under `critic`, without gradient."""
    T = rollout.response_mask.shape[1]
    out = []
    for idx in micro_batches(torch.arange(len(rollout.completions)), rollout, micro_batch_size, micro_batch_tokens):
        r = trim(rollout.select(idx))
        with _amp(autocast_dtype):
            v = critic(r.input_ids, r.attention_mask, r.response_mask.shape[1])
        out.append(torch.nn.functional.pad(v.float(), (0, T - v.shape[1])))
    return torch.cat(out) * rollout.response_mask


def policy_update(
    model,
    optimizer: torch.optim.Optimizer,
    rollout: Rollout,
    advantages: torch.Tensor,             # [N, T]
    objective: Callable[..., ObjectiveOutput],
    *,
    epochs: int,
    minibatches: int,
    micro_batch_size: int,
    max_grad_norm: float,
    temperature: float,
    autocast_dtype,
    max_len: int,
    zero_advantage_is_zero_loss: bool,
    generator: torch.Generator | None = None,
    critic=None,                          # a Critic trained alongside, on `returns`, with `value_objective`
    critic_optimizer: torch.optim.Optimizer | None = None,
    returns: torch.Tensor | None = None,  # [N, T]
    value_objective: Callable[..., ObjectiveOutput] | None = None,
    early_stop_kl: float | None = None,   # stop the epochs once a minibatch's approx KL(old || new) exceeds this
    pack_tokens: int | None = None,       # padding-free forward in packs of at most this many tokens (packing.py)
    micro_batch_tokens: int | None = None,   # at most this many (padded) tokens per forward/backward
    engine_tis_cap: float | None = None,  # rollout.logp_old is the sampling engine's: TIS weight from this forward
) -> dict[str, float]:
    """Run the update; returns metrics averaged over the optimizer steps taken (`update_rows`: this rank's).

    `engine_tis_cap` (one on-policy pass only): the rollout's `logp_old` holds the log-probs of the engine that
    sampled it (vLLM), and each micro-batch's own forward supplies pi_old = logp.detach() and the truncated IS
    weight min(pi_old / mu, cap) (objectives/mismatch.py), with no separate forward over the rollout first. The
    mismatch statistics are then over the rows the update computed."""
    N = advantages.shape[0]                   # this rank's rows; under torchrun rank r holds global rows r*N ..
    W, offset = D.world(), D.rank() * N
    sums: dict[str, float] = defaultdict(float)
    reuse_detached = epochs == 1 and minibatches == 1    # on-policy, one pass: old policy == current policy
    if engine_tis_cap is not None and not reuse_detached:
        raise ValueError("engine_tis_cap: the TIS weight comes from the update's forward only with one on-policy "
                         "pass (epochs = minibatches = 1)")
    chosen: list[tuple[torch.Tensor, torch.Tensor]] = []   # engine_tis_cap: (logp_policy, logp_engine) chosen
    logp_old = None if reuse_detached else batched_logprobs(
        model, rollout, micro_batch_size=micro_batch_size, temperature=temperature, autocast_dtype=autocast_dtype,
        pack_tokens=pack_tokens, micro_batch_tokens=micro_batch_tokens)
    skip_zero = zero_advantage_is_zero_loss and critic is None
    passes, stopped = 0, False
    for _ in range(epochs):
        if stopped:
            break
        order = torch.randperm(N * W, generator=generator) if minibatches > 1 else torch.arange(N * W)
        for mb in D.broadcast_from_main(order).chunk(minibatches):   # one split of the global rows, rank 0's
            if stopped:
                break
            num_seqs = len(mb)
            mb = mb[(mb >= offset) & (mb < offset + N)] - offset      # this rank's rows of the minibatch
            counts = D.batch_counts(rollout.response_mask[mb], num_seqs, max_len)
            if skip_zero:   # rows with A = 0 everywhere add exactly zero gradient: skip their compute
                mb = mb[(advantages[mb] != 0).any(-1)]
            optimizer.zero_grad(set_to_none=True)
            if critic_optimizer is not None:
                critic_optimizer.zero_grad(set_to_none=True)
            mb_sums: dict[str, float] = defaultdict(float)
            micro = micro_batches(mb, rollout, micro_batch_size, micro_batch_tokens) if len(mb) else []
            n_micro = D.all_max(len(micro))   # every rank runs as many passes: a rank short of rows runs row 0 × 0
            for i in range(n_micro):
                idx, weight = (micro[i], 1.0) if i < len(micro) else (torch.tensor([0]), 0.0)
                part = trim(rollout.select(idx))
                T = part.response_mask.shape[1]
                with _amp(autocast_dtype):
                    logp, entropy = policy_logprobs(model, part.input_ids, part.attention_mask, T,
                                                    temperature=temperature, pack_tokens=pack_tokens)
                logp, entropy = logp.float(), entropy.float()
                is_weight = part.is_weight
                if engine_tis_cap is not None:
                    is_weight = truncated_is_weight(logp.detach(), part.logp_old, cap=engine_tis_cap)
                    picked = part.response_mask.bool()
                    chosen.append((logp.detach()[picked], part.logp_old[picked]))
                out = objective(logp, logp.detach() if logp_old is None else logp_old[idx, :T],
                                advantages[idx, :T], part.response_mask, counts, logp_ref=part.logp_ref,
                                entropy=entropy, is_weight=is_weight)
                loss, named = out.total, {**out.losses, **out.metrics}
                if critic is not None:
                    with _amp(autocast_dtype):
                        values = critic(part.input_ids, part.attention_mask, T)
                    vout = value_objective(values, part.values, returns[idx, :T], part.response_mask, counts)
                    loss, named = loss + vout.total, {**named, **vout.losses, **vout.metrics}
                with grad_sync(model, sync=i == n_micro - 1):   # DDP: all-reduce on the last pass only
                    (loss * (weight * loss_scale())).backward()
                for k, v in named.items():   # each is this micro-batch's share of the minibatch value
                    mb_sums[k] += weight * float(v.detach())
            # token-mean metrics were divided by all the minibatch's tokens; rescale to the rows actually computed
            mb_sums["_active"] = float(rollout.response_mask[mb].sum()) if len(mb) else 0.0
            mb_sums = D.sum_values(mb_sums)                           # the global minibatch's values
            active = mb_sums.pop("_active")
            for k, v in mb_sums.items():
                sums[k] += v if k.startswith("loss_") or not active else v * counts.num_tokens / active
            if n_micro:
                norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
                sums["grad_norm"] += float(getattr(norm, "full_tensor", lambda: norm)())   # FSDP: a DTensor
                optimizer.step()
                if critic_optimizer is not None:
                    average_gradients(critic.parameters())
                    torch.nn.utils.clip_grad_norm_(critic.parameters(), max_grad_norm)
                    critic_optimizer.step()
                # the gradients are dead from here: freed now, not held through the next rollout (513 MiB at 135M)
                optimizer.zero_grad(set_to_none=True)
                if critic_optimizer is not None:
                    critic_optimizer.zero_grad(set_to_none=True)
            sums["update_rows"] += len(mb)
            passes += 1
            # the KL measured on this minibatch before its step: how far the earlier steps already moved the policy
            if early_stop_kl is not None and mb_sums.get("approx_kl_old", 0.0) > early_stop_kl:
                stopped = True
    out = {k: v / max(1, passes) for k, v in sums.items()}
    out["update_passes"], out["early_stopped"] = float(passes), float(stopped)
    if chosen:            # (a step whose rows were all skipped measured no mismatch: no keys rather than zeros)
        policy, engine = (torch.cat(x) for x in zip(*chosen))
        out |= {k: float(v) for k, v in mismatch_stats(policy, engine, torch.ones_like(policy),
                                                         cap=engine_tis_cap).items()}
    return out


def critic_update(critic, critic_optimizer, rollout: Rollout, returns: torch.Tensor, value_objective, *,
                  micro_batch_size: int, max_len: int, max_grad_norm: float, autocast_dtype,
                  micro_batch_tokens: int | None = None) -> dict[str, float]:
    """One optimizer step of the critic alone on `returns` [N, T] (used when the policy moves by TRPO)."""
    counts = BatchCounts.of(rollout.response_mask, max_len)
    critic_optimizer.zero_grad(set_to_none=True)
    sums: dict[str, float] = defaultdict(float)
    for idx in micro_batches(torch.arange(returns.shape[0]), rollout, micro_batch_size, micro_batch_tokens):
        part = trim(rollout.select(idx))
        T = part.response_mask.shape[1]
        with _amp(autocast_dtype):
            values = critic(part.input_ids, part.attention_mask, T)
        out = value_objective(values, part.values, returns[idx, :T], part.response_mask, counts)
        out.total.backward()
        for k, v in {**out.losses, **out.metrics}.items():
            sums[k] += float(v.detach())
    torch.nn.utils.clip_grad_norm_(critic.parameters(), max_grad_norm)
    critic_optimizer.step()
    critic_optimizer.zero_grad(set_to_none=True)      # dead from here, as in policy_update
    return dict(sums)


def trpo_update(model, rollout: Rollout, advantages: torch.Tensor, *, max_kl: float, cg_iters: int,
                cg_damping: float, rows: int | None, temperature: float,
                generator: torch.Generator | None = None) -> dict[str, float]:
    """The policy moved by one TRPO step (objectives/trpo.py) on the surrogate mean(r A) of the rollout.

    Runs in fp32 without autocast (the line search compares values across forwards) and with the composite
    attention kernel, which differentiates twice. `rows` subsamples the sequences the step is computed on.
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from llmrl.objectives.kl import kl_estimate
    from llmrl.objectives.policy import aggregate
    from llmrl.objectives.trpo import trpo_step

    N = advantages.shape[0]
    active = (advantages != 0).any(-1).nonzero()[:, 0]            # rows with A = 0 add nothing to the surrogate
    if rows is not None and len(active) > rows:
        active = active[torch.randperm(len(active), generator=generator)[:rows]]
    if len(active) == 0:
        return {"trpo_accepted": 0.0, "update_rows": 0.0}
    part = trim(rollout.select(active))
    T = part.response_mask.shape[1]
    A, mask = advantages[active, :T], part.response_mask
    w = part.is_weight if part.is_weight is not None else torch.ones_like(A)   # TIS weight of the sampling engine
    counts = BatchCounts.of(mask)
    was_training = model.training
    model.eval()

    def logp_now():
        return response_logprobs(model, part.input_ids, part.attention_mask, T, temperature=temperature,
                                 with_entropy=False)[0].float()

    try:
        with sdpa_kernel(SDPBackend.MATH):
            with torch.no_grad():
                logp_old = logp_now()
            stats = trpo_step(
                model, [p for p in model.parameters() if p.requires_grad],
                lambda: aggregate(torch.exp(logp_now() - logp_old) * A * w, mask, "token-mean", counts),
                lambda: aggregate(kl_estimate(logp_old, logp_now(), "k3"), mask, "token-mean", counts),
                max_kl=max_kl, cg_iters=cg_iters, cg_damping=cg_damping)
    finally:
        model.train(was_training)
    return {f"trpo_{k}": float(v) for k, v in stats.items()} | {"update_rows": float(len(active)), "rollout_rows": float(N)}
