"""Data parallelism under torchrun: the process group, rank helpers, and the collectives that keep every
statistic of a step global.

    torchrun --nproc-per-node 2 -m llmrl train examples/grpo_arithmetic.yaml

W ranks each take B/W of the step's prompts (`split_prompts`: whole groups, so every group of G samples lives
on one rank), sample and score them, and then everything that needs the whole batch sees the whole batch:

    reward terms   normalize: batch z-scores over the global batch: the raw components are gathered and
                   recombined (`global_rewards`)
    credit         scores, masks, group ids (made globally unique), token rewards, values and step information
                   are all-gathered, the estimator runs on the global batch on every rank, and each rank keeps
                   its own rows (`global_credit`): a group baseline sees the whole group, batch whitening
                   (reinforce_pp, batch_mean) the whole batch
    loss           every aggregation divides by the optimizer batch's global counts (`batch_counts`); the
                   gradient sync in `distributed/parallel.py` turns the ranks' gradients into their sum
    KL control     the adaptive controller sees the ranks' mean sampled KL (`mean`)
    metrics        gathered and reduced (`reduce_metrics`, `evaluate_split`)

In one process (no torchrun: WORLD_SIZE unset or 1) every helper is the identity and nothing is communicated.
One process per GPU: torchrun's LOCAL_RANK picks this process's GPU (cuda:LOCAL_RANK, also what run.device=cuda
resolves to: compute/settings.py). Collectives on host tensors (counts, shapes, metrics) run over gloo; with CUDA
present NCCL is set up beside it and carries every collective on CUDA tensors (rows, gradients, FSDP's shards).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections import Counter
from dataclasses import replace

import torch
import torch.distributed as dist

from llmrl.credit import Credit, CreditInputs
from llmrl.objectives.policy import BatchCounts
from llmrl.rewards.score import RewardResult, combine

# ----------------------------------------------------------------------------- the process group


def init() -> None:
    """Join torchrun's process group (WORLD_SIZE > 1 in the environment); a no-op in one process or when joined.
    Ranks other than 0 log warnings only."""
    if dist.is_initialized() or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return
    backend = "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        backend = "cpu:gloo,cuda:nccl"
    dist.init_process_group(backend)
    if rank() != 0:
        logging.getLogger("llmrl").setLevel(logging.WARNING)


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def is_main() -> bool:
    """Rank 0: the one that writes checkpoints, logs, samples and the report, and shows the progress bar."""
    return rank() == 0


@contextlib.contextmanager
def main_first():
    """Rank 0 runs the block first, the others after it: e.g. loading a model whose cache folder rank 0 builds
    (transformers' save_pretrained writes nothing on other ranks once a process group exists)."""
    if world() > 1 and not is_main():
        dist.barrier()
    yield
    if world() > 1 and is_main():
        dist.barrier()


# ----------------------------------------------------------------------------- collectives (identity in one process)


def all_sum(x: torch.Tensor) -> torch.Tensor:
    """x summed over ranks (a new tensor)."""
    x = x.clone()
    if world() > 1:
        dist.all_reduce(x)
    return x


def all_max(n: int) -> int:
    """The largest of the ranks' `n`."""
    if world() == 1:
        return n
    x = torch.tensor([n], device="cpu")
    dist.all_reduce(x, op=dist.ReduceOp.MAX)
    return int(x)


def any_rank(flag: bool) -> bool:
    """True on every rank when it is True on any (a decision all ranks must take together)."""
    return bool(all_max(int(flag)))


def broadcast_from_main(x: torch.Tensor) -> torch.Tensor:
    """Rank 0's `x` on every rank (same shape and dtype everywhere)."""
    if world() > 1:
        x = x.clone()
        dist.broadcast(x, 0)
    return x


def gather_objects(obj) -> list:
    """Every rank's picklable `obj`, in rank order."""
    if world() == 1:
        return [obj]
    out = [None] * world()
    dist.all_gather_object(out, obj)
    return out


def gather_rows(x: torch.Tensor, pad: float = 0) -> torch.Tensor:
    """x [n, T, ...] on every rank (the same n; T may differ) -> [W*n, max T, ...], rank 0's rows first,
    short rows padded with `pad` on the right."""
    if world() == 1:
        return x
    shape = torch.tensor(x.shape[:2] if x.dim() > 1 else (x.shape[0], 0), device="cpu")
    shapes = [torch.zeros_like(shape) for _ in range(world())]
    dist.all_gather(shapes, shape)
    if len({int(s[0]) for s in shapes}) != 1:
        raise ValueError(f"gather_rows: ranks hold different numbers of rows {[int(s[0]) for s in shapes]}")
    if x.dim() > 1:
        T = max(int(s[1]) for s in shapes)
        x = torch.nn.functional.pad(x.movedim(1, -1), (0, T - x.shape[1]), value=pad).movedim(-1, 1)
    out = [torch.empty_like(x) for _ in range(world())]
    dist.all_gather(out, x.contiguous())
    return torch.cat(out)


def my_rows(x: torch.Tensor, n: int, T: int | None = None) -> torch.Tensor:
    """This rank's `n` rows (and first T columns) of a tensor gathered by `gather_rows`."""
    x = x[rank() * n:(rank() + 1) * n]
    return x if T is None else x[:, :T]


def sum_values(values: dict[str, float]) -> dict[str, float]:
    """Each value summed over the ranks (every rank holds the same keys)."""
    if world() == 1:
        return values
    keys = sorted(values)
    return dict(zip(keys, all_sum(torch.tensor([values[k] for k in keys], dtype=torch.float64, device="cpu")).tolist()))


def mean(x: float) -> float:
    """The ranks' mean of a per-rank mean (exact for the global mean: every rank holds as many rows)."""
    return x if world() == 1 else float(all_sum(torch.tensor([x], dtype=torch.float64, device="cpu"))) / world()


# ----------------------------------------------------------------------------- the step's data, split and global


def split_prompts(examples: list) -> list:
    """This rank's contiguous share of the step's prompts; every prompt's group of G samples stays on one rank."""
    W = world()
    if len(examples) % W:
        raise ValueError(f"rollout.prompts_per_step={len(examples)} must divide by the number of ranks ({W}): "
                         "each rank samples whole groups of an equal share of the prompts")
    b = len(examples) // W
    return examples[rank() * b:(rank() + 1) * b]


def global_rewards(result: RewardResult, terms: list) -> RewardResult:
    """Recombine the reward terms over the global batch when a term is normalised over the batch."""
    if world() == 1 or not any(getattr(t, "normalize", "none") == "batch" for t in terms):
        return result
    full = {k: gather_rows(v) for k, v in result.components.items()}                # name -> [N]
    return replace(result, total=my_rows(combine(full, terms), len(result.total)))


def global_credit(estimator, inputs: CreditInputs) -> Credit:
    """`estimator(inputs)` computed on the global batch; returns this rank's rows [n, T].

    Group ids become globally unique (rank r's ids + r * n), step ids pad with -1 and step scores with NaN
    (neither marks a step), the other [n, T] tensors with 0 (masked positions change no estimator's result)."""
    if world() == 1:
        return estimator(inputs)
    n, T = inputs.response_mask.shape
    g = lambda x, pad=0.0: None if x is None else gather_rows(x, pad)  # noqa: E731
    full = estimator(CreditInputs(
        scores=g(inputs.scores), response_mask=g(inputs.response_mask),
        group_ids=g(inputs.group_ids + rank() * n), token_rewards=g(inputs.token_rewards), values=g(inputs.values),
        step_ids=g(inputs.step_ids, -1), step_scores=g(inputs.step_scores, float("nan"))))
    return Credit(advantages=my_rows(full.advantages, n, T),
                  returns=None if full.returns is None else my_rows(full.returns, n, T))


def batch_counts(response_mask: torch.Tensor, num_seqs: int, max_len: int | None) -> BatchCounts:
    """`BatchCounts` of an optimizer batch spread over the ranks: `response_mask` [n, T] is this rank's rows of
    it, `num_seqs` its rows on all ranks together; max_len None = the widest rank's T."""
    if world() == 1:
        return BatchCounts.of(response_mask, max_len)
    tokens = float(all_sum(response_mask.sum().double()))
    return BatchCounts(max(tokens, 1.0), float(num_seqs), float(max_len or all_max(response_mask.shape[1])))


# ----------------------------------------------------------------------------- metrics


def reduce_metrics(record: dict, *, sums: tuple[str, ...] = (), weights: dict[str, str] | None = None) -> dict:
    """One step's metrics over all ranks: keys in `sums` summed, `time_*` the slowest rank's, a key in `weights`
    averaged with the weights in the record's other key (e.g. a mean over scored steps, weighted by the steps
    scored), any other number averaged (per-row means: every rank holds as many rows); a value that is the same
    on every rank (the step, the learning rate, a metric already reduced) is kept. None is skipped."""
    if world() == 1:
        return record
    weights = weights or {}
    records = gather_objects(record)
    number = lambda x: isinstance(x, (int, float)) and not isinstance(x, bool)  # noqa: E731
    out = {}
    for k, v in record.items():
        vals = [(r.get(k), r.get(weights[k], 1) if k in weights else 1) for r in records]
        vals = [(x, w) for x, w in vals if number(x)]
        if not vals or (k not in sums and len(vals) == len(records) and all(x == vals[0][0] for x, _ in vals)):
            out[k] = v
        elif k in sums:
            out[k] = sum(x for x, _ in vals)
        elif k.startswith("time_"):
            out[k] = max(x for x, _ in vals)
        else:
            total = sum(w for _, w in vals)
            out[k] = sum(x * w for x, w in vals) / total if total else None
    return out


def evaluate_split(evaluate, examples: list) -> dict:
    """`evaluate(examples)` with the examples dealt round-robin over the ranks and the results combined: the
    means weighted by each rank's n, the counts summed; samples from rank 0 first."""
    if world() == 1:
        return evaluate(examples)
    mine = examples[rank()::world()]
    parts = [p for p in gather_objects(evaluate(mine) if mine else None) if p is not None]
    n = sum(p["n"] for p in parts)
    out = {"n": n, "samples": [s for p in parts for s in p["samples"]][:8]}
    for k in ("accuracy", "exact", "response_length", "kl_to_ref", "tool_calls"):
        if all(k in p for p in parts):
            out[k] = sum(p[k] * p["n"] for p in parts) / n
    for k in ("given_counts", "answer_counts"):     # Counters: summed over the ranks
        if all(k in p for p in parts):
            out[k] = sum((p[k] for p in parts), Counter())
    return out
