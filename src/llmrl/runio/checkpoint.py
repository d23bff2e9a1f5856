"""Resumable training state: written every `run.save_every` steps, read back so that a killed run continues exactly.

    RUN_DIR/checkpoints/step-000010/
        model.pt         the policy's trainable parameters by name (all of them; with LoRA, the adapter's)
        optimizer.pt     the optimizer's and the LR scheduler's state dicts
        critic.pt        the critic's trainable parameters and its optimizer (only with a critic)
        rng.pt           python `random`, torch's global CPU RNG, the recipe's torch.Generator, numpy's global RNG
        state.json       step, the KL controller (beta; RL only), sampling's state (RL only: the batches drawn, the
                         curriculum pool), the evaluations so far
        metrics.jsonl    RUN_DIR's metrics.jsonl and samples.jsonl (RL) as they were at this step: resuming puts them
        samples.jsonl    back, so no record is duplicated or lost
        config.yaml      the resolved config; resuming refuses one that differs in anything but CONTINUABLE keys

Atomic: every file goes into `.step-000010.tmp-XXXX/` beside the final folder and is fsynced, then the folder is
renamed into place and the parent fsynced. So a folder named `step-NNNNNN` is always complete, and a crash (even
SIGKILL) mid-write leaves only a temporary folder, which `latest` ignores and removes (the next run calls it). The
last `run.keep_checkpoints` are kept; an older one is renamed away before it is deleted, for the same reason.

Every trainer uses it: RL (`train/rl.py`) and the supervised loop of DPO, reward and process reward models
(`train/supervised.py`). Data position: RL counts the batches of `rollout.prompts_per_step` examples it drew from
the task's seeded train stream (dynamic sampling draws more than one a step), and a resumed run recreates the
stream and skips that many; the supervised loop draws one batch of a seeded shuffle per step and skips k.
Exactness: with the same threads and fp32 on CPU, a resumed run ends with bitwise the same weights as one that was
never stopped (tests/runio/test_resume.py). Evaluations are greedy and draw no random numbers; nothing else does between
the checkpoint and the next step.

Under torchrun (DDP: every rank holds the same weights and optimizer state) rank 0 writes, with every rank's
sampling generator in rng.pt; every rank reads (the run folder must be on a filesystem all nodes see), takes its
own generator and only rank 0 puts the logs back. A run resumes with as many processes as wrote the checkpoint.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import yaml

from llmrl.config import config_to_dict
from llmrl.distributed import runtime as D

log = logging.getLogger("llmrl.train")

CONTINUABLE = ("run.steps", "run.time_limit_minutes", "run.resume", "run.progress")   # may differ on resume
LOGS = ("metrics.jsonl", "samples.jsonl")
_NAME = re.compile(r"step-(\d+)")


@dataclass
class TrainingState:
    """The recipe's live objects that a checkpoint saves and restores (in place)."""
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any                      # an LR scheduler
    generator: torch.Generator          # the recipe's sampling / shuffling generator
    beta: Any = None                    # RL: FixedKLController | AdaptiveKLController
    critic: torch.nn.Module | None = None
    critic_optimizer: torch.optim.Optimizer | None = None
    sampling: Any = None                # RL: the batches drawn and the curriculum pool (train/sampling.py)


# ----------------------------------------------------------------------------- finding one

def checkpoints_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def latest(run_dir: Path) -> Path | None:
    """The newest complete checkpoint of the run (temporary folders of crashed writes are removed), or None."""
    root = checkpoints_dir(run_dir)
    if not root.is_dir():
        return None
    _sweep(root)
    done = [p for p in root.iterdir() if p.is_dir() and _NAME.fullmatch(p.name)]
    return max(done, key=lambda p: int(p.name[5:]), default=None)


