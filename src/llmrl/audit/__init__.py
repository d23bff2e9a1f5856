"""`llmrl audit RUN_DIR`: reward-hacking and training-health detectors over a run folder, gateable in CI.

    findings = audit_run("runs/main_arithmetic")                       # every detector, default thresholds
    findings = audit_run(run_dir, {"length_drift": {"max_ratio": 2}})  # a threshold changed
    findings = audit_run(run_dir, {"duplicate_completions": {"enabled": False}})

The detectors (`llmrl.audit.detectors`, the `DETECTORS` registry) read `metrics.jsonl`, `samples.jsonl` and the
reward weights in `config.yaml`. Thresholds come from a YAML file (`--config`, one mapping per detector, as
above) and `--set detector.option=value` flags; an unknown detector or option is an error that lists the valid
ones. The command prints each finding with the step where it starts, writes `RUN_DIR/audit.json` and the run's
report (which shows the findings), and exits 1 when there is a finding (0 with `--warn-only`), 2 on bad input.
"""

from __future__ import annotations

import inspect
import json
import os
import sys
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping, Sequence

import yaml

from llmrl.audit.detectors import DETECTORS, Finding, RunData

__all__ = ["DETECTORS", "Finding", "RunData", "audit_run", "load_run", "resolve_options", "add_subcommand"]


def _rows(path: Path) -> list[dict]:
    from llmrl.report.html import read_jsonl

    return read_jsonl(path)[0] if path.is_file() else []


def _weights(config_path: Path) -> dict[str, float]:
    """Reward term name -> weight from a run's config.yaml (empty when it has none)."""
    try:
        cfg = yaml.safe_load(config_path.read_text()) if config_path.is_file() else None
    except yaml.YAMLError:
        return {}
    terms = ((cfg or {}).get("reward") or {}).get("terms") if isinstance(cfg, dict) else None
    return {str(t["name"]): float(t.get("weight", 1.0)) for t in terms or []
            if isinstance(t, dict) and "name" in t and isinstance(t.get("weight", 1.0), (int, float))}


def load_run(run_dir: str | Path) -> RunData:
    """A run folder's records: metrics.jsonl (required), samples.jsonl and config.yaml (optional)."""
    run_dir = Path(run_dir)
    if not (run_dir / "metrics.jsonl").is_file():
        raise FileNotFoundError(f"{run_dir} has no metrics.jsonl: not a run folder written by `llmrl train`")
    metrics = _rows(run_dir / "metrics.jsonl")
    return RunData(train=[r for r in metrics if r.get("kind", "train") == "train"],
                   evals=[r for r in metrics if r.get("kind") == "eval"],
                   samples=_rows(run_dir / "samples.jsonl"), weights=_weights(run_dir / "config.yaml"))


def _coerce(value: Any, default: Any, where: str) -> Any:
    """`value` as the type of the option's default (a number for a number, a tuple of strings for a tuple)."""
    try:
        if isinstance(default, bool):
            if not isinstance(value, bool):
                raise TypeError
            return value
        if isinstance(default, int):
            if isinstance(value, float) and value != int(value):
                raise TypeError
            return int(value)
        if isinstance(default, float):
            return float(value)
        if isinstance(default, tuple):
            return tuple(str(v) for v in ([value] if isinstance(value, str) else value))
    except (TypeError, ValueError):
        pass
    else:
        return value
    raise ValueError(f"{where}: expected {type(default).__name__}, got {value!r}")


def resolve_options(options: Mapping[str, Mapping[str, Any]] | None = None) -> dict[str, dict[str, Any] | None]:
    """Every detector's full keyword options (defaults <- `options`); None for a detector with enabled: false."""
    options = dict(options or {})
    for name in options:
        if name not in DETECTORS:
            raise ValueError(f"unknown audit detector {name!r}; valid: {', '.join(DETECTORS.names())}")
    out: dict[str, dict[str, Any] | None] = {}
    for name in DETECTORS.names():
        params = {p.name: p.default for p in inspect.signature(DETECTORS.get(name)).parameters.values()
                  if p.kind is p.KEYWORD_ONLY}
        given = dict(options.get(name) or {})
        if not isinstance(options.get(name) or {}, Mapping):
            raise ValueError(f"audit option {name!r} must be a mapping of thresholds")
        if given.pop("enabled", True) is False:
            out[name] = None
            continue
        for key in given:
            if key not in params:
                raise ValueError(f"unknown option {name}.{key}; valid: enabled, {', '.join(params)}")
        out[name] = {k: _coerce(given[k], d, f"{name}.{k}") if k in given else d for k, d in params.items()}
    return out


