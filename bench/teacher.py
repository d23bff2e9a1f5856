"""Teacher signals against RL on 2-digit addition, all from the same SmolLM2-135M-Instruct, at equal wall time:

    teacher     GRPO (examples/main_arithmetic.yaml) for --teacher-minutes: the RL run that makes the teacher;
                its first --minutes are the GRPO arm (same config and seed, constant learning rate)
    sft         SFT on correct worked answers made from the task (examples/sft_arithmetic.yaml)
    rft         rejection-sampling fine-tuning, rounds of sample / keep passing / SFT (examples/rft_arithmetic.yaml)
    distill     on-policy distillation from the teacher's final/ (examples/distill_arithmetic.yaml): the
                sampled per-token reverse-KL term as a reward
    distill+rl  the same plus GRPO's advantage of the outcome (credit.options.outcome=grpo)
    distill exact, distill exact+rl   the same two with teacher.estimator=exact: the full KL over the
                vocabulary at every response position as a loss term (GKD)

Each arm trains for --minutes of wall time (held-out evaluations not counted, as run.time_limit_minutes counts)
and is evaluated (greedy accuracy on --heldout held-out additions) every --eval-every steps; the curve is held-out
accuracy against training wall time. Writes a table to docs/benchmarks.md (section "teacher") and the figure
docs/figures/teacher_bench.svg; "time to teacher acc" is the first evaluation at which an arm reaches the teacher's
final accuracy (the issue's bar: distillation within 1/4 of the teacher's wall time).

    python bench/teacher.py --minutes 30 --teacher-minutes 120              # the full benchmark (~4.5 h)
    python bench/teacher.py --teacher runs/main_arithmetic/final --teacher-wall-minutes 120 --minutes 30
        # the teacher's final accuracy is read from the run folder above final/ (its metrics.jsonl)
    python bench/teacher.py --smoke                                         # plumbing only: the tiny random model
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from common import markdown_table, write_section  # noqa: E402

from llmrl.config_loader import load_config  # noqa: E402
from llmrl.config_supervised import SftTrainConfig  # noqa: E402
from llmrl.presets import PRESETS  # noqa: E402
from llmrl.runio.metrics import read_metrics  # noqa: E402
from llmrl.train.rft import train_rft  # noqa: E402
from llmrl.train.rl import train  # noqa: E402
from llmrl.train.sft import train_sft  # noqa: E402

SMOKE = ["model.name=tiny", "model.autocast=none", "run.eval_max_new_tokens=6"]
SMOKE_RL = ["rollout.prompts_per_step=2", "rollout.group_size=2", "rollout.max_new_tokens=6"]
SMOKE_SFT = ["sft.build_examples=64", "sft.batch_size=8", "optim.micro_batch_size=8"]
SMOKE_RFT = ["rft.prompts_per_round=4", "rft.samples_per_prompt=2", "rft.max_new_tokens=6", "rft.rounds=100"]


def curve(run_dir: Path) -> list[tuple[float, float]]:
    """(training seconds so far, held-out accuracy) at each evaluation of a run (RL or supervised)."""
    rows, spent, out = read_metrics(run_dir / "metrics.jsonl"), 0.0, []
    for r in rows:
        if r["kind"] == "train":
            spent += r.get("time_step") or 0.0
        elif r["kind"] == "eval" and r.get("heldout_accuracy") is not None:
            out.append((spent, r["heldout_accuracy"]))
    return out


def rft_curve(run_dir: Path) -> list[tuple[float, float]]:
    """RFT: the first round's starting accuracy, then after each round (sampling + training seconds so far)."""
    rounds = read_metrics(run_dir / "rounds.jsonl")
    first = curve(run_dir / "round_1")[:1] if (run_dir / "round_1" / "metrics.jsonl").exists() else []
    spent, out = 0.0, list(first)
    for r in rounds:
        spent += r.get("time_sample") or 0.0
        if r["checkpoint"]:
            spent += sum(t for t, _ in curve(run_dir / f"round_{r['round']}")[-1:])
            out.append((spent, r["heldout_accuracy"]))
    return out


def time_to(points: list[tuple[float, float]], target: float) -> float | None:
    return next((t for t, acc in points if acc >= target), None)


