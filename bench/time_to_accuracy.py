"""Time to accuracy against TRL (issue 7): reach the held-out 2-digit addition accuracy that TRL's GRPOTrainer
reaches in 20 minutes in a quarter of the time or less.

Both tools train on the settings of bench/compare_trl.py (bench/common.py: SmolLM2-135M-Instruct, 2 prompts x 8
completions, at most 64 new tokens, temperature 1, beta 0.04 with k3, token-mean loss, 2 torch threads) at one
learning rate (`--lr`, 1e-5 as in examples/arithmetic_base.yaml), each in its own subprocess, for a budget of
training minutes. Held-out evaluations are off the training clock and identical for both: llmrl's greedy
evaluator (`llmrl.train.evaluate.evaluate`, as `llmrl eval` and a training run call it: the chat template, the
system prompt, bf16 autocast, 64 new tokens) on the same `--heldout` prompts of the arithmetic task.

- TRL: a TrainerCallback evaluates at time 0 and at the first step end after every `--eval-every-minutes` of
  training, stopping its clock meanwhile, and stops training (`control.should_training_stop`) once
  `--trl-minutes` are spent, evaluating there once more.
- llmrl: `llmrl.train.rl.train` with `run.time_limit_minutes` (which does not count held-out evaluations) and
  `run.eval_every` (`--llmrl-eval-every` steps); an evaluation's training time is the sum of `time_step` in
  metrics.jsonl up to its step.

    python bench/time_to_accuracy.py --write       # ~25 training minutes plus evaluations
    python bench/time_to_accuracy.py --smoke       # the plumbing only: 0.5 min each, 8 held-out prompts
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from common import (GROUP, MAX_NEW, PROMPTS, grpo_config, markdown_table, run_worker,  # noqa: E402
                    trl_grpo_trainer, write_section)

FIGURE = ROOT / "docs" / "figures" / "time_to_accuracy.svg"
TARGET_RATIO = 0.25         # the issue: llmrl reaches TRL's accuracy in a quarter of TRL's time or less


def config(args, name: str, *extra: str):
    """The llmrl config both workers read: the shared settings, `args.heldout` held-out prompts, 64 new tokens
    at evaluation."""
    return grpo_config(args.lr, [f"task.heldout_size={args.heldout}", f"run.eval_max_new_tokens={MAX_NEW}",
                                 f"run.output_dir={args.out_dir}", f"run.name={name}", *extra])


def held_out_evaluator(cfg):
    """model -> held-out accuracy, with the prompts, tokenizer (loaded as llmrl loads it), evaluator and arguments
    of a training run's `run_eval`."""
    import torch
    from transformers import AutoTokenizer

    from llmrl.data import make_task
    from llmrl.models import resolve_model_path
    from llmrl.models.loading import _fix_tokenizer
    from llmrl.train.evaluate import evaluate

    task = make_task(cfg.task.name, seed=cfg.task.seed, options=cfg.task.options)
    heldout = task.heldout(cfg.task.heldout_size)
    tokenizer = _fix_tokenizer(AutoTokenizer.from_pretrained(resolve_model_path(cfg.model.name)), cfg.model.name)
    amp = torch.bfloat16 if cfg.model.autocast == "bfloat16" else None
    return lambda model: evaluate(
        model, tokenizer, heldout, max_new_tokens=cfg.run.eval_max_new_tokens, autocast_dtype=amp,
        chat_template=cfg.model.chat_template, system_prompt=cfg.model.system_prompt)["accuracy"]


