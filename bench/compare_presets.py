"""Run several presets on the same task and budget; write held-out accuracy, KL and wall time per preset.

    python bench/compare_presets.py --presets grpo,dr_grpo,rloo,reinforce_pp,ppo --steps 20
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import markdown_table, write_section  # noqa: E402

from llmrl.config_loader import load_config  # noqa: E402
from llmrl.presets import PRESETS, describe_preset  # noqa: E402
from llmrl.train.rl import train  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", default="grpo,dr_grpo,rloo,reinforce_pp,ppo")
    p.add_argument("--config", default=str(Path(__file__).resolve().parents[1] / "examples/arithmetic_base.yaml"))
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--heldout", type=int, default=100)
    p.add_argument("--out-dir", default="runs/bench_presets")
    p.add_argument("overrides", nargs="*", help="extra config overrides applied to every preset")
    args = p.parse_args()
    rows = []
    for name in args.presets.split(","):
        cfg = load_config(args.config, [f"preset={name}", f"run.steps={args.steps}", "run.eval_every=0",
                                        f"task.heldout_size={args.heldout}", f"run.output_dir={args.out_dir}",
                                        f"run.name={name}", *args.overrides], presets=PRESETS)
        t = time.perf_counter()
        s = train(cfg)
        wall = time.perf_counter() - t
        rows.append([name, s["before"]["heldout_accuracy"], s["after"]["heldout_accuracy"],
                     s["after"]["heldout_kl_to_ref"], f"{wall / 60:.1f}", describe_preset(name)])
        print(rows[-1], flush=True)
    body = (f"Each preset trains SmolLM2-135M-Instruct on 2-digit addition from the same start for {args.steps} steps "
            f"of {cfg.rollout.prompts_per_step} prompts x {cfg.rollout.group_size} samples; greedy accuracy on "
            f"{args.heldout} held-out problems; KL is the exact KL(policy || reference) summed over the greedy "
            "responses' tokens (nats per sequence); wall time includes the two evaluations.\n\n")
    body += markdown_table(["preset", "acc before", "acc after", "KL after", "wall min", "composition"], rows)
    write_section("presets", "Presets side by side (credit assignment)", body)


if __name__ == "__main__":
    main()