def svg(curves: dict[str, list[tuple[float, float]]], path: Path, title: str, label: str = "") -> None:
    """Held-out accuracy against training minutes, one polyline per arm (no plotting dependency)."""
    W, H, L, B = 760, 400, 50, 40
    t_max = max([t for pts in curves.values() for t, _ in pts] + [1.0]) / 60
    x = lambda t: L + (W - L - 150) * (t / 60) / t_max  # noqa: E731
    y = lambda a: H - B - (H - B - 30) * a  # noqa: E731
    colors = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b"]
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" '
             f'font-size="12"><rect width="{W}" height="{H}" fill="white"/>',
             f'<text x="{L}" y="18">{title}</text>', f'<text x="{L}" y="32" fill="#c00">{label}</text>',
             f'<line x1="{L}" y1="{y(0)}" x2="{W - 150}" y2="{y(0)}" stroke="black"/>',
             f'<line x1="{L}" y1="{y(0)}" x2="{L}" y2="{y(1)}" stroke="black"/>',
             f'<text x="{(W - 150) / 2}" y="{H - 8}">training wall time (min, max {t_max:.1f})</text>']
    for a in (0, 0.5, 1):
        parts.append(f'<text x="{L - 30}" y="{y(a) + 4}">{a:.1f}</text>')
    for i, (name, pts) in enumerate(curves.items()):
        c = colors[i % len(colors)]
        coords = " ".join(f"{x(t):.1f},{y(a):.1f}" for t, a in pts)
        parts.append(f'<polyline points="{coords}" fill="none" stroke="{c}" stroke-width="2"/>')
        parts.append(f'<text x="{W - 140}" y="{40 + 18 * i}" fill="{c}">{name}</text>')
    path.write_text("\n".join(parts + ["</svg>"]) + "\n")


def rl_cfg(example: str, name: str, minutes: float, args, extra=()):
    o = [f"run.output_dir={args.out_dir}", f"run.name={name}", "run.progress=false", "run.steps=100000",
         f"run.time_limit_minutes={minutes}", f"run.eval_every={args.eval_every}", f"task.heldout_size={args.heldout}",
         *(SMOKE + SMOKE_RL if args.smoke else []), *extra]
    return load_config(ROOT / "examples" / example, o, presets=PRESETS)


def sup_cfg(example: str, name: str, args, extra=()):
    o = [f"run.output_dir={args.out_dir}", f"run.name={name}", "run.progress=false",
         f"run.time_limit_minutes={args.minutes}", f"task.heldout_size={args.heldout}", "sft.epochs=1000",
         *(SMOKE + SMOKE_SFT + (SMOKE_RFT if name == "rft" else []) if args.smoke else []), *extra]
    return load_config(ROOT / "examples" / example, o, schema=SftTrainConfig)


