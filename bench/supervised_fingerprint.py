"""Fingerprints of five small supervised runs on the tiny model (DPO with LoRA, IPO with full fine-tuning, reward model
full and LoRA, process reward model): a hash of each run's final weights and of its metrics.jsonl (times aside).

Run it on two checkouts with the same warm model cache to check that a change keeps every number:

    LLMRL_CACHE=/tmp/fp-cache PYTHONPATH=OLD/src python bench/supervised_fingerprint.py /tmp/fp-old
    LLMRL_CACHE=/tmp/fp-cache PYTHONPATH=NEW/src python bench/supervised_fingerprint.py /tmp/fp-new

Each run crosses epochs, accumulates micro-batches, follows a cosine schedule and evaluates mid-run. One thread.
"""

from __future__ import annotations

import hashlib
import json
import random
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from llmrl.cli import main as llmrl


def write_data(out: Path) -> tuple[Path, Path]:
    pairs = out / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": f"What is {i} + {i}?", "chosen": str(2 * i),
                                         "rejected": str(2 * i + 1)}) + "\n" for i in range(10)))
    rng, rows = random.Random(0), []
    for i in range(12):
        steps = ["".join(rng.choice("abcz") for _ in range(4)) + " " for _ in range(rng.randint(2, 3))]
        rows.append({"prompt": f"q{i}", "steps": steps, "labels": [float("z" in s) for s in steps]})
    labels = out / "steps.jsonl"
    labels.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return pairs, labels


def runs(out: Path) -> dict[str, list[str]]:
    pairs, labels = write_data(out)
    common = ["model.name=tiny", "model.autocast=none", "run.progress=false", "run.threads=1",
              "run.tensorboard=false", f"run.output_dir={out}", "optim.lr=1e-2", "optim.schedule=cosine"]
    pref = [f"preference.data_path={pairs}", "preference.batch_size=3", "preference.heldout_fraction=0.3",
            "optim.micro_batch_size=2", "preference.epochs=2"]
    return {
        "dpo_lora": ["dpo", *common, *pref, "lora.r=4", "run.name=dpo_lora", "run.eval_every=2"],
        "ipo_full": ["dpo", *common, *pref, "lora=null", "preference.kind=ipo", "run.name=ipo_full"],
        "rm": ["rm", *common, *pref, "lora=null", "run.name=rm", "run.eval_every=2"],
        "rm_lora": ["rm", *common, *pref, "lora.r=2", "run.name=rm_lora"],
        "prm": ["prm", *common, f"prm.data_path={labels}", "prm.batch_size=4", "optim.micro_batch_size=3",
                "prm.heldout_fraction=0.25", "prm.epochs=2", "run.name=prm", "run.eval_every=2"],
    }


def fingerprint(run_dir: Path) -> tuple[str, str]:
    weights = load_file(run_dir / "final" / "model.safetensors")
    w = hashlib.sha256(b"".join(weights[k].numpy().tobytes() for k in sorted(weights))).hexdigest()[:16]
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    records = [{k: v for k, v in r.items() if not k.startswith("time_")} for r in records]
    return w, hashlib.sha256(json.dumps(records, sort_keys=True).encode()).hexdigest()[:16]


def main() -> None:
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/supervised_fingerprint")
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    for name, args in runs(out).items():
        assert llmrl(args) == 0, name
        w, m = fingerprint(out / name)
        print(f"{name:9s} weights {w}  metrics {m}", flush=True)


if __name__ == "__main__":
    main()
