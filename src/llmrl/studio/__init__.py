"""`llmrl studio [RUN_DIR ...]`: a local web app to browse rollouts, label preference pairs and reasoning steps,
and read a run's audit.

    llmrl studio runs/main_arithmetic                   # prints http://127.0.0.1:8765/?token=...
    llmrl studio runs/a runs/b --pairs pairs.jsonl --labels labels/ --labeller ann

Views: the rollout browser (every logged step's samples, a group's samples side by side, filters, the per-token
credit heatmap of the report, held-out answers at each evaluation), preference labelling (two completions, A / B /
tie, keyboard shortcuts) writing `LABELS/pairs.jsonl` in the format `llmrl dpo` and `llmrl rm` read (ties go to
`LABELS/ties.jsonl`), step labelling (good / neutral / bad per step of the step segmenter) writing
`LABELS/step_labels.jsonl` in the format `llmrl prm` reads (labels 1 / 0.5 / 0), and the audit
(`llmrl.audit`). Binds 127.0.0.1 and needs the random token in the printed URL; label files are append-only
(`llmrl.studio.store`). Pieces: `data.py` (what is shown and labelled), `store.py` (label files), `app.py`
(Flask app, safety), `routes.py` (pages), `templates/`.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import sys
from pathlib import Path

__all__ = ["add_subcommand", "cmd_studio"]


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def cmd_studio(args) -> int:
    import yaml
    from werkzeug.serving import make_server

    from llmrl.credit.steps import MODES
    from llmrl.studio.app import Settings
    from llmrl.studio.server import create_app

    if args.steps not in MODES:
        print(f"error: --steps {args.steps!r}; valid: {', '.join(MODES)}", file=sys.stderr)
        return 2
    logging.getLogger("werkzeug").setLevel(logging.WARNING)   # its request lines would print the access token
    try:
        options = yaml.safe_load(Path(args.audit_config).read_text()) if args.audit_config else {}
        settings = Settings(runs=[Path(p) for p in args.run_dirs], pair_files=[Path(p) for p in args.pairs or []],
                            labels_dir=Path(args.labels), labeller=args.labeller, step_mode=args.steps,
                            step_pattern=args.step_pattern, audit_options=options or {},
                            audit_config_name=args.audit_config)
        app = create_app(settings)
        server = make_server(args.host, args.port, app, threaded=True)
    except (FileNotFoundError, ValueError, OSError, yaml.YAMLError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not _is_loopback(args.host):
        print(f"warning: serving on {args.host}, reachable from other machines (the token still guards it)",
              file=sys.stderr)
    host = f"[{args.host}]" if ":" in args.host else args.host
    studio = app.extensions["llmrl_studio"]
    print(f"llmrl studio: {len(studio.runs)} run(s), {len(studio.pairs)} pairs and {len(studio.steps)} responses to "
          f"label; labels in {settings.labels_dir}/", flush=True)
    print(f"open http://{host}:{server.server_port}/?token={settings.token}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


def add_subcommand(subparsers) -> None:
    p = subparsers.add_parser("studio", help="local web app: browse rollouts, label preference pairs and steps, "
                                             "read the audit")
    p.add_argument("run_dirs", nargs="*", metavar="RUN_DIR", help="run folders written by `llmrl train`")
    p.add_argument("--pairs", action="append", metavar="JSONL",
                   help="candidate pairs to relabel (an `llmrl pairs` file; repeatable)")
    p.add_argument("--labels", default="labels", metavar="DIR",
                   help="where pairs.jsonl, ties.jsonl and step_labels.jsonl are appended (default ./labels)")
    p.add_argument("--labeller", default=os.environ.get("USER") or "anonymous",
                   help="default labeller name written with each label (the page can change it)")
    p.add_argument("--steps", default="blank_line", help="step segmenter: blank_line | numbered | regex")
    p.add_argument("--step-pattern", default=None, help="with --steps regex: the pattern that starts a step")
    p.add_argument("--audit-config", default=None, metavar="YAML", help="audit thresholds (as `llmrl audit --config`)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8765, help="port (0 = any free port)")
    p.set_defaults(fn=cmd_studio)
