"""One supervised-training loop for DPO, reward models and process reward models (and any other loss on fixed data).

    summary = fit(cfg, lambda run_dir, resuming: DpoTask(cfg, run_dir, resuming), progress=None)

What differs between trainers is a small `SupervisedTask`: its data, its model and its loss on a micro-batch. The loop
does the rest, the same for all of them and the same as the RL recipe (`train/rl.py`) where they overlap:

    setup      run folder and seeds (`runio/runs.py`), the task, AdamW with the LR schedule of `optim`
    resume     run.resume / `--resume`: the newest checkpoint of the run folder, refused when the config differs
    loop       epochs of a seeded shuffle, `batch_size` examples a step, gradients accumulated micro-batch by
               micro-batch (`task.loss` gives each micro-batch's share of the batch's loss), clipped, one step
    every N    held-out evaluation (run.eval_every), resumable checkpoint (run.save_every; `runio/checkpoint.py`:
               trainable weights or the LoRA adapter, optimizer, LR schedule, RNG states, data position, metrics)
    stop       after the last step, run.steps (a cap; 0 = none), or run.time_limit_minutes (evaluations not counted)
    finish     held-out evaluation, the final model (LoRA merged) in RUN_DIR/final, summary.yaml

Metrics go to RUN_DIR/metrics.jsonl and the TensorBoard / W&B sinks (`runio/sinks.py`); a progress bar shows
two of them. Data position: step k is the k-th batch of the shuffle, which is drawn from its own generator seeded
with run.seed, so a resumed run recreates it and skips the batches already trained on. Exactness: with the same
threads, a run killed and resumed ends with bitwise the same weights as one never stopped (tests/train/).
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable, Protocol

import torch
import yaml

from llmrl.runio import checkpoint
from llmrl.runio.runs import save_checkpoint, start_run
from llmrl.train.schedules import lr_multiplier
from llmrl.runio.sinks import open_metrics

log = logging.getLogger("llmrl.train")


class SupervisedTask(Protocol):
    """What the loop needs from one kind of supervised training. Indices are of the `n_train` training examples."""
    model: torch.nn.Module      # what trains (a peft model under LoRA); its trainable parameters get the optimizer
    tokenizer: Any              # saved beside the final model
    n_train: int                # training examples (pairs, responses, ...) in one epoch
    epochs: int                 # passes over them
    batch_size: int             # examples per optimizer step
    micro_batch_size: int       # examples per forward / backward
    desc: str                   # the progress bar's label, e.g. "dpo steps"
    shown: tuple[str, str]      # the two metrics the progress bar shows, as loss and acc

    def loss(self, micro: torch.Tensor, batch: torch.Tensor) -> tuple[torch.Tensor, Any]:
        """(the micro-batch's share of the batch's loss, to backward; what `metrics` reads of it, detached).
        micro [m] is a slice of batch [b]; the shares add up to the batch's loss whatever micro_batch_size is."""

    def metrics(self, parts: list, batch: torch.Tensor) -> dict[str, float]:
        """The batch's metrics (its loss first) from the `loss` parts of its micro-batches."""

    def counts(self, batch: torch.Tensor) -> dict[str, int]:
        """What one step trained on, e.g. {"pairs": 16}."""

    def evaluate(self) -> dict[str, float | None]:
        """Held-out metrics (heldout_*); leaves the model's train/eval mode as it found it."""

    def summary(self) -> dict[str, int]:
        """The data's sizes, e.g. {"train_pairs": 120, "heldout_pairs": 14}."""


def total_steps(epochs: int, batch_size: int, n_train: int, cap: int) -> int:
    """Optimizer steps: epochs * ceil(n_train / batch_size), capped at `cap` when that is > 0."""
    steps = epochs * math.ceil(n_train / batch_size)
    return min(steps, cap) if cap else steps


def shuffled_batches(n: int, batch_size: int, epochs: int, generator: torch.Generator):
    """(epoch, indices [b]) of shuffled batches: each epoch is a fresh permutation of the n examples."""
    for epoch in range(epochs):
        for idx in torch.randperm(n, generator=generator).split(batch_size):
            yield epoch, idx


def accumulate(batch: torch.Tensor, micro_batch_size: int, loss_of: Callable) -> list:
    """Backward through the batch's loss micro-batch by micro-batch: `loss_of(micro)` gives (share, part); returns
    the parts in order."""
    parts = []
    for micro in batch.split(micro_batch_size):
        share, part = loss_of(micro)
        share.backward()
        parts.append(part)
    return parts


def sum_parts(parts: list[dict[str, float]]) -> dict[str, float]:
    """Batch means from per-micro-batch means already weighted by their micro-batch's share of the batch: the sums,
    key by key, in order."""
    sums: dict[str, float] = {}
    for part in parts:
        for k, v in part.items():
            sums[k] = sums.get(k, 0.0) + v
    return sums


@dataclass
class _Run:
    """The loop's live objects, built once."""
    cfg: Any
    task: SupervisedTask
    run_dir: Path
    state: checkpoint.TrainingState
    params: list
    metrics_log: Any
    steps: int


