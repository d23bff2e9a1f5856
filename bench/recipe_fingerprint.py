"""Does a refactor keep the RL recipe bit for bit? Runs a set of short training jobs with the code under `--src`
and records, for each, a SHA-256 of the final weights and of metrics.jsonl with the wall-clock fields dropped
(time_*, tokens_per_s). Run it once with the old code and once with the new, then compare:

    python bench/recipe_fingerprint.py --src /path/to/old/checkout/src --out /tmp/old.json
    python bench/recipe_fingerprint.py --src src --out /tmp/new.json
    python bench/recipe_fingerprint.py --compare /tmp/old.json /tmp/new.json      # exit 1 on any difference
    python bench/recipe_fingerprint.py --src src --out /tmp/main.json --case main   # the README's main job (minutes)
    python bench/recipe_fingerprint.py --src src --out /tmp/new.json --ignore zero_variance_group_fraction
                                          # a change that only adds logged keys: digest the records without them

The cases cover every optional stage of the recipe on the tiny random model (a few seconds each): GRPO, KL in the
loss and in the reward, a critic with GAE, TRPO, Monte-Carlo values (VinePPO), process rewards, several epochs
and minibatches, LoRA, tool episodes, gradient checkpointing, micro-batching without packing. `main` is the
README's main job itself (examples/main_arithmetic.yaml, about 6 minutes). Seeded runs on the same machine and
thread count repeat exactly; across CPUs the float results may differ, so compare runs from one machine.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# The tiny random model never answers right, so every advantage would be 0 and no weight would move: the tiny cases
# add a reward that varies between samples (the share of characters that are digits), registered before the run.
RUNNER = """import sys\nfrom llmrl.rewards import REWARDS\n@REWARDS.register("fingerprint_digits")\ndef _digits(completions, examples):\n    return [sum(ch.isdigit() for ch in c) / max(1, len(c)) for c in completions]\nfrom llmrl.cli import main\nsys.exit(main(sys.argv[1:]))\n"""
VARIED = "reward.terms=[{name: correct, weight: 1.0}, {name: fingerprint_digits, weight: 1.0}]"
TINY = ["model.name=tiny", "model.autocast=none", "task.heldout_size=8", "rollout.prompts_per_step=2",
        "rollout.group_size=4", "rollout.max_new_tokens=8", "run.steps=3", "run.eval_every=2", "run.progress=false",
        "run.threads=1", "run.samples_every=1", VARIED]
CASES: dict[str, list[str]] = {
    "grpo": ["examples/grpo_arithmetic.yaml", *TINY],
    "grpo_bf16": ["examples/grpo_arithmetic.yaml", *TINY, "model.autocast=bfloat16"],
    "reinforce_pp": ["examples/reinforce_pp_arithmetic.yaml", *TINY],
    "ppo": ["examples/ppo_arithmetic.yaml", *TINY],
    "ppo_shared": ["examples/ppo_arithmetic.yaml", *TINY, "critic.shared_trunk=true"],
    "trpo": ["examples/trpo_arithmetic.yaml", *TINY],
    "vineppo": ["examples/vineppo_arithmetic.yaml", *TINY, "credit.mc_samples=2"],
    "process": ["examples/grpo_arithmetic.yaml", *TINY, "credit.estimator=process", "credit.options={}",
                "credit.steps=regex", "credit.step_pattern='[=.]'", "credit.step_reward=equations"],
    "epochs": ["examples/grpo_arithmetic.yaml", *TINY, "objective.epochs=2", "objective.minibatches=2",
               "objective.early_stop_kl=0.5"],
    "lora": ["examples/grpo_arithmetic.yaml", *TINY, "model.lora_r=4"],
    "tools": ["examples/tool_arithmetic.yaml", *TINY, "rollout.max_turns=2"],
    "checkpointing": ["examples/grpo_arithmetic.yaml", *TINY, "model.gradient_checkpointing=true"],
    "unpacked": ["examples/dr_grpo_arithmetic.yaml", *TINY, "optim.packing=false", "optim.micro_batch_size=3"],
    "entropy": ["examples/rloo_arithmetic.yaml", *TINY, "objective.entropy_coef=0.01", "optim.schedule=cosine",
                "optim.warmup_steps=1"],
}
MAIN = {"main": ["examples/main_arithmetic.yaml", "run.progress=false"]}
WALL_CLOCK = ("time_", "tokens_per_s", "mc_time", "trpo_time")


def metrics_digest(path: Path, ignore: tuple[str, ...] = ()) -> str:
    """SHA-256 of metrics.jsonl, every record without its wall-clock fields (and the `ignore`d keys)."""
    h = hashlib.sha256()
    for line in path.read_text().splitlines():
        rec = {k: v for k, v in json.loads(line).items() if not k.startswith(WALL_CLOCK) and k not in ignore}
        h.update(json.dumps(rec, sort_keys=True).encode())
    return h.hexdigest()


def weights_digest(folder: Path) -> str:
    """SHA-256 over the final checkpoint's tensors, by name (the file's metadata aside)."""
    from safetensors.torch import load_file
    h = hashlib.sha256()
    for f in sorted(folder.glob("*.safetensors")):
        tensors = load_file(f)
        for name in sorted(tensors):
            h.update(name.encode())
            h.update(tensors[name].contiguous().view(-1).view(dtype=__import__("torch").uint8).numpy().tobytes())
    return h.hexdigest()


def run_case(name: str, args: list[str], src: Path, out_dir: Path, ignore: tuple[str, ...] = ()) -> dict:
    env = {**os.environ, "PYTHONPATH": str(src.resolve())}
    cmd = [sys.executable, "-c", RUNNER, "train", *args, f"run.name={name}", f"run.output_dir={out_dir}"]
    proc = subprocess.run(cmd, cwd=src.resolve().parent, env=env, capture_output=True, text=True)
    if proc.returncode:
        return {"error": proc.stderr[-2000:]}
    run = out_dir / name
    return {"metrics": metrics_digest(run / "metrics.jsonl", ignore), "weights": weights_digest(run / "final")}


def compare(a: dict, b: dict) -> int:
    bad = 0
    for name in sorted(set(a) | set(b)):
        same = a.get(name) == b.get(name) and "error" not in a.get(name, {})
        bad += not same
        print(f"{name:14s} {'same' if same else 'DIFFERENT'}" + ("" if same else f"\n  {a.get(name)}\n  {b.get(name)}"))
    return 1 if bad else 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--src", type=Path, help="the src/ folder whose llmrl to run")
    ap.add_argument("--out", type=Path, help="write the fingerprints here (JSON)")
    ap.add_argument("--case", action="append", help="only these cases (repeat); 'main' = the README's main job")
    ap.add_argument("--compare", nargs=2, type=Path, metavar=("A", "B"))
    ap.add_argument("--ignore", action="append", default=[], help="a metrics key left out of the digest (repeat)")
    args = ap.parse_args()
    if args.compare:
        return compare(*(json.loads(p.read_text()) for p in args.compare))
    cases = {**CASES, **MAIN}
    names = args.case or list(CASES)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            results[name] = run_case(name, cases[name], args.src, Path(tmp), tuple(args.ignore))
            print(name, json.dumps(results[name])[:200], flush=True)
    args.out.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
