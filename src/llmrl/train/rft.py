"""Rejection-sampling fine-tuning (`llmrl rft`; STaR, Zelikman et al. 2022; expert iteration): K rounds of

    sample   rft.samples_per_prompt completions of rft.prompts_per_round fresh training prompts, current policy
    keep     the distinct passing ones (the task's `correct` reward = 1), at most rft.max_per_prompt a prompt
    train    SFT on them (`train/sft.py`, the shared supervised loop), starting from the last round's model

Round k is a supervised run in RUN_DIR/round_k (its own checkpoints, metrics and final model); its accepted
completions are kept in RUN_DIR/round_k/accepted.jsonl and the per-round accounting (sampled, passing, accepted,
acceptance rate) in RUN_DIR/rounds.jsonl. A killed job resumes: finished rounds are skipped, an unfinished one
continues from its checkpoints with the same accepted data. run.time_limit_minutes bounds the whole job's
sampling and training (held-out evaluations not counted, as in every other trainer).
"""

from __future__ import annotations

import copy
import itertools
import json
import logging
import time
from pathlib import Path

import torch
import yaml

from llmrl.compute.settings import resolve_autocast
from llmrl.config_supervised import SftTrainConfig
from llmrl.data.sft import SftExample, read_sft, write_sft
from llmrl.models import load_model
from llmrl.rewards import score
from llmrl.rollout.collect import collect_rollout
from llmrl.train.pairs import task_of
from llmrl.train.sft import train_sft

log = logging.getLogger("llmrl.train")