def run_arms(args) -> tuple[dict, float, str]:
    """Every arm's curve, the teacher's wall seconds and its final/ path."""
    out = Path(args.out_dir)
    curves = {}
    if args.teacher:
        teacher_path, teacher_wall = args.teacher, args.teacher_wall_minutes * 60
        run_dir = Path(args.teacher).parent
        if (run_dir / "metrics.jsonl").exists():   # the RL run that made it: its curve is the teacher's row
            curves["teacher (RL)"] = curve(run_dir)
        for name in args.arm_runs:                  # arms measured earlier, e.g. the learning benchmark's GRPO
            label, _, path = name.partition("=")
            read = rft_curve if label == "rft" else curve          # RFT's curve is per round
            curves[label] = [(t, a) for t, a in read(Path(path)) if t <= args.minutes * 60]
    else:
        s = train(rl_cfg("main_arithmetic.yaml", "teacher", args.teacher_minutes, args))
        teacher_path = s["checkpoint"]
        curves["teacher (GRPO)"] = curve(out / "teacher")
        teacher_wall = curves["teacher (GRPO)"][-1][0]
        curves["grpo"] = [(t, a) for t, a in curves["teacher (GRPO)"] if t <= args.minutes * 60]
    tp = [f"teacher.path={teacher_path}"]
    exact, rl = "teacher.estimator=exact", "credit.options.outcome=grpo"
    arms = {   # label: (run folder name, how to train it, how to read its curve)
        "distill": ("distill", lambda n: train(rl_cfg("distill_arithmetic.yaml", n, args.minutes, args, tp)), curve),
        "distill+rl": ("distill_rl", lambda n: train(rl_cfg("distill_arithmetic.yaml", n, args.minutes, args,
                                                            [*tp, rl])), curve),
        "distill exact": ("distill_exact", lambda n: train(rl_cfg("distill_arithmetic.yaml", n, args.minutes, args,
                                                                  [*tp, exact])), curve),
        "distill exact+rl": ("distill_exact_rl", lambda n: train(rl_cfg("distill_arithmetic.yaml", n, args.minutes,
                                                                        args, [*tp, exact, rl])), curve),
        "sft": ("sft", lambda n: train_sft(sup_cfg("sft_arithmetic.yaml", n, args,
                                                   [f"run.eval_every={args.eval_every}"])), curve),
        "rft": ("rft", lambda n: train_rft(sup_cfg("rft_arithmetic.yaml", n, args, ["rft.rounds=1000"])), rft_curve),
    }
    for label in args.arms.split(","):
        if label not in arms:
            raise SystemExit(f"unknown arm {label!r}; valid: {', '.join(arms)}")
        name, run, read = arms[label]
        run(name)
        curves[label] = read(out / name)
    return curves, teacher_wall, teacher_path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=30.0, help="training wall time of each arm")
    p.add_argument("--teacher-minutes", type=float, default=120.0, help="GRPO run that makes the teacher")
    p.add_argument("--teacher", default=None, help="an existing teacher checkpoint instead (skips the GRPO run)")
    p.add_argument("--teacher-wall-minutes", type=float, default=None, help="with --teacher: its RL wall time")
    p.add_argument("--arm-runs", nargs="*", default=[], metavar="NAME=RUN_DIR",
                   help="with --teacher: add arms from earlier runs of the same task (cut at --minutes)")
    p.add_argument("--arms", default="distill exact,distill exact+rl,distill,distill+rl,sft,rft",
                   help="the arms to train, comma-separated (with --arm-runs for the others)")
    p.add_argument("--heldout", type=int, default=200)
    p.add_argument("--eval-every", type=int, default=10, help="steps between held-out evaluations")
    p.add_argument("--out-dir", default="runs/bench_teacher")
    p.add_argument("--smoke", action="store_true", help="the tiny random model, seconds-long: plumbing only")
    args = p.parse_args()
    if args.smoke:
        args.minutes, args.teacher_minutes, args.heldout, args.eval_every = 0.15, 0.3, 8, 2
    if args.teacher and args.teacher_wall_minutes is None:
        p.error("--teacher needs --teacher-wall-minutes (the wall time of the RL run that made it)")
    curves, teacher_wall, teacher_path = run_arms(args)
    teacher_row = next((k for k in ("teacher (GRPO)", "teacher (RL)") if curves.get(k)), None)
    teacher_acc = curves[teacher_row][-1][1] if teacher_row else None
    rows = []
    for name, pts in curves.items():
        reach = time_to(pts, teacher_acc) if teacher_acc is not None else None
        rows.append([name, pts[0][1] if pts else "-", pts[-1][1] if pts else "-",
                     f"{pts[-1][0] / 60:.2f}" if pts else "-", "-" if reach is None else f"{reach / 60:.2f}",
                     "-" if reach is None else f"{reach / teacher_wall:.2f}"])
    (Path(args.out_dir) / "curves.json").write_text(json.dumps(curves))
    label = "SMOKE RUN (tiny random model, seconds per arm): plumbing only, the figures mean nothing. " \
        if args.smoke else ""
    label = label.strip()
    svg(curves, ROOT / "docs" / "figures" / "teacher_bench.svg", "held-out accuracy vs training wall time", label)
    model = "tiny" if args.smoke else "SmolLM2-135M-Instruct"
    body = (f"{label + ' ' if label else ''}From the same {model} model, each arm trains for "
            f"{args.minutes} min of wall time (evaluations not counted) on 2-digit addition; greedy accuracy on "
            f"{args.heldout} held-out additions every {args.eval_every} steps (RFT: after each round). The teacher is "
            f"RL-trained for {teacher_wall / 60:.2f} min ({teacher_path}); 'to teacher acc' is the training time at "
            "which an arm first reaches the teacher's final accuracy, and its ratio to the teacher's wall time.\n\n")
    body += markdown_table(["arm", "acc start", "acc end", "train min", "min to teacher acc", "/ teacher time"], rows)
    body += "\n\n![held-out accuracy against wall time](figures/teacher_bench.svg)\n"
    write_section("teacher", "Teacher signals: SFT, rejection sampling, distillation and RL at equal wall time", body)
    print(body)


if __name__ == "__main__":
    t0 = time.perf_counter()
    main()
    print(f"total {time.perf_counter() - t0:.0f} s")