def resume_point(cfg, *, check_steps: bool = True) -> Path | None:
    """The checkpoint `cfg` continues from, by `run.resume` (never | auto | must), or None to start fresh.

    Called before the run folder is touched. Raises ValueError when `must` finds none, when the checkpoint's
    config differs from `cfg` in anything but CONTINUABLE keys (the message lists them), or (check_steps) when its
    step is past run.steps (the supervised loop knows its last step only once its data is read, and checks then).
    `never` removes the checkpoints of an earlier run in the folder (its metrics are about to be overwritten too)."""
    run_dir = Path(cfg.run.output_dir) / cfg.run.name
    root = checkpoints_dir(run_dir)
    if cfg.run.resume == "never":
        if root.exists():
            log.warning("run.resume=never: removing the checkpoints of an earlier run in %s", root)
            _remove(root)
        return None
    found = latest(run_dir)
    if found is None:
        if cfg.run.resume == "must":
            raise ValueError(f"nothing to resume: no checkpoint in {root} (checkpoints are written every "
                             "run.save_every steps)")
        return None
    changed = config_changes(yaml.safe_load((found / "config.yaml").read_text()), _plain(cfg), _plain(type(cfg)()))
    if changed:
        raise ValueError(f"cannot resume from {found}: the config differs from the checkpoint's in "
                         f"{', '.join(changed)}. Only {', '.join(CONTINUABLE)} may change; to start over instead, "
                         "set run.resume=never (removes the checkpoints) or choose another run.name")
    step = json.loads((found / "state.json").read_text())["step"]
    if check_steps and step > cfg.run.steps:
        raise ValueError(f"cannot resume from {found}: it is past run.steps={cfg.run.steps}")
    log.info("resuming from %s", found)
    return found


def config_changes(saved: dict, new: dict, defaults: dict | None = None) -> list[str]:
    """'key: old -> new' for every dotted key whose value differs, CONTINUABLE keys aside. A key the saved config
    lacks (a field added to llmrl since) counts as its value in `defaults`."""
    defaults = defaults or {}
    filled = defaults | saved | {k: v | saved[k] for k, v in defaults.items()       # sections: field by field
                                 if isinstance(v, dict) and isinstance(saved.get(k), dict)}
    a, b = _flatten(filled), _flatten(new)
    return [f"{k}: {a.get(k, '(absent)')!r} -> {b.get(k, '(absent)')!r}" for k in sorted(a.keys() | b.keys())
            if k not in CONTINUABLE and a.get(k, _ABSENT) != b.get(k, _ABSENT)]


_ABSENT = object()