def worker_trl(args) -> dict:
    from transformers import TrainerCallback

    cfg = config(args, "trl")
    accuracy = held_out_evaluator(cfg)
    budget_s, every_s = 60 * args.trl_minutes, 60 * args.eval_every_minutes

    class EvalClock(TrainerCallback):
        """The training clock: wall time since training began, evaluations excluded."""

        def __init__(self):
            self.points, self.start, self.off_clock, self.next_eval = [], 0.0, 0.0, every_s

        def training_s(self) -> float:
            return time.perf_counter() - self.start - self.off_clock

        def evaluate(self, model, step: int) -> None:
            t, tick = self.training_s(), time.perf_counter()
            self.points.append([t / 60, step, accuracy(model)])
            self.off_clock += time.perf_counter() - tick
            print(f"trl: {t / 60:.2f} training min, step {step}, held-out accuracy {self.points[-1][2]:.3f}",
                  flush=True)

        def on_train_begin(self, args, state, control, model=None, **kw):
            self.start = time.perf_counter()
            self.evaluate(model, 0)

        def on_step_end(self, args, state, control, model=None, **kw):
            t = self.training_s()
            if t >= budget_s:
                self.evaluate(model, state.global_step)
                control.should_training_stop = True
            elif t >= self.next_eval:
                self.evaluate(model, state.global_step)
                while self.next_eval <= t:
                    self.next_eval += every_s

    clock = EvalClock()
    trainer = trl_grpo_trainer(cfg, max_steps=1_000_000, n_prompts=PROMPTS * 5000, out_dir=args.out_dir,
                               callbacks=[clock])
    trainer.train()
    return {"points": clock.points, "minutes": clock.points[-1][0], "steps": clock.points[-1][1],
            "version": __import__("trl").__version__}


def worker_llmrl(args) -> dict:
    from llmrl.runio.metrics import read_metrics
    from llmrl.train.rl import train

    cfg = config(args, "llmrl", "run.steps=1000000", f"run.time_limit_minutes={args.llmrl_minutes}",
                 f"run.eval_every={args.llmrl_eval_every}", "run.resume=never")
    summary = train(cfg)
    return llmrl_points(read_metrics(Path(summary["run_dir"]) / "metrics.jsonl"))


def llmrl_points(rows: list[dict]) -> dict:
    """metrics.jsonl records -> [training minutes, step, held-out accuracy] per evaluation (the last one per step:
    a time-limited run evaluates its last step twice when an `eval_every` evaluation fell on it)."""
    clock, total = {0: 0.0}, 0.0
    for r in sorted((r for r in rows if r["kind"] == "train"), key=lambda r: r["step"]):
        total += r["time_step"]
        clock[r["step"]] = total
    acc = {r["step"]: r["heldout_accuracy"] for r in rows if r["kind"] == "eval"}
    points = [[clock[s] / 60, s, a] for s, a in sorted(acc.items())]
    return {"points": points, "minutes": points[-1][0], "steps": points[-1][1]}


def first_reaching(points: list[list], target: float) -> float | None:
    """Training minutes of the first evaluation with accuracy >= `target`, or None when none reaches it."""
    return next((m for m, _, acc in points if acc >= target), None)


def headline(trl: dict, llmrl: dict, llmrl_budget: float) -> str:
    m_trl, _, target = trl["points"][-1]
    start = trl["points"][0][2]
    if target <= start:
        return (f"TRL's held-out accuracy after {m_trl:.1f} training minutes ({target:.3f}) is no better than the "
                f"starting model's ({start:.3f}): no accuracy to race to.")
    m = first_reaching(llmrl["points"], target)
    if m is None:
        return (f"TRL reaches a held-out accuracy of **{target:.3f}** in {m_trl:.1f} training minutes; llmrl does "
                f"**not reach it within {llmrl_budget:g} min** (best {max(p[2] for p in llmrl['points']):.3f}). "
                f"Target (a quarter of TRL's time or less): **not met**.")
    ratio = m / m_trl
    return (f"TRL reaches a held-out accuracy of **{target:.3f}** in {m_trl:.1f} training minutes; llmrl first "
            f"reaches it after **{m:.1f}** training minutes, **{ratio:.2f}x** TRL's time. Target (<= "
            f"{TARGET_RATIO:g}x): **{'met' if ratio <= TARGET_RATIO else 'not met'}**.")


