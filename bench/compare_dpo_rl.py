"""DPO (the supervised highway) against RL (the GRPO preset) from the same SmolLM2-135M-Instruct, at equal wall time.

DPO runs first, as `examples/dpo_arithmetic.yaml` configures it: pairs sampled from the starting policy, reference
log-probs once, then the preference loss. Its wall time, held-out evaluations excluded, becomes the budget of the
GRPO run (`examples/grpo_arithmetic.yaml` with `run.time_limit_minutes`), whose clock also excludes evaluations.
Both measure greedy accuracy on the same 200 held-out additions and the exact KL to their reference.

    python bench/compare_dpo_rl.py            # about 2 x the DPO run's wall time
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from common import markdown_table, write_section  # noqa: E402

from llmrl.config_loader import load_config  # noqa: E402
from llmrl.config_supervised import PreferenceTrainConfig  # noqa: E402
from llmrl.presets import PRESETS  # noqa: E402
from llmrl.runio.metrics import read_metrics  # noqa: E402
from llmrl.train.dpo import train_dpo  # noqa: E402
from llmrl.train.rl import train  # noqa: E402


def eval_seconds(run_dir: str) -> float:
    return sum(r.get("time_eval") or 0.0 for r in read_metrics(Path(run_dir) / "metrics.jsonl") if r["kind"] == "eval")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out-dir", default="runs/bench_dpo_rl")
    p.add_argument("--dpo", nargs="*", default=[], help="overrides for the DPO config")
    p.add_argument("--rl", nargs="*", default=[], help="overrides for the GRPO config")
    args = p.parse_args()
    common = [f"run.output_dir={args.out_dir}", "run.progress=false", "run.eval_every=0"]

    t = time.perf_counter()
    dpo = train_dpo(load_config(ROOT / "examples/dpo_arithmetic.yaml", [*common, "run.name=dpo", *args.dpo],
                                schema=PreferenceTrainConfig))
    dpo_wall = time.perf_counter() - t - eval_seconds(dpo["run_dir"])
    print(f"dpo: {dpo_wall / 60:.1f} min without evaluation", flush=True)

    t = time.perf_counter()
    rl = train(load_config(ROOT / "examples/grpo_arithmetic.yaml",
                           [*common, "run.name=grpo", "run.steps=100000", f"run.time_limit_minutes={dpo_wall / 60}",
                            *args.rl], presets=PRESETS))
    rl_wall = time.perf_counter() - t - eval_seconds(rl["run_dir"])

    rows = [
        ["DPO (LoRA r=16, beta 0.1)", dpo["before"]["heldout_accuracy"], dpo["after"]["heldout_accuracy"],
         dpo["after"]["heldout_kl_to_ref"], f"{dpo_wall / 60:.1f}", f"{dpo['steps']} steps on {dpo['train_pairs']} pairs"],
        ["GRPO preset (full weights, k3 KL 0.04)", rl["before"]["heldout_accuracy"], rl["after"]["heldout_accuracy"],
         rl["after"]["heldout_kl_to_ref"], f"{rl_wall / 60:.1f}", f"{rl['steps']} steps of 4 x 8 samples"],
    ]
    body = ("Same starting model (SmolLM2-135M-Instruct), task (2-digit addition) and 200 held-out prompts, greedy. "
            "Wall time covers everything but the held-out evaluations: for DPO, sampling the pairs from the starting "
            "policy (256 prompts x 8 samples, up to 8 pairs per prompt), the reference log-probs and the training; for GRPO, the RL steps, "
            "stopped by `run.time_limit_minutes` at DPO's time. KL after: exact KL(policy || reference) summed over "
            "the greedy held-out responses, nats per sequence.\n\n")
    body += markdown_table(["method", "acc before", "acc after", "KL after", "wall min", "work done"], rows)
    print(body)
    write_section("dpo_vs_rl", "DPO versus RL at equal wall time (preference learning)", body)


if __name__ == "__main__":
    main()
