"""The studio's Flask app: server-rendered pages, a little inline JS for keyboard shortcuts, no build step.

    app = server.create_app(Settings(runs=[Path("runs/grpo")], labels_dir=Path("labels")))

Safety: every request needs the access token (the `token` query parameter, then a SameSite=Strict cookie; a POST
needs it as a form field too, so another site cannot post labels); request bodies are capped
(`MAX_CONTENT_LENGTH`); all run and model text goes through Jinja's autoescaping, after `visible` has turned
control characters (ANSI escapes, NUL, CR) into the visible text `\\xNN`.
"""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass, field
from pathlib import Path

from flask import request

from llmrl.report.charts import CHART_CSS
from llmrl.report.html import CSS as REPORT_CSS
from llmrl.studio.data import PairItem, StepItem, load_run_folder, pair_items, step_items
from llmrl.studio.store import LabelStore

MAX_BODY = 64 * 1024                      # bytes of a request body; labels are small forms
GROUPS_PER_PAGE = 10
TOKEN_COOKIE, LABELLER_COOKIE = "llmrl_studio_token", "llmrl_studio_labeller"
MARKS = {"good": 1.0, "neutral": 0.5, "bad": 0.0}    # step label -> the PRM's target P(good)
CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
MESSAGES = {"saved": "Saved.", "duplicate": "That item was already labelled (another tab or an earlier session): "
            "nothing written.", "labeller": "Labeller name saved."}

CSS = REPORT_CSS + CHART_CSS + """
nav.top{display:flex;gap:16px;align-items:baseline;border-bottom:1px solid #ddd;padding:0 0 8px;margin-bottom:14px}
nav.top a{text-decoration:none;color:#245}nav.top a.on{font-weight:700;border-bottom:2px solid #245}
nav.top .who{margin-left:auto;color:#555}
.flash{background:#eef6ee;border:1px solid #9c9;padding:6px 10px;border-radius:4px}
.filters{display:flex;flex-wrap:wrap;gap:12px;background:#f6f6f6;padding:8px;border-radius:6px}
.side{display:grid;grid-template-columns:repeat(auto-fill,minmax(280px,1fr));gap:8px}
.side.two{grid-template-columns:1fr 1fr}
.card{border:1px solid #ddd;border-radius:6px;padding:6px 8px;min-width:0;background:#fff}
.card pre,.step pre,.prompt{white-space:pre-wrap;overflow-wrap:anywhere;max-height:24em;overflow:auto}
.card .toks{max-height:24em;overflow:auto}.card .meta{font-size:12px;color:#444;margin-bottom:4px}
kbd{border:1px solid #bbb;border-radius:3px;padding:0 4px;font:11px ui-monospace,monospace;background:#fafafa}
.center{text-align:center}button{font-size:14px;padding:4px 12px}
.step{display:flex;gap:10px;align-items:flex-start;border:1px solid #e4e4e4;border-radius:6px;padding:6px;margin:6px 0}
.step.focus{outline:2px solid #36c}.step pre{flex:1;min-width:0}.snum{font-weight:600;color:#555}
.marks{display:flex;flex-direction:column;font-size:13px}.mark.good{color:#161}.mark.bad{color:#a22}
td.ok{background:#eef7ee}td.bad{background:#fbeeee}.heldout pre{max-width:320px}.ok-text{color:#161}
form.inline{margin:10px 0}body{max-width:1500px}
"""


@dataclass
class Settings:
    runs: list[Path] = field(default_factory=list)          # run folders to browse and take samples from
    pair_files: list[Path] = field(default_factory=list)    # `llmrl pairs` candidate files to relabel
    labels_dir: Path = Path("labels")                       # pairs.jsonl, ties.jsonl, step_labels.jsonl
    labeller: str = "anonymous"                             # default labeller name (a cookie overrides it)
    token: str = field(default_factory=lambda: secrets.token_urlsafe(24))
    step_mode: str = "blank_line"                           # the step segmenter (llmrl.credit.steps)
    step_pattern: str | None = None
    pairs_per_group: int = 2
    audit_options: dict = field(default_factory=dict)       # {detector: {option: value}} for the audit view
    audit_config_name: str | None = None


def visible(text) -> str:
    """Control characters (ANSI escapes, NUL, CR, ...) as the visible text \\xNN; HTML escaping is Jinja's job."""
    return CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", "" if text is None else str(text))


class Studio:
    """The loaded runs, the items to label and the label files (one per app)."""

    def __init__(self, s: Settings):
        self.settings = s
        self._stamp = None
        self.refresh()
        s.labels_dir.mkdir(parents=True, exist_ok=True)
        self.pair_store = LabelStore(s.labels_dir / "pairs.jsonl")
        self.tie_store = LabelStore(s.labels_dir / "ties.jsonl", share_lock_with=self.pair_store)
        self.step_store = LabelStore(s.labels_dir / "step_labels.jsonl")

    def refresh(self) -> None:
        """(Re)load the run folders and items when a run's files changed (a run still training), else nothing."""
        stamp = tuple((f.stat().st_mtime_ns, f.stat().st_size) if f.exists() else None for p in self.settings.runs
                      for f in (p / "metrics.jsonl", p / "samples.jsonl", p / "heldout_samples.jsonl"))
        if stamp == self._stamp:
            return
        s = self.settings
        runs = [load_run_folder(p) for p in s.runs]
        # items in a fixed order (runs, steps, groups): a run's new steps come after the ones already shown
        self.pairs: list[PairItem] = pair_items(runs, s.pair_files, s.pairs_per_group)
        self.steps: list[StepItem] = step_items(runs, s.pair_files, s.step_mode, s.step_pattern)
        self.runs, self._stamp = runs, stamp

    def pair_keys(self) -> set[str]:
        return self.pair_store.keys() | self.tie_store.keys()

    @staticmethod
    def next_item(items: list, done: set[str], after: str | None = None):
        """The first unlabelled item (after `after` when given: skip), wrapping around; None when all are done."""
        start = next((i + 1 for i, it in enumerate(items) if it.key == after), 0)
        order = items[start:] + items[:start]
        return next((it for it in order if it.key not in done), None)


def token_cookie() -> str:
    """The token cookie's name, per port: cookies do not tell ports apart, two studios on one host must not clash."""
    return f"{TOKEN_COOKIE}_{request.host.rsplit(':', 1)[-1] if ':' in request.host else 'default'}"