def fit(cfg, build: Callable[[Path, bool], SupervisedTask], *, progress: bool | None = None) -> dict:
    """Run one supervised job: `build(run_dir, resuming)` makes the task once the run folder exists (resuming: a
    checkpoint will be loaded, so data the task wrote to the run folder, e.g. built pairs, may be read back).
    Returns a summary with the held-out metrics before and after (or, interrupted, where it stopped)."""
    resume_from = checkpoint.resume_point(cfg, check_steps=False)   # before the run folder is touched
    run_dir, config_yaml, generator = start_run(cfg)
    task = build(run_dir, resume_from is not None)
    o = cfg.optim
    steps = total_steps(task.epochs, task.batch_size, task.n_train, cfg.run.steps)
    params = [q for q in task.model.parameters() if q.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, partial(
        lr_multiplier, schedule=o.schedule, warmup=o.warmup_steps, total=steps))
    state = checkpoint.TrainingState(task.model, optimizer, scheduler, generator)
    start, evals = 0, []
    if resume_from is not None:
        if json.loads((resume_from / "state.json").read_text())["step"] > steps:
            raise ValueError(f"cannot resume from {resume_from}: it is past this run's last step, {steps}")
        start, evals = checkpoint.restore(resume_from, state, run_dir)     # last: sets the RNGs
    run = _Run(cfg, task, run_dir, state, params, open_metrics(cfg, run_dir, start=start), steps)
    evals = evals or [_evaluate(run, 0)]
    step, interrupted = _loop(run, start, evals, cfg.run.progress if progress is None else progress)
    if interrupted:
        run.metrics_log.close()
        return {"run_dir": str(run_dir), "interrupted": True, "step": step, "before": evals[0], "evals": evals}
    after = _evaluate(run, step)
    final = save_checkpoint(task.model, task.tokenizer, run_dir / "final", config_yaml)
    run.metrics_log.close()
    summary = {"run_dir": str(run_dir), "checkpoint": str(final), "steps": step, **task.summary(),
               "before": evals[0], "after": after}
    (run_dir / "summary.yaml").write_text(yaml.safe_dump(summary, sort_keys=False))
    return summary


def _loop(run: _Run, start: int, evals: list[dict], show: bool) -> tuple[int, bool]:
    """Steps start+1 .. run.steps (or until the time limit). Returns (the last step taken, interrupted)."""
    from tqdm.auto import tqdm

    cfg, task = run.cfg, run.task
    shuffle = torch.Generator().manual_seed(cfg.run.seed)          # the data order: skipped up to `start` below
    batches = itertools.islice(shuffled_batches(task.n_train, task.batch_size, task.epochs, shuffle),
                               start, run.steps)
    bar = tqdm(total=run.steps, initial=start, desc=task.desc, disable=not show, dynamic_ncols=True)
    deadline = time.perf_counter() + 60 * cfg.run.time_limit_minutes if cfg.run.time_limit_minutes else None
    task.model.train()
    step = start
    try:
        for step, (epoch, idx) in enumerate(batches, start + 1):
            if deadline is not None and time.perf_counter() > deadline:
                step -= 1
                log.info("run.time_limit_minutes reached after %d steps", step)
                break
            rec = _train_step(run, step, epoch, idx)
            run.metrics_log.write(rec)
            loss, acc = task.shown
            bar.set_postfix(loss=f"{rec[loss]:.3f}", acc=f"{rec[acc]:.2f}")
            bar.update(1)
            if cfg.run.eval_every and step % cfg.run.eval_every == 0 and step < run.steps:
                evals.append(_evaluate(run, step))
                if deadline is not None:     # the time limit counts training, not held-out evaluation
                    deadline += evals[-1]["time_eval"]
            if cfg.run.save_every and step % cfg.run.save_every == 0:
                checkpoint.save(run.run_dir, step, run.state, evals, keep=cfg.run.keep_checkpoints)
    except KeyboardInterrupt:
        log.warning("interrupted at step %d; checkpoints already written are intact", step)
        return step, True
    finally:
        bar.close()
    return step, False


def _train_step(run: _Run, step: int, epoch: int, idx: torch.Tensor) -> dict:
    """One optimizer step on the batch `idx` [b]; its metrics record."""
    t0 = time.perf_counter()
    optimizer, scheduler = run.state.optimizer, run.state.scheduler
    optimizer.zero_grad(set_to_none=True)
    parts = accumulate(idx, run.task.micro_batch_size, lambda micro: run.task.loss(micro, idx))
    grad_norm = float(torch.nn.utils.clip_grad_norm_(run.params, run.cfg.optim.max_grad_norm))
    optimizer.step()
    scheduler.step()
    return {"kind": "train", "step": step, "epoch": epoch, **run.task.metrics(parts, idx), "grad_norm": grad_norm,
            "lr": scheduler.get_last_lr()[0], **run.task.counts(idx), "time_step": time.perf_counter() - t0}


def _evaluate(run: _Run, step: int) -> dict:
    t = time.perf_counter()
    rec = {"kind": "eval", "step": step, **run.task.evaluate()}
    rec["time_eval"] = time.perf_counter() - t
    run.metrics_log.write(rec)
    return rec
