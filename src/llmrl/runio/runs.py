"""What every training recipe (RL, DPO, reward models) does to start and to save a run."""

from __future__ import annotations

import random
from pathlib import Path

import torch
import yaml

from llmrl.config import config_to_dict
from llmrl.models import save_pretrained_model
from llmrl.models.lora import merged_copy
from llmrl.distributed import runtime as D
from llmrl.compute.heap import retain_heap
from llmrl.compute.settings import choices, resolve_device


def seed_everything(seed: int) -> torch.Generator:
    random.seed(seed)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def start_run(cfg) -> tuple[Path, str, torch.Generator]:
    """Threads, the allocator (compute/heap.py), seeds, the run folder `run.output_dir/run.name` with its
    config.yaml (written by rank 0).
    Returns (run_dir, the resolved config as YAML, a seeded torch generator: under torchrun seeded per rank,
    so that ranks draw different samples; the global seeds, and so any initialisation, are the same)."""
    if cfg.run.threads:
        torch.set_num_threads(cfg.run.threads)
    if cfg.run.retain_heap and choices(resolve_device(getattr(cfg.run, "device", "cpu"))).retain_heap:
        retain_heap()          # host tensors only: on a GPU the step's big tensors are not in this heap
    generator = seed_everything(cfg.run.seed)
    if D.rank():
        generator.manual_seed(cfg.run.seed + D.rank())
    run_dir = Path(cfg.run.output_dir) / cfg.run.name
    config_yaml = yaml.safe_dump(config_to_dict(cfg), sort_keys=False)
    if D.is_main():
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(config_yaml)
    return run_dir, config_yaml, generator


def save_checkpoint(model, tokenizer, path: Path, config_yaml: str) -> Path:
    """save_pretrained (written atomically: a temporary folder, then renamed; a LoRA adapter merged in) plus the
    resolved config beside it. Under torchrun every rank calls it and rank 0 writes (FSDP: gathered weights)."""
    from llmrl.distributed.parallel import full_model

    model = full_model(model)
    if model is None:
        return path
    save_pretrained_model(merged_copy(model), tokenizer, path)
    (path / "llmrl_config.yaml").write_text(config_yaml)
    return path
