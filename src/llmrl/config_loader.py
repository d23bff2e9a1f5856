"""The one loader of every command's config, `load_config`: YAML plus dotted overrides, into a typed schema
(config.py for `llmrl train`, config_supervised.py for dpo, rm, prm, sft and rft).

    cfg = load_config("run.yaml", ["rollout.group_size=8", "optim.lr=3e-6", "task.options.digits=3"])   # train
    cfg = load_config("dpo.yaml", ["preference.beta=0.2", "lora=null"], schema=PreferenceTrainConfig)   # dpo, rm
    save_config(cfg, "run/config.yaml")                        # load_config of it gives back an equal config

Precedence: overrides > file (after the files it `extends:`) > preset (train only) > the schema's defaults. A
section in a file (or preset) changes only the keys it names; a value, a dict such as `task.options` included, is
replaced whole, so use a dotted override (`task.options.digits=3`) to change one entry. A section that may be null
(`task`, `lora` of the supervised commands) is cleared by `task=null`. The right-hand side of an override is YAML.
Everything is checked at load (each schema's `check()` adds its cross-field rules), and every error names the full
dotted key.
"""

from __future__ import annotations

import copy
from dataclasses import fields
from pathlib import Path
from typing import Any, Mapping, Sequence

import yaml

from llmrl.config import TrainConfig
from llmrl.typed import (ConfigError, _convert, _default, _not_one_of, _nullable, _unknown, config_to_dict,
                         sections)


def load_config(path: str | Path | None, overrides: Sequence[str] = (),
                presets: Mapping[str, Mapping[str, Any]] | None = None, *, schema: type = TrainConfig):
    """Defaults <- preset <- YAML file (after the files it `extends`) <- `section.key=value` overrides, validated,
    as an instance of `schema`: TrainConfig (`llmrl train`), PreferenceTrainConfig (dpo, rm), PrmTrainConfig (prm).
    Only a schema with a `preset` field takes presets."""
    file_layers = _read_with_bases(Path(path)) if path is not None else [{}]
    parsed = [_parse_override(o) for o in overrides]
    merged = _layered(schema, file_layers, parsed)
    name = merged.get("preset")
    # A saved config gives every value, so its preset changes nothing and needs no preset table.
    if name is not None and not (presets is None and _complete(schema, merged)):
        if not isinstance(name, str):
            raise ConfigError(f"preset must be a string or null, got {name!r}")
        if presets is None or name not in presets:
            raise ConfigError(_not_one_of("preset", name, sorted(presets or ())))
        preset = {k: v for k, v in presets[name].items() if k != "preset"}
        merged = _layered(schema, [preset, *file_layers], parsed)
        merged["preset"] = name
    return config_from_dict(merged, schema)


def _read_with_bases(path: Path, seen: tuple = ()) -> list[dict]:
    """The file's mapping, preceded by those of the files it names in `extends:` (relative to it), base first."""
    if path.resolve() in seen:
        raise ConfigError(f"config files extend each other in a loop: {' -> '.join(str(p) for p in (*seen, path))}")
    data = _read_yaml(path)
    base = data.pop("extends", None)
    if base is None:
        return [data]
    if not isinstance(base, str):
        raise ConfigError(f"{path}: extends must be a file path, got {base!r}")
    base_path = path.parent / base
    if not base_path.exists():
        raise ConfigError(f"{path}: extends {base!r}, which does not exist ({base_path})")
    return [*_read_with_bases(base_path, (*seen, path.resolve())), data]


def config_from_dict(data: Mapping[str, Any], schema: type = TrainConfig):
    """Build and validate a `schema` config from a (possibly partial) mapping of sections; no presets. A section
    given as a mapping changes only the keys it names, on top of the schema's own default for that section."""
    defaults = {fd.name: _default(fd) for fd in fields(schema)}
    full = {k: (config_to_dict(defaults.get(k)) or {}) | v if isinstance(v, Mapping) else v for k, v in data.items()}
    cfg = _convert(full, schema, "")
    cfg.check()
    return cfg


def save_config(cfg: TrainConfig, path: str | Path) -> Path:
    """Write the full config as YAML; `load_config(path)` gives back an equal TrainConfig."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
    return path


# ----------------------------------------------------------------------------- helpers


def _read_yaml(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as e:
        raise ConfigError(f"cannot read config file '{path}': {e.strerror}") from e
    except yaml.YAMLError as e:
        raise ConfigError(f"config file '{path}' is not valid YAML: {e}") from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file '{path}' must hold a mapping of sections (model:, rollout:, ...), "
                          f"got {type(data).__name__}")
    return data


def _parse_override(text: str) -> tuple[tuple[str, ...], Any]:
    key, sep, rhs = text.partition("=")
    path = tuple(key.strip().split("."))
    if not sep or not all(path):
        raise ConfigError(f"override {text!r} must look like section.key=value, e.g. rollout.group_size=8")
    try:
        return path, yaml.safe_load(rhs)
    except yaml.YAMLError as e:
        raise ConfigError(f"override {text!r}: the value is not valid YAML: {e}") from e


def _layered(schema: type, layers: list[Mapping], overrides: list[tuple[tuple[str, ...], Any]]) -> dict:
    """Apply layers (mappings of sections) then overrides to an empty raw mapping, later ones winning."""
    merged: dict[str, Any] = {}
    for path, value in [((k,), v) for layer in layers for k, v in layer.items()] + overrides:
        _set(schema, merged, path, value)
    return merged


def _set(schema: type, merged: dict, path: tuple[str, ...], value: Any) -> None:
    """Set one dotted key; `section=<mapping>` sets each key it names, leaving the others; `section=null` clears a
    section that may be null (and leaves any other as it is)."""
    section, rest = path[0], path[1:]
    known = sections(schema)
    has_preset = "preset" in {fd.name for fd in fields(schema)}
    if has_preset and section == "preset":
        if rest:
            raise ConfigError(f"cannot set {'.'.join(path)!r}: preset takes a name, e.g. preset=NAME")
        merged["preset"] = value
        return
    if section not in known:
        raise _unknown(str(section), "", ["preset", *known] if has_preset else list(known))
    nullable = _nullable(schema, section)
    if not rest:
        if value is None:
            if nullable:
                merged[section] = None
            return
        if not isinstance(value, Mapping):
            raise ConfigError(f"{section} must be a mapping of keys{' or null' if nullable else ''}, got {value!r}")
        for key, v in value.items():
            _set(schema, merged, (section, key), copy.deepcopy(v))
        return
    if merged.get(section) is None:
        merged[section] = {}
    target = merged[section]
    fds = {fd.name: fd for fd in fields(known[section])}
    if rest[0] not in fds:
        raise _unknown(f"{section}.{rest[0]}", section, list(fds))
    for depth, part in enumerate(rest[:-1]):     # a dotted path into a dict-valued field, e.g. task.options.digits
        if depth == 0 and part not in target:
            target[part] = _default(fds[part])
        target = target.setdefault(part, {})
        if not isinstance(target, dict):
            raise ConfigError(f"cannot set {'.'.join(path)!r}: {'.'.join(path[:depth + 2])!r} is not a mapping")
    target[rest[-1]] = value


def _complete(schema: type, merged: Mapping) -> bool:
    """Every section given in full (a section that may be null counts when it is given as null)."""
    return all((isinstance(merged.get(s), dict) and all(fd.name in merged[s] for fd in fields(cls)))
               or (s in merged and merged[s] is None and _nullable(schema, s))
               for s, cls in sections(schema).items())
