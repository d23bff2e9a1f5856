"""Multi-turn episodes with the KV cache kept across turns (rollout.turn_cache=true, rollout/turns.py) against the
path that re-prefills every turn's whole context (turn_cache=false), on the same config: examples/tool_arithmetic.yaml
(SmolLM2-135M-Instruct, calculator tool, 4 prompts x 8 samples, up to 3 turns, 64 response tokens).

    python bench/multiturn_cache.py --rounds 3 --write       # rollouts only, the two paths interleaved (default)
    python bench/multiturn_cache.py --train --steps 3 --write  # whole `llmrl train` runs, one process each

Rollouts (the part that changed): one process loads the policy once, then runs a training step's rollout (the
config's sampling, the same prompts and seed for both paths) with the new path and the old path in turn, --rounds
times; the speed-up is the median of the per-round ratios, so a change in the machine's load hits both alike. Peak
RSS is the process's ru_maxrss read after the first round of each path (new first): the first figure is the new
path's peak; the second is the larger of the two paths' peaks.

Training runs (--train): each run is `llmrl train examples/tool_arithmetic.yaml run.steps=N task.heldout_size=16
rollout.turn_cache=...` in a process of its own, so its peak RSS is its own; reported: the training steps' time,
its rollout part, the held-out evaluations, the process's wall time and peak RSS. The two paths' samples differ
(bf16 rounding differs between a prefill and a decode step), so their episodes differ.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import machine, markdown_table, write_section  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CHILD = """
import json, resource, sys, time
from llmrl.cli import main
t = time.perf_counter()
rc = main(sys.argv[1:])
print("BENCH " + json.dumps({"rc": rc, "wall": time.perf_counter() - t,
                             "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def run(cache: bool, steps: int, out: str) -> dict:
    name = f"turn_cache_{str(cache).lower()}"
    argv = ["train", str(ROOT / "examples" / "tool_arithmetic.yaml"), f"run.steps={steps}", "run.eval_every=0",
            "task.heldout_size=16", f"rollout.turn_cache={str(cache).lower()}", f"run.output_dir={out}",
            f"run.name={name}", "run.progress=false", "run.resume=never"]
    proc = subprocess.run([sys.executable, "-c", CHILD, *argv], capture_output=True, text=True, cwd=ROOT)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("BENCH ")), None)
    if proc.returncode != 0 or line is None:
        raise SystemExit(f"{name} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    result = json.loads(line[6:])
    rows = [json.loads(x) for x in (Path(out) / name / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["kind"] == "train"]
    evals = [r for r in rows if r["kind"] == "eval"]
    return {**result, "steps": len(train), "step_s": sum(r["time_step"] for r in train),
            "rollout_s": sum(r["time_rollout"] for r in train), "eval_s": sum(r["time_eval"] for r in evals),
            "reward": sum(r["reward"] for r in train) / len(train),
            "tool_calls": sum(r.get("tool_calls", 0) for r in train) / len(train),
            "turns": sum(r.get("turns", 0) for r in train) / len(train),
            "response_length": sum(r["response_length"] for r in train) / len(train)}


def rollouts(rounds: int) -> dict:
    """Interleaved rollouts of both paths in this process: per-round seconds, peak RSS after each path's first."""
    import resource

    import torch

    from llmrl.config_loader import load_config
    from llmrl.data import make_task
    from llmrl.models import load_model
    from llmrl.rollout.episodes import collect_episodes
    from llmrl.rollout.tools import demonstration, resolve_tools, system_prompt

    from llmrl.presets import PRESETS

    cfg = load_config(ROOT / "examples" / "tool_arithmetic.yaml", presets=PRESETS)
    r = cfg.rollout
    torch.set_num_threads(cfg.run.threads)
    model, tok = load_model(cfg.model.name)
    task = make_task(cfg.task.name, options=cfg.task.options)
    stream = task.train_stream(0)
    times, peak, stats = {True: [], False: []}, {}, {True: [], False: []}
    for k in range(rounds):
        examples = [next(stream) for _ in range(r.prompts_per_step)]
        for cache in (True, False):
            t = time.perf_counter()
            out = collect_episodes(model, tok, examples, group_size=r.group_size, max_new_tokens=r.max_new_tokens,
                                   temperature=r.temperature, tools=resolve_tools(r.tools), max_turns=r.max_turns,
                                   max_observation_tokens=r.max_observation_tokens,
                                   system_prompt=system_prompt(r.tools), demo=demonstration(r.tools),
                                   autocast_dtype=torch.bfloat16, generator=torch.Generator().manual_seed(k),
                                   keep_cache=cache)
            times[cache].append(time.perf_counter() - t)
            stats[cache].append((float(out.extras["turns"].float().mean()),
                                 float(out.extras["tool_calls"].float().mean()), float(out.response_lengths.mean())))
            peak.setdefault(cache, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
            print(f"round {k} turn_cache={cache}: {times[cache][-1]:.1f} s", flush=True)
    return {"times": times, "peak": peak, "stats": stats}


def rollout_body(rounds: int) -> str:
    load_before = os.getloadavg()
    res = rollouts(rounds)
    load_after = os.getloadavg()
    t, peak, st = res["times"], res["peak"], res["stats"]
    ratios = sorted(o / n for o, n in zip(t[False], t[True]))
    med = ratios[len(ratios) // 2]
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    rows = [[name, " / ".join(f"{x:.1f}" for x in t[c]), f"{mean([s[0] for s in st[c]]):.2f}",
             f"{mean([s[1] for s in st[c]]):.2f}", f"{mean([s[2] for s in st[c]]):.1f}"]
            for name, c in (("false (re-prefill)", False), ("true (kept cache)", True))]
    table = markdown_table(["turn_cache", "rollout s, each round", "turns/row", "tool calls/row", "response tokens"],
                           rows)
    return (f"`python bench/multiturn_cache.py --rounds {rounds}` on {datetime.date.today()}, {machine()}. "
            f"Load average (1/5/15 min) {load_before[0]:.1f}/{load_before[1]:.1f}/{load_before[2]:.1f} before, "
            f"{load_after[0]:.1f}/{load_after[1]:.1f}/{load_after[2]:.1f} after, on 2 cores: the machine was "
            "shared with other jobs, so absolute times are inflated and noisy; the ratio is per round.\n\n"
            f"One training step's rollout of examples/tool_arithmetic.yaml (4 prompts x 8 samples, calculator, up to "
            f"3 turns, 64 response tokens, bf16), the two paths in turn on the same prompts and seed:\n\n{table}\n\n"
            f"Kept cache: {med:.2f}x faster (median of the per-round ratios {', '.join(f'{x:.2f}' for x in ratios)}). "
            f"Peak RSS of the process (model, tokenizer, rollouts): {peak[True]:.0f} MiB after the kept-cache path's "
            f"first rollout, {peak[False]:.0f} MiB after the re-prefill path's (the larger of the two).")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--train", action="store_true", help="whole training runs instead of rollouts")
    p.add_argument("--rounds", type=int, default=3, help="rollout rounds per path")
    p.add_argument("--steps", type=int, default=3, help="with --train: training steps per run")
    p.add_argument("--write", action="store_true", help="rewrite the section in docs/benchmarks.md")
    args = p.parse_args()
    if not args.train:
        body = rollout_body(args.rounds)
        print(body)
        if args.write:
            write_section("multiturn_cache", "Multi-turn episodes: the KV cache kept across turns", body)
        return
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as out:
        new = run(True, args.steps, out)          # the new path first: a failure shows at once
        old = run(False, args.steps, out)
    load_after = os.getloadavg()
    fmt = lambda r: [f"{r['step_s']:.0f}", f"{r['rollout_s']:.0f}", f"{r['eval_s']:.0f}", f"{r['wall']:.0f}",  # noqa
                     f"{r['peak_rss_mib']:.0f}", f"{r['turns']:.2f}", f"{r['tool_calls']:.2f}",
                     f"{r['response_length']:.1f}"]
    table = markdown_table(["turn_cache", "train steps s", "of which rollout s", "evaluations s", "process wall s",
                            "peak RSS MiB", "turns/row", "tool calls/row", "response tokens"],
                           [["false (re-prefill)", *fmt(old)], ["true (kept cache)", *fmt(new)]])
    speed = old["step_s"] / new["step_s"]
    body = (f"`python bench/multiturn_cache.py --steps {args.steps}` on {datetime.date.today()}, {machine()}. "
            f"Load average (1/5/15 min) {load_before[0]:.1f}/{load_before[1]:.1f}/{load_before[2]:.1f} before, "
            f"{load_after[0]:.1f}/{load_after[1]:.1f}/{load_after[2]:.1f} after: the machine was shared, so the "
            f"times are noisy. Each run is `llmrl train examples/tool_arithmetic.yaml run.steps={args.steps} "
            "task.heldout_size=16 rollout.turn_cache=...` in a process of its own.\n\n"
            f"{table}\n\nTraining steps: {speed:.2f}x faster with the kept cache; rollout "
            f"{old['rollout_s'] / new['rollout_s']:.2f}x; whole process {old['wall'] / new['wall']:.2f}x; peak RSS "
            f"{new['peak_rss_mib'] / old['peak_rss_mib']:.2f}x.")
    print(body)
    if args.write:
        write_section("multiturn_cache", "Multi-turn episodes: the KV cache kept across turns", body)


if __name__ == "__main__":
    main()