def _flatten(d: dict, prefix: str = "") -> dict:
    """{"a": {"b": 1, "c": {}}} -> {"a.b": 1, "a.c": {}}; lists stay whole."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out |= _flatten(v, f"{prefix}{k}.")
        else:
            out[f"{prefix}{k}"] = v
    return out


def _plain(cfg) -> dict:
    """The config as it reads back from YAML (the form a checkpoint stores)."""
    return yaml.safe_load(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))


# ----------------------------------------------------------------------------- saving

def save(run_dir: Path, step: int, state: TrainingState, evals: list[dict], *, keep: int) -> Path:
    """Write the full training state after `step` atomically to RUN_DIR/checkpoints/step-NNNNNN; keep the last
    `keep`. `evals` are the recipe's evaluation records so far (without samples). Under torchrun every rank calls
    it (their generators are gathered) and rank 0 writes."""
    rank_generators = D.gather_objects(state.generator.get_state()) if D.world() > 1 else None
    root = checkpoints_dir(run_dir)
    if not D.is_main():
        return root / f"step-{step:06d}"
    root.mkdir(parents=True, exist_ok=True)
    target = root / f"step-{step:06d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=root))
    os.chmod(tmp, 0o755)
    try:
        config = (Path(run_dir) / "config.yaml").read_bytes()          # the resolved config, as start_run wrote it
        _write(tmp / "config.yaml", lambda f: f.write(config))
        _write(tmp / "model.pt", lambda f: torch.save(_trainable(state.model), f))
        _write(tmp / "optimizer.pt", lambda f: torch.save(
            {"optimizer": state.optimizer.state_dict(), "scheduler": state.scheduler.state_dict()}, f))
        if state.critic is not None:
            _write(tmp / "critic.pt", lambda f: torch.save(
                {"critic": _trainable(state.critic), "optimizer": state.critic_optimizer.state_dict()}, f))
        rng = _rng_states(state.generator) | ({"rank_generators": rank_generators} if rank_generators else {})
        _write(tmp / "rng.pt", lambda f: torch.save(rng, f))
        for name in LOGS:
            src = Path(run_dir) / name
            if src.exists():
                data = src.read_bytes()
                _write(tmp / name, lambda f: f.write(data))
        meta = {"step": step,
                **({"beta": state.beta.state_dict()} if state.beta is not None else {}),
                **({"sampling": state.sampling.state_dict()} if state.sampling is not None else {}),
                "evals": [{k: v for k, v in e.items() if k != "samples"} for e in evals]}
        _write(tmp / "state.json", lambda f: f.write(json.dumps(meta, indent=1).encode()))
        _fsync(tmp)
        if target.exists():                      # only when a step is saved twice; never the one resumed from
            _remove(target)
        os.replace(tmp, target)
        _fsync(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    done = sorted((p for p in root.iterdir() if p.is_dir() and _NAME.fullmatch(p.name)), key=lambda p: p.name)
    for old in done[:-keep]:
        _remove(old)
    return target


def _write(path: Path, fill: Callable) -> None:
    with open(path, "wb") as f:
        fill(f)
        f.flush()
        os.fsync(f.fileno())


def _fsync(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove(folder: Path) -> None:
    """Rename away first (atomic), then delete: a crash mid-delete never leaves a partial folder under its name."""
    doomed = folder.with_name(f".{folder.name}.tmp-del-{uuid.uuid4().hex[:8]}")
    os.replace(folder, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def _sweep(root: Path) -> None:
    for tmp in root.glob(".*.tmp-*"):
        log.info("removing %s, left by an interrupted checkpoint write", tmp.name)
        shutil.rmtree(tmp, ignore_errors=True)


def _trainable(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach() for n, p in module.named_parameters() if p.requires_grad}


def _rng_states(generator: torch.Generator) -> dict:
    states = {"python": random.getstate(), "torch": torch.get_rng_state(), "generator": generator.get_state()}
    try:
        import numpy as np
    except ImportError:
        return states
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return states | {"numpy": [kind, keys.tolist(), pos, has_gauss, cached]}


# ----------------------------------------------------------------------------- restoring

def restore(path: Path, state: TrainingState, run_dir: Path) -> tuple[int, list[dict]]:
    """Load the checkpoint at `path` into `state` (in place) and put RUN_DIR's logs back as they were at its step.
    Returns (step, evaluation records so far). Call it last in setup: it sets the global RNGs."""
    path = Path(path)
    meta = json.loads((path / "state.json").read_text())
    _load_trainable(state.model, torch.load(path / "model.pt", weights_only=True, map_location="cpu"), "policy")
    opt = torch.load(path / "optimizer.pt", weights_only=True, map_location="cpu")
    state.optimizer.load_state_dict(opt["optimizer"])
    state.scheduler.load_state_dict(opt["scheduler"])
    if (state.critic is None) != (not (path / "critic.pt").exists()):
        raise ValueError(f"{path}: the checkpoint {'has' if state.critic is None else 'lacks'} a critic")
    if state.critic is not None:
        saved = torch.load(path / "critic.pt", weights_only=True, map_location="cpu")
        _load_trainable(state.critic, saved["critic"], "critic")
        state.critic_optimizer.load_state_dict(saved["optimizer"])
    if state.beta is not None:
        state.beta.load_state_dict(meta["beta"])
    if state.sampling is not None:      # a checkpoint from before the sampling state: one batch a step, no pool
        state.sampling.load_state_dict(meta.get("sampling", {"batches_drawn": meta["step"], "pass_rates": []}))
    rng = torch.load(path / "rng.pt", weights_only=True, map_location="cpu")
    if D.world() > 1:                           # this rank's own sampling generator
        written = len(rng.get("rank_generators", [None]))
        if written != D.world():
            raise ValueError(f"{path} was written by {written} process(es); resume it with as many, not {D.world()}")
        rng["generator"] = rng["rank_generators"][D.rank()]
    for name in LOGS if D.is_main() else ():    # back to this step: records written after it are dropped
        if not (path / name).exists():
            continue
        tmp = Path(run_dir) / f".{name}.tmp-{uuid.uuid4().hex[:8]}"
        shutil.copyfile(path / name, tmp)
        os.replace(tmp, Path(run_dir) / name)
    _set_rng_states(rng, state.generator)
    return meta["step"], meta["evals"]


def _load_trainable(module: torch.nn.Module, saved: dict[str, torch.Tensor], what: str) -> None:
    params = {n: p for n, p in module.named_parameters() if p.requires_grad}
    if params.keys() != saved.keys():
        missing, extra = sorted(params.keys() - saved.keys()), sorted(saved.keys() - params.keys())
        raise ValueError(f"checkpoint does not fit the {what}: missing {missing[:5]}, unexpected {extra[:5]}")
    with torch.no_grad():
        for n, p in params.items():
            if p.shape != saved[n].shape:
                raise ValueError(f"checkpoint does not fit the {what}: {n} is {tuple(saved[n].shape)}, "
                                 f"the model's {tuple(p.shape)}")
            p.copy_(saved[n])


def _set_rng_states(states: dict, generator: torch.Generator) -> None:
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    torch.set_rng_state(states["torch"])
    generator.set_state(states["generator"])
    if "numpy" in states:
        import numpy as np
        kind, keys, pos, has_gauss, cached = states["numpy"]
        np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
