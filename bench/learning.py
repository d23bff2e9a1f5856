"""The learning benchmark: presets x tasks, each for the same training wall time from the same start.

Every (task, preset) pair trains SmolLM2-135M-Instruct (examples/arithmetic_base.yaml's settings) in its own process
for `--minutes` of training (held-out evaluations not counted: run.time_limit_minutes), evaluating greedily on the
task's held-out problems every `--eval-every` steps. The table gives held-out accuracy before, after and at the
first evaluation past 5 minutes, and over the last steps the entropy, the share of groups with zero reward variance
and the share of truncated responses. One SVG per task plots held-out accuracy and one the per-step entropy
(`sampled_entropy`: -log p of the sampled tokens, measured on every step, even one whose advantages are all 0),
against training minutes.

    python bench/learning.py --minutes 20                                     # the full benchmark (~15 hours here)
    python bench/learning.py --minutes 0.2 --presets grpo,dapo --tasks arithmetic --heldout 8 \\
        model.name=tiny --doc /tmp/x.md                                        # a smoke run
    python bench/learning.py --minutes 5 --tasks arithmetic --presets dppo,dppo+objective.minibatches=4   # a variant
    python bench/learning.py --minutes 20 --tasks syllogism --presets grpo,dapo --jobs 2   # side by side, a core each

With --jobs N, N pairs train at once, each on cpu_count/N torch threads (unless the overrides set run.threads), its
output in <out-dir>/<task>/<run>.log: the pairs share the machine evenly, so their equal wall times stay comparable.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import DOC, markdown_table, write_section  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
# task -> its overrides of examples/arithmetic_base.yaml: one counting, one logic, one algorithmic task beside it
TASKS: dict[str, list[str]] = {
    "arithmetic": [],
    "letter_counting": ["task.name=reasoning_gym:letter_counting", "task.options={}", "rollout.max_new_tokens=64"],
    "syllogism": ["task.name=reasoning_gym:syllogism", "task.options={}", "rollout.max_new_tokens=64"],
    "spell_backward": ["task.name=reasoning_gym:spell_backward", "task.options={}", "rollout.max_new_tokens=64"],
    # logic with no majority-answer shortcut (the most common answer is 0.22 of the problems): "N has S sisters
    # and B brothers. How many sisters does N's brother have?" (S + 1)
    "aiw": ["task.name=reasoning_gym:aiw", "task.options={}", "rollout.max_new_tokens=64"],
    # counting with no majority-answer shortcut (0.16 at most), 1-2 kinds of animal, at most 3 of each: "how many legs
    # are there in total if you have 2 dogs, 1 spider?" (reasoning-gym's default lists 5 kinds of up to 15 each)
    "leg_counting": ["task.name=reasoning_gym:leg_counting", "rollout.max_new_tokens=64",
                     "task.options={min_animals: 1, max_animals: 2, max_instances: 3}"],
    # algebra with no majority-answer shortcut, one unknown and two terms up to 20: "Solve for z: 13 - z = 3" (10)
    "simple_equations": ["task.name=reasoning_gym:simple_equations", "rollout.max_new_tokens=64",
                         "task.options={min_terms: 2, max_terms: 2, max_value: 20, operators: ['+', '-'], "
                         "operators_weights: [0.5, 0.5]}"],
    # pattern induction (reasoning-gym's "cognition"), 4-6 terms of one rule: "4, 8, 16, 32, ?" (64)
    "number_sequence": ["task.name=reasoning_gym:number_sequence", "rollout.max_new_tokens=64",
                        "task.options={min_terms: 4, max_terms: 6, max_complexity: 1}"],
}
PRESETS = ("grpo", "dapo", "gspo", "cispo", "dppo")


def run_name(spec: str) -> str:
    """A preset spec's folder name: 'dppo+rollout.temperature=0.7' -> 'dppo__rollout.temperature-0.7'; a YAML
    value's brackets, quotes and spaces are dropped, its commas and colons become '-'."""
    name = spec.replace("+", "__").replace("=", "-")
    return re.sub(r"[^\w.-]", "", re.sub(r"[,:]", "-", name))


def split_specs(text: str) -> list[str]:
    """--presets' comma-separated specs; a comma inside [...] or {...} (a YAML value) does not split:
    'grpo,dapo+reward.terms=[{"name":"correct","options":{"partial":false}}]' -> two specs."""
    specs, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        depth += (ch in "[{") - (ch in "]}")
        if ch == "," and depth == 0:
            specs.append(text[start:i])
            start = i + 1
    return [*specs, text[start:]]


