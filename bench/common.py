"""Shared helpers for benchmarks: machine description, writing a marked section of docs/benchmarks.md, and the
settings, TRL trainer and subprocess workers that bench/compare_trl.py and bench/time_to_accuracy.py share."""

from __future__ import annotations

import datetime
import os
import platform
import re
import shlex
import statistics
import sys
import time
from pathlib import Path

DOC = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"


def machine(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """The CPU, with the instructions that set its bf16 matmul rate (AMX tiles run it ~6x AVX-512 BF16)."""
    cpu, family, flags = "unknown CPU", "", set()
    try:
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name") and cpu == "unknown CPU":
                cpu = line.split(":", 1)[1].strip()
            elif line.startswith("cpu family") and not family:
                family = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    bf16 = "AMX bf16" if "amx_bf16" in flags else "AVX-512 BF16" if "avx512_bf16" in flags else "no bf16 matmul unit"
    # A virtual machine's model name can be just the vendor's ("AMD EPYC"): the family tells a Zen 4 (25) from a
    # Zen 5 (26), whose bf16 matmul rate is twice as high.
    family = f"cpu family {family}, " if family else ""
    import torch

    return (f"{cpu} ({family}{bf16}), {os.cpu_count()} cores, Python {platform.python_version()}, "
            f"torch {torch.__version__}")


def command() -> str:
    return "python " + " ".join(shlex.quote(a) for a in sys.argv)


def write_section(key: str, title: str, body: str, doc: Path = DOC) -> None:
    """Replace (or append) the section between `<!-- key:start -->` and `<!-- key:end -->`.

    Hand-written text after a `<!-- key:history -->` line inside the section (earlier runs, what was tried) is kept:
    the new figures go above it."""
    today = datetime.date.today().isoformat()
    text = doc.read_text() if doc.exists() else "# Benchmarks\n\nEvery figure here was produced by a script in `bench/`, which rewrites its own section.\n"
    pattern = re.compile(rf"<!-- {key}:start -->.*?<!-- {key}:end -->", re.S)
    old = pattern.search(text)
    marker = f"<!-- {key}:history -->"
    history = ""
    if old and marker in old.group(0):
        kept = old.group(0).split(marker, 1)[1].removesuffix(f"<!-- {key}:end -->").strip("\n")
        history = f"\n\n{marker}\n{kept}" if kept else f"\n\n{marker}"
    block = (f"<!-- {key}:start -->\n## {title}\n\n"
             f"Command: `{command()}`  \nMachine: {machine()}  \nDate: {today}\n\n{body.strip()}{history}\n"
             f"<!-- {key}:end -->")
    text = pattern.sub(lambda _: block, text) if old else text.rstrip() + "\n\n" + block + "\n"
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text(text)


def timed(fn, runs: int) -> tuple[float, float]:
    """(median, 90th percentile) seconds of fn() over `runs` calls, after one warm-up call."""
    fn()
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    times.sort()
    return statistics.median(times), times[min(len(times) - 1, int(0.9 * len(times)))]


def markdown_table(header: list[str], rows: list[list]) -> str:
    fmt = lambda v: f"{v:.3f}" if isinstance(v, float) else str(v).replace("|", "\\|")  # noqa: E731
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(fmt(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


# ---------------------------------------------------------------- llmrl against TRL (compare_trl, time_to_accuracy)
# The performance issue's settings: SmolLM2-135M-Instruct (examples/arithmetic_base.yaml), 2 prompts x 8
# completions of 2-digit addition, at most 64 new tokens, temperature 1, beta 0.04 (k3 KL in the loss),
# token-mean loss (TRL's default "dapo"), one update per rollout, torch on 2 threads.
PROMPTS, GROUP, MAX_NEW, BETA, THREADS = 2, 8, 64, 0.04, 2


def peak_rss_mib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def grpo_config(lr: float, overrides: list[str]):
    """The llmrl config of the shared settings at learning rate `lr`, plus `overrides`. TRL's side reads it too."""
    from llmrl.config_loader import load_config
    from llmrl.presets import PRESETS

    root = Path(__file__).resolve().parents[1]
    return load_config(root / "examples/arithmetic_base.yaml", [
        "preset=grpo", f"rollout.prompts_per_step={PROMPTS}", f"rollout.group_size={GROUP}",
        f"rollout.max_new_tokens={MAX_NEW}", "rollout.temperature=1.0", f"objective.kl_coef={BETA}",
        "objective.kl_estimator=k3", "objective.aggregation=token-mean", f"optim.lr={lr}",
        f"optim.micro_batch_size={PROMPTS * GROUP}", f"run.threads={THREADS}", "run.progress=false",
        "run.samples_every=0", *overrides], presets=PRESETS)


def trl_grpo_trainer(cfg, *, max_steps: int, n_prompts: int, out_dir: str, callbacks: list):
    """TRL's GRPOTrainer on the settings of llmrl config `cfg`: the same model, training prompts (the task's
    stream, through the same chat template and system prompt), `correct` reward, sampling, beta and AdamW
    (lr, betas, eps, weight decay, grad-norm clip, constant schedule). TRL runs as its users run it on a CPU:
    fp32 weights (`use_cpu=True`, no bf16). `n_prompts`: training prompts in its dataset."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    try:
        from datasets import Dataset
        from trl import GRPOConfig, GRPOTrainer
    except ImportError as e:
        raise SystemExit(f"TRL is not installed ({e}): pip install -e \".[bench]\" (the bench extra, TRL 1.16.0)")

    from llmrl.data import make_task
    from llmrl.models.loading import resolve_model_path
    from llmrl.rewards import score

    torch.set_num_threads(cfg.run.threads)
    task = make_task(cfg.task.name, seed=cfg.task.seed, options=cfg.task.options)
    examples = [ex for ex, _ in zip(task.train_stream(cfg.run.seed), range(n_prompts))]
    by_prompt = {ex.prompt: ex for ex in examples}
    system = [{"role": "system", "content": cfg.model.system_prompt}] if cfg.model.system_prompt else []
    data = Dataset.from_list([{"prompt": [*system, {"role": "user", "content": ex.prompt}]} for ex in examples])

    def correct(prompts, completions, **_):
        exs = [by_prompt[p[-1]["content"]] for p in prompts]
        return score([c[0]["content"] for c in completions], exs, [("correct", 1.0, {})]).total.tolist()

    r, o, opt = cfg.rollout, cfg.objective, cfg.optim
    path = resolve_model_path(cfg.model.name)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(path)
    args = GRPOConfig(
        output_dir=str(Path(out_dir) / "trl"), per_device_train_batch_size=r.prompts_per_step * r.group_size,
        num_generations=r.group_size, gradient_accumulation_steps=1, steps_per_generation=1, num_iterations=1,
        max_completion_length=r.max_new_tokens, temperature=r.temperature, beta=o.kl_coef,
        learning_rate=opt.lr, adam_beta1=opt.betas[0], adam_beta2=opt.betas[1], adam_epsilon=opt.eps,
        weight_decay=opt.weight_decay, max_grad_norm=opt.max_grad_norm, lr_scheduler_type="constant",
        max_steps=max_steps, logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, bf16=False,
        seed=cfg.run.seed, disable_tqdm=True)
    return GRPOTrainer(model=model, reward_funcs=correct, args=args, train_dataset=data,
                       processing_class=tokenizer, callbacks=callbacks)


def run_worker(script: str, name: str, argv: list[str], out_dir: str, python: str | None = None) -> dict:
    """Run `script --worker name *argv` in a subprocess (so its peak RSS and threads are its own), under
    `python` (default: this interpreter); it writes its result to OUT_DIR/NAME.json, returned here."""
    import json
    import subprocess

    out = Path(out_dir) / f"{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    cmd = [python or sys.executable, script, "--worker", name, *argv, "--out-dir", out_dir]
    print("running", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)
    return json.loads(out.read_text())