def accept(completions: list[str], scores: list[float], group_size: int, max_per_prompt: int
           ) -> tuple[list[int], dict]:
    """Rows kept from G = group_size samples per prompt (prompt b's rows are b*G .. b*G+G-1): the distinct
    passing completions (score >= 1; the first of identical texts), at most max_per_prompt a prompt, in order.
    Returns (kept rows, accounting: sampled, passing, accepted, acceptance_rate = passing / sampled,
    prompts, prompts_solved)."""
    if len(completions) != len(scores) or len(scores) % group_size:
        raise ValueError(f"{len(completions)} completions and {len(scores)} scores: expected equal lengths, "
                         f"a multiple of group_size {group_size}")
    kept, solved = [], 0
    for start in range(0, len(scores), group_size):
        seen: set[str] = set()
        for i in range(start, start + group_size):
            if scores[i] >= 1.0 and completions[i].strip() not in seen and len(seen) < max_per_prompt:
                seen.add(completions[i].strip())
                kept.append(i)
        solved += bool(seen)
    passing = sum(s >= 1.0 for s in scores)
    n = len(scores)
    return kept, {"sampled": n, "passing": passing, "accepted": len(kept),
                  "acceptance_rate": passing / n if n else 0.0, "prompts": n // group_size, "prompts_solved": solved}


@torch.no_grad()
def sample_round(cfg: SftTrainConfig, model_name: str, examples: list) -> tuple[list[SftExample], dict]:
    """Sample the round's prompts with the model at `model_name`; (accepted SftExamples, accounting)."""
    r, m = cfg.rft, cfg.model
    model, tokenizer = load_model(model_name, dtype=getattr(torch, m.dtype))
    model.eval()
    amp = resolve_autocast(m.autocast)
    generator = torch.Generator().manual_seed(cfg.run.seed)
    completions, rows_examples, scores = [], [], []
    for start in range(0, len(examples), 16):
        ro = collect_rollout(model, tokenizer, examples[start:start + 16], group_size=r.samples_per_prompt,
                             max_new_tokens=r.max_new_tokens, temperature=r.temperature,
                             chat_template=m.chat_template, system_prompt=m.system_prompt, autocast_dtype=amp,
                             generator=generator)
        completions += ro.completions
        rows_examples += ro.examples
        scores += score(ro.completions, ro.examples, [("correct", 1.0, {})]).total.tolist()
    kept, stats = accept(completions, scores, r.samples_per_prompt, r.max_per_prompt)
    return [SftExample(rows_examples[i].prompt, completions[i].strip()) for i in kept], stats


def _round_config(cfg: SftTrainConfig, run_dir: Path, k: int, model_name: str, minutes_left: float | None):
    sub = copy.deepcopy(cfg)
    sub.model.name, sub.run.output_dir, sub.run.name = model_name, str(run_dir), f"round_{k}"
    sub.run.time_limit_minutes = minutes_left
    return sub


def _read_rounds(path: Path) -> dict[int, dict]:
    if not path.exists():
        return {}
    return {rec["round"]: rec for rec in map(json.loads, path.read_text().splitlines()) if rec.get("done")}


def train_rft(cfg: SftTrainConfig, *, progress: bool | None = None) -> dict:
    """Run K rounds; returns a summary over them (held-out metrics before the first and after the last round)."""
    task = task_of(cfg)
    if task is None:
        raise ValueError("rft samples prompts from a task: set `task`")
    run_dir = Path(cfg.run.output_dir) / cfg.run.name
    run_dir.mkdir(parents=True, exist_ok=True)
    log_path, done = run_dir / "rounds.jsonl", _read_rounds(run_dir / "rounds.jsonl")
    stream = task.train_stream(cfg.run.seed)
    limit, t0, t_eval = cfg.run.time_limit_minutes, time.perf_counter(), 0.0
    model_name, rounds, before, after, steps = cfg.model.name, [], None, None, 0
    for k in range(1, cfg.rft.rounds + 1):
        examples = list(itertools.islice(stream, cfg.rft.prompts_per_round))       # fresh prompts each round
        if k in done:                                   # resumed: this round finished before
            rounds.append(done[k])
            model_name = done[k]["checkpoint"] or model_name
            continue
        left = None if limit is None else limit - (time.perf_counter() - t0 - t_eval) / 60
        if left is not None and left <= 0:
            log.info("run.time_limit_minutes reached after %d rounds", k - 1)
            break
        round_dir = run_dir / f"round_{k}"
        saved = round_dir / "accepted.jsonl"
        if (round_dir / "stats.json").exists():         # resumed mid-round: the same accepted data
            rows, stats = read_sft(saved) if saved.exists() else [], json.loads((round_dir / "stats.json").read_text())
        else:
            t = time.perf_counter()
            rows, stats = sample_round(cfg, model_name, examples)
            stats["time_sample"] = time.perf_counter() - t
            round_dir.mkdir(parents=True, exist_ok=True)
            (round_dir / "stats.json").write_text(json.dumps(stats))
            if rows:
                write_sft(rows, saved)
        rec = {"round": k, **stats, "checkpoint": None, "steps": 0}
        if rows:
            summary = train_sft(_round_config(cfg, run_dir, k, model_name, left), examples=rows, progress=progress)
            if summary.get("interrupted"):
                return {**summary, "rounds": rounds}
            t_eval += summary["before"].get("time_eval", 0.0) + summary["after"].get("time_eval", 0.0)
            model_name, before = summary["checkpoint"], before or summary["before"]
            after, steps = summary["after"], steps + summary["steps"]
            rec |= {"checkpoint": model_name, "steps": summary["steps"],
                    "heldout_accuracy": summary["after"].get("heldout_accuracy")}
        log.info("round %d: acceptance %.3f, %d accepted", k, stats["acceptance_rate"], stats["accepted"])
        rounds.append(rec)
        with open(log_path, "a") as fh:
            fh.write(json.dumps({**rec, "done": True}) + "\n")
    summary = {"run_dir": str(run_dir), "checkpoint": model_name, "steps": steps,
               "train_examples": sum(r["accepted"] for r in rounds), "heldout_examples": 0,
               "before": before or {}, "after": after or {}, "rounds": rounds}
    (run_dir / "summary.yaml").write_text(yaml.safe_dump(summary, sort_keys=False))
    return summary


def round_table(rounds: list[dict]) -> str:
    """One line per round: its accounting and the held-out accuracy after it."""
    lines = ["round  sampled  passing  accepted  acceptance  heldout_accuracy"]
    for r in rounds:
        acc = r.get("heldout_accuracy")
        lines.append(f"{r['round']:>5}  {r['sampled']:>7}  {r['passing']:>7}  {r['accepted']:>8}  "
                     f"{r['acceptance_rate']:>10.3f}  {'-' if acc is None else f'{acc:.3f}':>16}")
    return "\n".join(lines)