def run(task: str, spec: str, args) -> Path:
    """Train one pair in a subprocess; returns its run folder. `spec`: a preset, or 'PRESET+OVERRIDE+...'."""
    out = Path(args.out_dir) / task
    preset, *variant = spec.split("+")
    threads = [] if args.jobs == 1 or any(o.startswith("run.threads=") for o in args.overrides) else \
        [f"run.threads={max(1, (os.cpu_count() or 1) // args.jobs)}"]
    cmd = [sys.executable, "-m", "llmrl", "train", str(ROOT / "examples/arithmetic_base.yaml"), f"preset={preset}",
           "objective.kl_coef=0.0", "reward.terms=[correct]", f"run.time_limit_minutes={args.minutes}",
           "run.steps=100000", f"run.eval_every={args.eval_every}", f"task.heldout_size={args.heldout}",
           "run.progress=false", "run.resume=never", "run.samples_every=0", f"run.output_dir={out}",
           f"run.name={run_name(spec)}", *TASKS[task], *threads, *args.overrides, *variant]
    print(" ".join(cmd), flush=True)
    if args.jobs == 1:
        subprocess.run(cmd, check=True)
    else:
        out.mkdir(parents=True, exist_ok=True)
        with open(out / f"{run_name(spec)}.log", "w") as log:
            subprocess.run(cmd, check=True, stdout=log, stderr=subprocess.STDOUT)
    return out / run_name(spec)


def curves(run_dir: Path) -> dict:
    """(training minutes, value) curves of held-out accuracy and entropy, and the run's summary numbers."""
    recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    minutes, t, acc, ent, zero, trunc, last_eval = {0: 0.0}, 0.0, [], [], [], [], {}
    for rec in recs:
        if rec["kind"] == "train":
            t += rec.get("time_step", 0.0) / 60
            minutes[rec["step"]] = t
            ent.append((t, rec.get("sampled_entropy", rec.get("entropy"))))
            zero.append(rec.get("zero_variance_group_fraction"))
            trunc.append(rec.get("truncated_fraction"))
        elif rec["kind"] == "eval":
            acc.append((minutes.get(rec["step"], t), rec["heldout_accuracy"]))
            last_eval = rec
    at5 = next((a for m, a in acc if m >= min(5.0, t - 1e-9)), None)     # a run of <= 5 minutes: its last
    tail = [e for _, e in ent[-10:] if e is not None]
    zeros = [z for z in zero[-10:] if z is not None]
    truncs = [z for z in trunc[-10:] if z is not None]
    return {"acc": acc, "entropy": ent, "before": acc[0][1], "after": acc[-1][1], "at5": at5,
            "entropy_end": sum(tail) / len(tail) if tail else None,
            "zero_var": sum(zeros) / len(zeros) if zeros else None,
            "truncated": sum(truncs) / len(truncs) if truncs else None,
            "steps": max(minutes), "minutes": t,
            "exact": last_eval.get("heldout_exact"),                        # older runs: not logged
            "top_share": last_eval.get("heldout_top_answer_share"),
            "constant": last_eval.get("heldout_constant_answer_accuracy")}


def constant_accuracy(run_dir: Path) -> float:
    """What the commonest reference answer of the run's held-out set, given to every prompt, would score: rebuilt
    from the run's config.yaml, for runs that did not log it."""
    import yaml

    from llmrl.data.tasks import make_task
    from llmrl.train.evaluate import answer_counts, collapse_stats

    task = yaml.safe_load((run_dir / "config.yaml").read_text())["task"]
    heldout = make_task(task["name"], seed=task["seed"], options=task["options"], train_path=task["train_path"],
                        heldout_path=task["heldout_path"]).heldout(task["heldout_size"])
    return collapse_stats({"given_counts": {}, "answer_counts": answer_counts(str(ex.answer) for ex in heldout)}
                          )["constant_answer_accuracy"]


