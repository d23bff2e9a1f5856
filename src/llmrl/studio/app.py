"""The studio's Flask app: server-rendered pages, a little inline JS for keyboard shortcuts, no build step.

    app = create_app(Settings(runs=[Path("runs/grpo")], labels_dir=Path("labels")))

Safety: every request needs the access token (the `token` query parameter, then a SameSite=Strict cookie; a POST
needs it as a form field too, so another site cannot post labels); request bodies are capped
(`MAX_CONTENT_LENGTH`); all run and model text goes through Jinja's autoescaping, after `visible` has turned
control characters (ANSI escapes, NUL, CR) into visible marks.
"""

from __future__ import annotations

import hmac
import re
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlencode

from flask import Flask, abort, redirect, render_template, request, url_for
from werkzeug.exceptions import BadRequest

from llmrl.report.charts import CHART_CSS
from llmrl.report.html import CSS as REPORT_CSS, sample_tokens
from llmrl.studio.data import (PairItem, SampleFilter, StepItem, load_run_folder, pair_items,
                               sample_length, step_items)
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
nav.top .who{margin-left:auto;color:#555}.flash{background:#eef6ee;border:1px solid #9c9;padding:6px 10px;border-radius:4px}
.filters{display:flex;flex-wrap:wrap;gap:12px;background:#f6f6f6;padding:8px;border-radius:6px}
.side{display:grid;grid-template-columns:repeat(auto-fill,minmax(280px,1fr));gap:8px}.side.two{grid-template-columns:1fr 1fr}
.card{border:1px solid #ddd;border-radius:6px;padding:6px 8px;min-width:0;background:#fff}
.card pre,.step pre,.prompt{white-space:pre-wrap;overflow-wrap:anywhere;max-height:24em;overflow:auto}
.card .toks{max-height:24em;overflow:auto}.card .meta{font-size:12px;color:#444;margin-bottom:4px}kbd{border:1px solid #bbb;border-radius:3px;padding:0 4px;
font:11px ui-monospace,monospace;background:#fafafa}.center{text-align:center}button{font-size:14px;padding:4px 12px}
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
        self.runs = [load_run_folder(p) for p in s.runs]
        self.pairs: list[PairItem] = pair_items(self.runs, s.pair_files, s.pairs_per_group)
        self.steps: list[StepItem] = step_items(self.runs, s.pair_files, s.step_mode, s.step_pattern)
        s.labels_dir.mkdir(parents=True, exist_ok=True)
        self.pair_store = LabelStore(s.labels_dir / "pairs.jsonl")
        self.tie_store = LabelStore(s.labels_dir / "ties.jsonl", share_lock_with=self.pair_store)
        self.step_store = LabelStore(s.labels_dir / "step_labels.jsonl")

    def pair_keys(self) -> set[str]:
        return self.pair_store.keys() | self.tie_store.keys()

    @staticmethod
    def next_item(items: list, done: set[str], after: str | None = None):
        """The first unlabelled item (after `after` when given: skip), wrapping around; None when all are done."""
        start = next((i + 1 for i, it in enumerate(items) if it.key == after), 0)
        order = items[start:] + items[:start]
        return next((it for it in order if it.key not in done), None)


def _number(name: str, kind=float):
    raw = request.args.get(name, "").strip()
    if not raw:
        return None
    try:
        return kind(raw)
    except ValueError:
        raise BadRequest(f"filter {name}={raw!r} is not a number") from None


def _filter_from_args() -> SampleFilter:
    truncated = {"yes": True, "no": False}.get(request.args.get("truncated", ""))
    return SampleFilter(step=_number("step", int), min_reward=_number("min_reward"), max_reward=_number("max_reward"),
                        component=request.args.get("component") or None, min_component=_number("min_component"),
                        max_component=_number("max_component"), min_length=_number("min_length", int),
                        max_length=_number("max_length", int), truncated=truncated)


def _group_views(groups: dict, all_groups: dict, scales: dict) -> list[dict]:
    out = []
    for (step, group), rows in groups.items():
        rewards = [float(s["reward"]) for s in rows if isinstance(s.get("reward"), (int, float))]
        out.append({"step": step, "group": group, "size": len(all_groups.get((step, group), rows)),
                    "prompt": rows[0].get("prompt", ""), "mean": sum(rewards) / len(rewards) if rewards else 0.0,
                    "samples": [_sample_view(s, scales.get(step) or 1.0) for s in rows]})
    return out


def _sample_view(s: dict, scale: float) -> dict:
    toks = s.get("tokens") if isinstance(s.get("tokens"), list) and s.get("tokens") else [s.get("completion", "")]
    shown = {**s, "tokens": [visible(t) for t in toks]}
    return {"reward": s.get("reward"), "correct": s.get("correct"), "length": sample_length(s),
            "truncated": s.get("truncated") is True, "heat": sample_tokens(shown, scale),
            "components": s.get("reward_components") if isinstance(s.get("reward_components"), dict) else {}}


def _step_scales(samples: list[dict]) -> dict[int, float]:
    """step -> the largest |advantage| of a chosen token at that step (the heatmap's full colour)."""
    out: dict[int, float] = {}
    for s in samples:
        adv, mask = s.get("advantages") or [], s.get("response_mask") or []
        vals = [abs(a) for i, a in enumerate(adv) if isinstance(a, (int, float)) and (i >= len(mask) or mask[i])]
        if vals and isinstance(s.get("step"), int):
            out[s["step"]] = max(out.get(s["step"], 0.0), max(vals))
    return out


def create_app(settings: Settings) -> Flask:
    from llmrl.studio.routes import register

    app = Flask(__name__, template_folder=str(Path(__file__).parent / "templates"))
    app.config.update(MAX_CONTENT_LENGTH=MAX_BODY, MAX_FORM_MEMORY_SIZE=MAX_BODY, MAX_FORM_PARTS=400,
                      TEMPLATES_AUTO_RELOAD=False)
    app.jinja_env.autoescape = True          # every template, whatever its name
    app.jinja_env.filters["visible"] = visible
    studio = Studio(settings)
    app.extensions["llmrl_studio"] = studio
    token = settings.token

    @app.before_request
    def require_token():
        given = request.form.get("token", "") if request.method == "POST" else (
            request.args.get("token") or request.cookies.get(TOKEN_COOKIE, ""))
        if not hmac.compare_digest(given.encode(), token.encode()):
            abort(403, "missing or wrong access token: open the URL `llmrl studio` printed")

    @app.after_request
    def remember_token(resp):
        if request.args.get("token") == token:
            resp.set_cookie(TOKEN_COOKIE, token, httponly=True, samesite="Strict")
        resp.headers["X-Content-Type-Options"] = "nosniff"
        resp.headers["Content-Security-Policy"] = ("default-src 'none'; style-src 'unsafe-inline'; "
                                                   "script-src 'unsafe-inline'; form-action 'self'; img-src 'self'")
        resp.headers["Referrer-Policy"] = "no-referrer"
        return resp

    register(app, studio)
    return app


def page(template: str, view: str, title: str, **kw):
    studio: Studio = request_studio()
    return render_template(template, view=view, title=title, css=CSS, token=studio.settings.token,
                           labeller=labeller(), message=MESSAGES.get(request.args.get("msg", "")), **kw)


def request_studio() -> Studio:
    from flask import current_app

    return current_app.extensions["llmrl_studio"]


def labeller() -> str:
    name = request.cookies.get(LABELLER_COOKIE, "")
    return name if valid_name(name) else request_studio().settings.labeller


def valid_name(name: str) -> bool:
    return 0 < len(name) <= 64 and name.isprintable() and name.strip() == name


def url_with(endpoint: str, **params) -> str:
    return url_for(endpoint, **{k: v for k, v in params.items() if k in ("run_id",)}) + (
        "?" + urlencode({k: v for k, v in params.items() if k != "run_id" and v not in (None, "")})
        if any(v not in (None, "") for k, v in params.items() if k != "run_id") else "")


def go(endpoint: str, **params):
    return redirect(url_with(endpoint, **params), code=303)