def audit_run(run: str | Path | RunData, options: Mapping[str, Mapping[str, Any]] | None = None) -> list[Finding]:
    """Run every enabled detector on a run folder (or its loaded RunData); findings in order of start step."""
    data = run if isinstance(run, RunData) else load_run(run)
    findings = [f for name, opts in resolve_options(options).items() if opts is not None
                for f in [DETECTORS.get(name)(data, **opts)] if f is not None]
    return sorted(findings, key=lambda f: (f.step is None, f.step or 0, f.detector))


def parse_sets(items: Sequence[str]) -> dict[str, dict[str, Any]]:
    """`detector.option=value` flags (value parsed as YAML) -> {detector: {option: value}}."""
    out: dict[str, dict[str, Any]] = {}
    for item in items:
        key, eq, value = item.partition("=")
        name, dot, opt = key.partition(".")
        if not (eq and dot and name and opt):
            raise ValueError(f"--set {item!r}: expected detector.option=value, e.g. length_drift.max_ratio=2")
        out.setdefault(name, {})[opt] = yaml.safe_load(value)
    return out


def write_audit(run_dir: Path, findings: list[Finding], options: dict) -> Path:
    """RUN_DIR/audit.json (read by the report), written atomically."""
    path = run_dir / "audit.json"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"generated": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                               "options": options, "findings": [asdict(f) for f in findings]}, indent=1))
    os.replace(tmp, path)
    return path


def format_finding(f: Finding) -> str:
    where = f"from step {f.step}" if f.step is not None else "step unknown"
    return f"[{f.detector}] {where}: {f.message} (value {f.value:.3g}, threshold {f.threshold:.3g})"


def cmd_audit(args) -> int:
    from llmrl.report import write_report

    try:
        options: dict = {}
        if args.config:
            loaded = yaml.safe_load(Path(args.config).read_text()) or {}
            if not isinstance(loaded, dict):
                raise ValueError(f"{args.config}: expected a mapping of detector -> thresholds")
            options = loaded
        for name, opts in parse_sets(args.set or []).items():
            options[name] = {**(options.get(name) or {}), **opts}
        resolved = resolve_options(options)
        findings = audit_run(args.run_dir, options)
    except (FileNotFoundError, ValueError, yaml.YAMLError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    run_dir = Path(args.run_dir)
    enabled = [n for n, o in resolved.items() if o is not None]
    print(f"audit of {run_dir}: {len(enabled)} detectors, {len(findings)} finding(s)")
    for f in findings:
        print("  " + format_finding(f))
    if not args.no_report:
        write_audit(run_dir, findings, resolved)
        print(f"report: {write_report(run_dir)}")
    return 1 if findings and not args.warn_only else 0


def add_subcommand(subparsers) -> None:
    """Add `audit RUN_DIR [--config YAML] [--set D.OPT=V ...] [--warn-only] [--no-report]`."""
    p = subparsers.add_parser("audit", help="flag reward hacking and training trouble in a run folder "
                                            "(exit 1 on a finding)")
    p.add_argument("run_dir", metavar="RUN_DIR", help="run folder written by `llmrl train` (has metrics.jsonl)")
    p.add_argument("--config", metavar="YAML", help="thresholds: {detector: {option: value, enabled: bool}}")
    p.add_argument("--set", action="append", metavar="DETECTOR.OPTION=VALUE",
                   help=f"one threshold (repeatable); detectors: {', '.join(DETECTORS.names())}")
    p.add_argument("--warn-only", action="store_true", help="print findings but exit 0")
    p.add_argument("--no-report", action="store_true", help="do not write audit.json and the report")
    p.set_defaults(fn=cmd_audit)
