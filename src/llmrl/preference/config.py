"""Typed config of the preference recipes (`llmrl dpo`, `llmrl rm`): YAML plus dotted overrides, as `llmrl.config`.

    cfg = load_preference_config("examples/dpo_arithmetic.yaml", ["preference.beta=0.2", "lora=null"])

Sections: model, task, preference, lora, optim, run (model, task, optim and run are the RL config's own
classes). `task` is optional: it names where pairs are built from (when no `preference.data_path` is given)
and the task whose held-out accuracy is measured before and after. `lora: null` means full fine-tuning.
Precedence: overrides > file > defaults; every error names the full dotted key.
"""

from __future__ import annotations

import copy
import typing
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Mapping, Sequence

from llmrl.config import (
    ConfigError,
    ModelConfig,
    OptimConfig,
    RunConfig,
    TaskConfig,
    _convert,
    _default,
    _parse_override,
    _read_yaml,
    _unknown,
    config_to_dict,
    f,
)


@dataclass
class PreferenceConfig:
    data_path: str | None = f(None, "JSONL of {prompt, chosen, rejected} pairs (null = build pairs from `task`)")
    heldout_path: str | None = f(None, "JSONL of held-out pairs (null = hold out heldout_fraction of the prompts)")
    heldout_fraction: float = f(0.1, "fraction of prompts whose pairs are held out when heldout_path is null",
                                ge=0, lt=1)
    build_prompts: int = f(256, "building from a task: training prompts to sample", ge=1)
    build_samples_per_prompt: int = f(8, "building from a task: completions sampled per prompt", ge=2)
    build_pairs_per_prompt: int = f(1, "building from a task: distinct (passing, failing) pairs kept per prompt, "
                                    "at most passing x failing; held-out pairs are split off by prompt", ge=1)
    build_temperature: float = f(1.0, "building from a task: sampling temperature", gt=0)
    build_max_new_tokens: int = f(64, "building from a task: maximum tokens per completion", ge=1)
    kind: str = f("dpo", "DPO loss: dpo (sigmoid; with label_smoothing > 0, conservative DPO) | ipo",
                  choices=("dpo", "ipo"))
    beta: float = f(0.1, "DPO's beta (KL strength; IPO's tau): the implicit reward is beta * log(pi / pi_ref)", gt=0)
    label_smoothing: float = f(0.0, "conservative DPO: assumed probability that a label is flipped", ge=0, lt=0.5)
    per_token_mean: bool | None = f(None, "average log-probs over response tokens (null = true for ipo, as TRL; "
                                          "false for dpo, as the paper)")
    epochs: int = f(1, "passes over the training pairs (run.steps > 0 caps the optimizer steps)", ge=1)
    batch_size: int = f(16, "pairs per optimizer step (split into micro-batches of optim.micro_batch_size pairs)",
                        ge=1)
    max_length: int | None = f(None, "prompt + response tokens; longer responses are cut (null = model context)",
                               ge=2)


@dataclass
class LoraConfig:
    r: int = f(16, "LoRA rank", ge=1)
    alpha: float = f(32.0, "LoRA alpha (the update is scaled by alpha / r)", gt=0)
    dropout: float = f(0.0, "dropout on the LoRA input", ge=0, lt=1)
    target_modules: list[str] | None = f(None, "module names to adapt (null = every linear layer but the head)")


@dataclass
class PreferenceTrainConfig:
    model: ModelConfig = f(ModelConfig(), "policy model (for `rm`: the causal LM the reward model starts from)")
    task: TaskConfig | None = f(None, "task to build pairs from and to measure held-out accuracy on (null = none)")
    preference: PreferenceConfig = f(PreferenceConfig(), "pairs and the preference loss")
    lora: LoraConfig | None = f(LoraConfig(), "LoRA adapter; the reference is the model with it disabled "
                                              "(null = full fine-tuning against a frozen copy)")
    optim: OptimConfig = f(OptimConfig(lr=5e-6, micro_batch_size=4), "optimizer (micro_batch_size counts pairs)")
    run: RunConfig = f(RunConfig(name="dpo", steps=0, eval_every=0), "run bookkeeping (steps: cap on optimizer "
                                                                      "steps, 0 = no cap)")


SECTIONS: dict[str, type] = {k: typing.get_args(v)[0] if typing.get_args(v) else v
                             for k, v in typing.get_type_hints(PreferenceTrainConfig).items()}


def load_preference_config(path: str | Path | None, overrides: Sequence[str] = ()) -> PreferenceTrainConfig:
    """Defaults <- YAML file <- `section.key=value` overrides, validated."""
    merged: dict[str, Any] = {}
    file_data = _read_yaml(Path(path)) if path is not None else {}
    for key_path, value in [((k,), v) for k, v in file_data.items()] + [_parse_override(o) for o in overrides]:
        _set(merged, key_path, value)
    return preference_config_from_dict(merged)


def preference_config_from_dict(data: Mapping[str, Any]) -> PreferenceTrainConfig:
    """Build and validate a PreferenceTrainConfig from a (possibly partial) mapping of sections."""
    defaults = {fd.name: _default(fd) for fd in fields(PreferenceTrainConfig)}
    # A section given as a mapping changes only the keys it names, like the RL config.
    full = {k: (config_to_dict(defaults.get(k)) or {}) | v if isinstance(v, Mapping) else v for k, v in data.items()}
    cfg = _convert(full, PreferenceTrainConfig, "")
    p = cfg.preference
    if p.data_path is None and cfg.task is None:
        raise ConfigError("preference.data_path is required unless `task` names a task to build pairs from")
    if cfg.task is not None and cfg.task.name == "jsonl" and not cfg.task.train_path:
        raise ConfigError("task.train_path is required when task.name is 'jsonl'")
    if p.kind == "ipo" and p.label_smoothing:
        raise ConfigError("preference.label_smoothing applies to preference.kind 'dpo' only")
    if cfg.run.resume == "must":
        raise ConfigError("run.resume=must: only `llmrl train` runs resume; dpo and rm runs start over")
    return cfg


def _set(merged: dict, path: tuple[str, ...], value: Any) -> None:
    """Set one dotted key; `section=<mapping>` sets each key it names; `task=null` / `lora=null` clears a section."""
    section, rest = path[0], path[1:]
    if section not in SECTIONS:
        raise _unknown(str(section), "", list(SECTIONS))
    if not rest:
        if value is None:
            merged[section] = None
            return
        if not isinstance(value, Mapping):
            raise ConfigError(f"{section} must be a mapping of keys{' or null' if section in ('task', 'lora') else ''}"
                              f", got {value!r}")
        for key, v in value.items():
            _set(merged, (section, key), copy.deepcopy(v))
        return
    if merged.get(section) is None:
        merged[section] = {}
    target = merged[section]
    fds = {fd.name: fd for fd in fields(SECTIONS[section])}
    if rest[0] not in fds:
        raise _unknown(f"{section}.{rest[0]}", section, list(fds))
    for depth, part in enumerate(rest[:-1]):     # a dotted path into a dict-valued field, e.g. task.options.digits
        if depth == 0 and part not in target:
            target[part] = copy.deepcopy(_default(fds[part]))
        target = target.setdefault(part, {})
        if not isinstance(target, dict):
            raise ConfigError(f"cannot set {'.'.join(path)!r}: {'.'.join(path[:depth + 2])!r} is not a mapping")
    target[rest[-1]] = value