def figure(res: dict) -> str:
    from llmrl.report.charts import Series, line_chart, standalone_svg

    series = [Series(f"{name} {r.get('version', '')}".strip(), [(m, acc) for m, _, acc in r["points"]], markers=True)
              for name, r in res.items()]
    return standalone_svg(line_chart("held-out accuracy (greedy, 2-digit addition) vs training time", series,
                                     width=560, height=320, x_label="training minutes (evaluations excluded)"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trl-minutes", type=float, default=20.0, help="TRL's training budget")
    p.add_argument("--llmrl-minutes", type=float, default=5.0, help="llmrl's training budget")
    p.add_argument("--eval-every-minutes", type=float, default=4.0, help="TRL: evaluate every this many training minutes")
    p.add_argument("--llmrl-eval-every", type=int, default=5, help="llmrl: evaluate every this many steps")
    p.add_argument("--lr", type=float, default=1e-5, help="learning rate of both tools")
    p.add_argument("--heldout", type=int, default=100, help="held-out prompts")
    p.add_argument("--smoke", action="store_true", help="check the plumbing: 0.5 min each, 8 held-out prompts")
    p.add_argument("--write", action="store_true", help="rewrite the time_to_accuracy section of docs/benchmarks.md "
                                                        "and docs/figures/time_to_accuracy.svg")
    p.add_argument("--out-dir", default="runs/bench_time_to_accuracy")
    p.add_argument("--worker", choices=["trl", "llmrl"])
    args = p.parse_args()
    if args.smoke:
        if args.write:
            p.error("--smoke checks the plumbing; its figures are no benchmark: drop --write")
        args.trl_minutes = args.llmrl_minutes = 0.5
        args.eval_every_minutes, args.llmrl_eval_every, args.heldout = 0.25, 1, 8
    if args.worker:
        res = worker_trl(args) if args.worker == "trl" else worker_llmrl(args)
        (Path(args.out_dir) / f"{args.worker}.json").write_text(json.dumps(res))
        return

    argv = [f"--{k.replace('_', '-')}={getattr(args, k)}" for k in
            ("trl_minutes", "llmrl_minutes", "eval_every_minutes", "llmrl_eval_every", "lr", "heldout")]
    res = {name: run_worker(__file__, name, argv, args.out_dir) for name in ("trl", "llmrl")}
    rows = [[name, f"{m:.2f}", step, f"{acc:.3f}"] for name, r in res.items() for m, step, acc in r["points"]]
    body = (f"TRL {res['trl']['version']} GRPOTrainer and llmrl (its defaults: fp32 master weights, bf16 autocast; "
            f"TRL fp32, its CPU path) on the settings of the `trl` section: SmolLM2-135M-Instruct, {PROMPTS} prompts "
            f"x {GROUP} completions of 2-digit addition, at most {MAX_NEW} new tokens, temperature 1, beta 0.04 (k3), "
            f"token-mean loss, lr {args.lr:g} (AdamW, llmrl's betas, constant), 2 torch threads. Budgets: TRL "
            f"{args.trl_minutes:g}, llmrl {args.llmrl_minutes:g} training minutes. Held-out accuracy: llmrl's greedy "
            f"evaluator (bf16 autocast, {MAX_NEW} new tokens) on the same {args.heldout} prompts for both, off the "
            f"training clock; TRL every {args.eval_every_minutes:g} training minutes, llmrl every "
            f"{args.llmrl_eval_every} steps.\n\n")
    body += headline(res["trl"], res["llmrl"], args.llmrl_minutes) + "\n\n"
    body += markdown_table(["tool", "training min", "step", "held-out accuracy"], rows)
    svg = figure(res)
    (Path(args.out_dir) / "time_to_accuracy.svg").write_text(svg)
    print(body)
    if args.write:
        FIGURE.parent.mkdir(parents=True, exist_ok=True)
        FIGURE.write_text(svg)
        body += "\n\n![held-out accuracy versus training minutes, TRL and llmrl](figures/time_to_accuracy.svg)\n"
        write_section("time_to_accuracy", "Time to accuracy against TRL (2-digit addition)", body)


if __name__ == "__main__":
    main()
