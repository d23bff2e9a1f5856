"""llmrl against TRL's GRPOTrainer on identical settings, side by side in one invocation.

Settings (the issue's): SmolLM2-135M-Instruct, 2 prompts x 8 completions of 2-digit addition, at most 64 new
tokens, temperature 1, beta = 0.04 (k3 KL in the loss, so a reference model runs), learning rate 1e-6, token-mean
loss (TRL's default "dapo"), one update per rollout, torch on 2 threads. TRL runs as its users run it on a CPU:
fp32 weights (`use_cpu=True`, no bf16). llmrl runs with its defaults (fp32 master weights, bf16 autocast, packed
update), once more with gradient checkpointing (`llmrl_ckpt`: the memory-lean setting), and once in plain fp32 so
the precision's share of the gap is visible.

Each framework runs in its own subprocess (so peak RSS is its own): seconds per step is the median over the steps
after the first (warm-up), completion tokens per second = completion tokens / step time over those steps.

    python bench/compare_trl.py --steps 7          # writes the "trl" section of docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

PROMPTS, GROUP, MAX_NEW, BETA, LR, THREADS = 2, 8, 64, 0.04, 1e-6, 2
LLMRL_WORKERS = ("llmrl_bf16", "llmrl_ckpt", "llmrl_fp32")


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def summarise(step_s: list[float], tokens: list[float]) -> dict:
    """Drop the first (warm-up) step; median seconds per step and tokens/s over the rest."""
    s, t = step_s[1:], tokens[1:]
    return {"step_s": statistics.median(s), "tokens_per_s": sum(t) / sum(s), "steps_timed": len(s),
            "peak_rss_mib": peak_rss_mib()}


def worker_llmrl(steps: int, variant: str, out_dir: str) -> dict:
    from llmrl.config import load_config
    from llmrl.presets import PRESETS
    from llmrl.train.metrics import read_metrics
    from llmrl.train.rl import train

    cfg = load_config(ROOT / "examples/arithmetic_base.yaml", [
        "preset=grpo", f"rollout.prompts_per_step={PROMPTS}", f"rollout.group_size={GROUP}",
        f"rollout.max_new_tokens={MAX_NEW}", "rollout.temperature=1.0", f"objective.kl_coef={BETA}",
        "objective.kl_estimator=k3", "objective.aggregation=token-mean", f"optim.lr={LR}",
        f"optim.micro_batch_size={PROMPTS * GROUP}", f"run.steps={steps}", "run.eval_every=0", "run.samples_every=0",
        "task.heldout_size=1", "run.eval_max_new_tokens=1", f"run.threads={THREADS}", "run.progress=false",
        f"run.output_dir={out_dir}", f"run.name=llmrl_{variant}",
        *{"bf16": [], "ckpt": ["model.gradient_checkpointing=true"], "fp32": ["model.autocast=none"]}[variant]],
        presets=PRESETS)
    summary = train(cfg)
    rows = [r for r in read_metrics(Path(summary["run_dir"]) / "metrics.jsonl") if r["kind"] == "train"]
    return summarise([r["time_step"] for r in rows], [r["response_length"] * PROMPTS * GROUP for r in rows])


def worker_trl(steps: int, out_dir: str) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from llmrl.data import make_task
    from llmrl.models.loading import resolve_model_path
    from llmrl.rewards import score

    torch.set_num_threads(THREADS)
    task = make_task("arithmetic", seed=0, options={"digits": 2, "ops": ["+"]})
    examples = [ex for ex, _ in zip(task.train_stream(0), range(PROMPTS * (steps + 2)))]
    by_prompt = {ex.prompt: ex for ex in examples}
    data = Dataset.from_list([{"prompt": [{"role": "user", "content": ex.prompt}]} for ex in examples])

    def correct(prompts, completions, **_):
        exs = [by_prompt[p[-1]["content"]] for p in prompts]
        return score([c[0]["content"] for c in completions], exs, [("correct", 1.0, {})]).total.tolist()

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

    path = resolve_model_path("smollm2-135m-instruct")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(path)
    args = GRPOConfig(
        output_dir=str(Path(out_dir) / "trl"), per_device_train_batch_size=PROMPTS * GROUP, num_generations=GROUP,
        gradient_accumulation_steps=1, steps_per_generation=1, num_iterations=1, max_completion_length=MAX_NEW,
        temperature=1.0, beta=BETA, learning_rate=LR, max_steps=steps, logging_steps=1, save_strategy="no",
        report_to=[], use_cpu=True, bf16=False, seed=0, disable_tqdm=True)
    clock = Clock()
    trainer = GRPOTrainer(model=model, reward_funcs=correct, args=args, train_dataset=data,
                          processing_class=tokenizer, callbacks=[clock])
    trainer.train()
    return summarise(clock.step_s, clock.tokens)


def run_worker(name: str, steps: int, out_dir: str) -> dict:
    out = Path(out_dir) / f"{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, __file__, "--worker", name, "--steps", str(steps), "--out-dir", out_dir]
    print("running", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)
    return json.loads(out.read_text())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=7, help="steps per framework (the first is warm-up)")
    p.add_argument("--out-dir", default="runs/bench_trl")
    p.add_argument("--worker", choices=["trl", *LLMRL_WORKERS])
    p.add_argument("--no-write", action="store_true", help="print the table only")
    args = p.parse_args()
    if args.worker:
        res = (worker_trl(args.steps, args.out_dir) if args.worker == "trl"
               else worker_llmrl(args.steps, args.worker.split("_")[1], args.out_dir))
        (Path(args.out_dir) / f"{args.worker}.json").write_text(json.dumps(res))
        return

    from common import markdown_table, write_section

    res = {name: run_worker(name, args.steps, args.out_dir) for name in ("trl", *LLMRL_WORKERS)}
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
            "llmrl_fp32 turns autocast off. Speed-up = TRL s/step / llmrl s/step; RSS ratio = llmrl / TRL.\n\n")
    body += markdown_table(["framework", "s/step", "completion tokens/s", "peak RSS MiB", "speed-up vs TRL",
                            "RSS vs TRL"], rows)
    print(body)
    if not args.no_write:
        write_section("trl", "llmrl versus TRL, GRPO step on the same CPU (performance)", body)


if __name__ == "__main__":
    main()