def report(results: dict, args) -> None:
    from llmrl.report.charts import Series, line_chart, standalone_svg

    doc = Path(args.doc)
    rows, figs = [], []
    for task, by_preset in results.items():
        for preset, c in by_preset.items():
            rows.append([task, preset, c["before"], c["at5"] if c["at5"] is not None else "–", c["after"],
                         c["exact"] if c["exact"] is not None else "–",
                         c["entropy_end"] if c["entropy_end"] is not None else "–",
                         c["zero_var"] if c["zero_var"] is not None else "–",
                         c["truncated"] if c["truncated"] is not None else "–",
                         c["top_share"] if c["top_share"] is not None else "–",
                         c["constant"] if c["constant"] is not None else "–", c["steps"], f"{c['minutes']:.1f}"])
        for what, key in (("held-out accuracy", "acc"), ("entropy (nats/token)", "entropy")):
            fig = doc.parent / "figures" / f"learning{args.figure_suffix}_{task}_{key}.svg"
            fig.parent.mkdir(parents=True, exist_ok=True)
            fig.write_text(standalone_svg(line_chart(
                f"{task}: {what} vs training minutes", [Series(p, c[key], markers=key == "acc")
                                                       for p, c in by_preset.items()],
                width=520, height=280, x_label="training minutes")))
            figs.append(f"![{task} {key}]({fig.relative_to(doc.parent)})")
    shared = f"{args.jobs} runs at a time, each on an equal share of the cores; " if args.jobs > 1 else ""
    body = (f"{args.note}\n\n" if args.note else "") + (
        f"Each preset trains from the same start for {args.minutes} minutes of training (evaluations not counted), "
        f"greedy held-out accuracy on {args.heldout} problems every {args.eval_every} steps; {shared}no KL term for "
        f"any preset (a variant's `+objective.kl_coef=...` adds one); overrides "
        f"`{' '.join(args.overrides) or 'none'}`. 'acc @5 min': the first evaluation at or past 5 training minutes "
        "(in a run of 5 minutes or less, its last); 'exact after': the share of held-out problems given full credit "
        "at the last evaluation (acc counts a checker's partial credit, such as reasoning-gym's substring credit; – "
        "where the run predates this column); entropy, zero-variance share and truncated share (responses "
        "that hit rollout.max_new_tokens): means over the last 10 steps. 'top answer': the share of held-out prompts "
        "whose greedy response gives the commonest answer at the last evaluation (the answer the scorer reads; 1.0: "
        "one answer to every prompt; – where the run predates this column); 'constant acc': what the commonest "
        "reference answer, given to every prompt, would score.\n\n")
    body += markdown_table(["task", "preset", "acc before", "acc @5 min", "acc after", "exact after", "entropy end",
                            "zero-var groups", "truncated", "top answer", "constant acc", "steps", "train min"],
                           rows)
    body += "\n\n" + "\n".join(figs) + "\n"
    title = "Learning benchmark: presets x tasks at equal wall time"
    write_section(args.section, title if args.section == "learning" else f"{title} ({args.minutes:g} minutes)",
                  body, doc=doc)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", default=",".join(PRESETS),
                   help="comma-separated; a variant adds overrides with '+': dppo+rollout.temperature=0.7 "
                        "(a comma inside a YAML [...] or {...} value does not split)")
    p.add_argument("--tasks", default=",".join(TASKS))
    p.add_argument("--minutes", type=float, default=20.0)
    p.add_argument("--eval-every", type=int, default=20)
    p.add_argument("--heldout", type=int, default=200)
    p.add_argument("--out-dir", default="runs/bench_learning")
    p.add_argument("--doc", default=str(DOC))
    p.add_argument("--figure-suffix", default="")
    p.add_argument("--section", default="learning", help="the docs section to write (another keeps this one)")
    p.add_argument("--note", default="", help="a line above the table (e.g. 'SMOKE RUN: ...')")
    p.add_argument("--jobs", type=int, default=1, help="pairs trained at once, the cores shared evenly")
    p.add_argument("--report-only", action="store_true",
                   help="rewrite the table from the runs in --out-dir (pairs that did not run are left out)")
    p.add_argument("overrides", nargs="*", help="config overrides applied to every run")
    args = p.parse_args()
    if args.jobs < 1:
        p.error(f"--jobs must be >= 1, got {args.jobs}")
    pairs = [(task, preset) for task in args.tasks.split(",") for preset in split_specs(args.presets)]
    if args.report_only:     # the pairs that ran: a preset may have run on some tasks only
        ran = {(t, q): Path(args.out_dir) / t / run_name(q) for t, q in pairs}
        ran = {pair: d for pair, d in ran.items() if (d / "metrics.jsonl").exists()}
    else:
        with ThreadPoolExecutor(args.jobs) as pool:
            ran = dict(zip(pairs, pool.map(lambda pair: run(*pair, args), pairs)))
    results: dict[str, dict] = {}
    for (task, preset), run_dir in ran.items():
        results.setdefault(task, {})[preset] = c = curves(run_dir)
        if c["constant"] is None:
            c["constant"] = constant_accuracy(run_dir)
    report(results, args)


if __name__ == "__main__":
    main()
