"""The run report: one self-contained HTML file (inline CSS and SVG, no network, no external fonts).

Sections, each left out when its input is missing: before/after table (`summary.yaml`), curves (`charts.py`, from
`metrics.jsonl`), per-token credit heatmaps and a table of sampled completions (`samples.jsonl`, format in
`llmrl.report`), the resolved config (`config.yaml`). All run text (prompts, completions, tokens, names) is
model or user output and is HTML-escaped. A few lines of inline JS only mark the page as rendered
(`<body data-ready="1" data-drawn="N series paths with a non-empty box">`), which the browser test reads.
"""

from __future__ import annotations

import json
import os
from datetime import datetime
from html import escape
from pathlib import Path

import yaml

from llmrl.report.charts import CHART_CSS, curves_html, number

HEAT_STEPS, HEAT_GROUPS, HEAT_SAMPLES = 2, 3, 8   # heatmaps: latest steps, prompts per step, samples per prompt
TABLE_ROWS = 60                                   # sampled completions in the table, latest step first
NEG, POS = (215, 48, 39), (33, 102, 172)          # diverging colour ends (ColorBrewer RdBu): A < 0 red, A > 0 blue
WHITESPACE = {" ": "·", "\t": "→", "\r": "␍", "\n": "⏎"}

CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif;margin:24px auto;
 max-width:1320px;padding:0 16px;color:#1a1a1a}
h1{font-size:22px;margin:0 0 4px}h2{font-size:17px;margin:30px 0 10px;border-bottom:1px solid #ddd;padding-bottom:4px}
h3{font-size:15px;margin:18px 0 6px}.sub,.note{color:#666}.warn{color:#a33}
.charts{display:flex;flex-wrap:wrap;gap:10px}
figure{margin:0;border:1px solid #e4e4e4;border-radius:6px;padding:4px;background:#fff}
table{border-collapse:collapse}td,th{border:1px solid #ddd;padding:4px 8px;text-align:left;vertical-align:top}
th{background:#f6f6f6}td.num{text-align:right;font-variant-numeric:tabular-nums}
pre{margin:0;white-space:pre-wrap;overflow-wrap:anywhere;font:12px/1.4 ui-monospace,"DejaVu Sans Mono",Menlo,monospace}
.samples pre{max-height:12em;overflow:auto;max-width:500px}.small{font-size:11.5px;color:#555}
.group{border:1px solid #ddd;border-radius:6px;margin:10px 0;padding:8px 10px}.ghead{font-weight:600}
.prompt{background:#f6f6f6;padding:4px 6px;border-radius:4px;margin:4px 0 6px;max-height:8em;overflow:auto}
.sample{display:flex;gap:12px;border-top:1px dashed #e4e4e4;padding:5px 0}
.meta{flex:0 0 170px;font-size:12px;color:#444}
.toks{flex:1;min-width:0;overflow-wrap:anywhere;font:12px/1.95 ui-monospace,"DejaVu Sans Mono",Menlo,monospace}
.tok{padding:1px 0;border-radius:2px;box-shadow:inset 0 0 0 .5px rgba(0,0,0,.13)}
.tok.obs,.obs-key{background:#e4e4e4;color:#888;font-style:italic;text-decoration:underline dotted #999}
.ws{opacity:.45;font-style:normal}
.step-boundary,.boundary-key{display:inline-block;border-left:2px solid #333;margin:0 3px 0 6px;padding-left:2px;
 font-size:9px;line-height:1;vertical-align:super;color:#333}
.legend-bar{display:inline-block;width:200px;height:12px;border:1px solid #bbb;vertical-align:middle;
 background:linear-gradient(to right,rgb(215,48,39),#fff,rgb(33,102,172))}
"""

JS = """(function () {
  var n = 0;
  document.querySelectorAll("svg.chart path.series").forEach(function (p) {
    var b = p.getBBox(); if (b.width > 0 || b.height > 0) n++;
  });
  document.body.setAttribute("data-drawn", String(n));
  document.body.setAttribute("data-ready", "1");
})();"""


def read_jsonl(path: Path) -> tuple[list[dict], int]:
    """The JSON objects of a JSON-lines file, and how many non-empty lines were not one (e.g. a torn last line)."""
    rows, bad = [], 0
    for line in Path(path).read_text(encoding="utf-8", errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except ValueError:
            rec = None
        if isinstance(rec, dict):
            rows.append(rec)
        else:
            bad += 1
    return rows, bad


def _int(v, default: int = -1) -> int:
    x = number(v)
    return default if x is None else int(x)


def _f(v, spec: str = ".3f") -> str:
    x = number(v)
    return "–" if x is None else format(x, spec)


def heat_style(a: float, scale: float) -> str:
    """CSS colours of a token with advantage `a`: white at 0, red (a < 0) or blue (a > 0), full at |a| = scale."""
    t = max(-1.0, min(1.0, a / scale)) if scale > 0 else 0.0
    r, g, b = (round(255 + (c - 255) * abs(t)) for c in (POS if t > 0 else NEG))
    return f"background:rgb({r},{g},{b})" + (";color:#fff" if abs(t) > 0.6 else "")


def token_text(tok) -> str:
    """An escaped token with its whitespace made visible: space ·, tab →, CR ␍, newline ⏎ and a line break."""
    shown = [f'<i class="ws">{WHITESPACE[ch]}</i>' + ("<br>" if ch == "\n" else "") if ch in WHITESPACE else escape(ch)
             for ch in str(tok)]
    return "".join(shown) or '<i class="ws">∅</i>'


def _correct(v) -> str:
    x = number(v)
    return "–" if x is None else {1.0: "✓", 0.0: "✗"}.get(x, f"{x:.2f}")


def _components(s: dict) -> str:
    comps = s.get("reward_components")
    if not isinstance(comps, dict):
        return ""
    return " · ".join(f"{escape(str(k))} {_f(v, '.3g')}" for k, v in comps.items())


def _advantages(s: dict) -> list[tuple[float | None, bool]]:
    """(advantage or None, chosen by the policy) per token of a sample; short or missing lists are padded."""
    toks, adv, mask = (s.get(k) if isinstance(s.get(k), list) else []
                       for k in ("tokens", "advantages", "response_mask"))
    return [(number(adv[i]) if i < len(adv) else None, not (i < len(mask) and mask[i] == 0)) for i in range(len(toks))]


def sample_tokens(s: dict, scale: float) -> str:
    """One response as token spans coloured by advantage, observations greyed, reasoning-step boundaries marked."""
    ids = s.get("step_ids") if isinstance(s.get("step_ids"), list) else []
    parts, prev = [], None
    for i, (tok, (a, chosen)) in enumerate(zip(s["tokens"], _advantages(s))):
        sid = _int(ids[i], None) if i < len(ids) else None
        if prev is not None and sid is not None and sid != prev:
            label = f"§{sid}" if sid >= 0 else "§–"
            parts.append(f'<span class="step-boundary" title="reasoning step {sid}">{label}</span>')
        prev = sid if sid is not None else prev
        if not chosen:
            parts.append(f'<span class="tok obs" title="tool output (masked: no gradient)">{token_text(tok)}</span>')
        else:
            title = "A=n/a" if a is None else f"A={a:.3f}"
            parts.append(f'<span class="tok" title="{title}" style="{heat_style(a or 0.0, scale)}">'
                         f'{token_text(tok)}</span>')
    return "<wbr>".join(parts)


def _teacher_row(s: dict, scale: float) -> str:
    """On-policy distillation: the same tokens coloured by the teacher's term -(log pi - log pi_teacher), the
    tokens the teacher pushes down in red (samples.jsonl `teacher`, when the run had a teacher)."""
    if not isinstance(s.get("teacher"), list):
        return ""
    return (f'<div class="toks"><span class="small">teacher term:</span> '
            f'{sample_tokens({**s, "advantages": s["teacher"], "step_ids": None}, scale)}</div>')


def _group_block(step: int, group: int, samples: list[dict], scale: float) -> str:
    rewards = [number(s.get("reward")) for s in samples if number(s.get("reward")) is not None]
    mean = f"{sum(rewards) / len(rewards):.3f}" if rewards else "–"
    n, samples = len(samples), sorted(samples, key=lambda s: -(number(s.get("reward")) or 0.0))
    if n > HEAT_SAMPLES:                           # keep the best, the worst and evenly spaced ones between
        samples = [samples[round(i * (n - 1) / (HEAT_SAMPLES - 1))] for i in range(HEAT_SAMPLES)]
    out = [f'<div class="group"><div class="ghead">step {step} · group {group} · {n} sample{"s" * (n != 1)}'
           f'{f" (showing {len(samples)} across the reward range)" if n > len(samples) else ""} · '
           f'group mean reward {mean}</div><pre class="prompt">{escape(str(samples[0].get("prompt", "")))}</pre>']
    for s in samples:
        out.append(f'<div class="sample"><div class="meta">reward <b>{_f(s.get("reward"))}</b> · correct '
                   f'{_correct(s.get("correct"))}<br><span class="small">{_components(s)}</span></div>'
                   f'<div class="toks">{sample_tokens(s, scale)}</div>{_teacher_row(s, scale)}</div>')
    return "".join(out) + "</div>"


def credit_html(samples: list[dict]) -> str:
    """Heatmaps of the latest `HEAT_STEPS` logged steps: up to `HEAT_GROUPS` prompts each, groups with mixed
    rewards first (a group whose samples all score the same gets no credit from a group baseline)."""
    rows = [s for s in samples if isinstance(s.get("tokens"), list) and s["tokens"]]
    if not rows:
        return '<p class="note">no samples with per-token data.</p>'
    out = ['<p class="note">Each token\'s background is the advantage <i>A</i> credit assignment gave it: '
           '<span class="legend-bar"></span> red negative · white 0 · blue positive, full colour at the largest |A| '
           'of that step (hover a token for its value). <span class="obs-key">obs</span> tool output, masked '
           '(no gradient). <span class="boundary-key">§1</span> start of reasoning step 1. '
           '<i class="ws">·</i> space, '
           '<i class="ws">⏎</i> newline. Samples of one prompt are grouped and sorted by reward, so you can see how '
           'the group baseline splits the credit.</p>']
    for step in sorted({_int(s.get("step")) for s in rows}, reverse=True)[:HEAT_STEPS]:
        at = [s for s in rows if _int(s.get("step")) == step]
        scale = max((abs(a) for s in at for a, chosen in _advantages(s) if chosen and a is not None), default=0.0)
        groups: dict[int, list[dict]] = {}
        for s in at:
            groups.setdefault(_int(s.get("group")), []).append(s)
        spread = lambda g: len({number(s.get("reward")) for s in groups[g]}) > 1   # noqa: E731
        out.append(f'<h3>step {step} <span class="note">colour scale ±{scale:.3g} (max |A| at this step)</span></h3>')
        for g in sorted(groups, key=lambda g: (not spread(g), g))[:HEAT_GROUPS]:
            out.append(_group_block(step, g, groups[g], scale or 1.0))
    return "".join(out)


def samples_table(samples: list[dict]) -> str:
    """Sampled completions, latest step first (file order within a step)."""
    rows = sorted(samples, key=lambda s: -_int(s.get("step")))[:TABLE_ROWS]
    head = "<tr><th>step</th><th>group</th><th>prompt</th><th>completion</th><th>reward</th><th>correct</th></tr>"
    body = "".join(
        f'<tr><td class="num">{_int(s.get("step"))}</td><td class="num">{_int(s.get("group"))}</td>'
        f'<td><pre>{escape(str(s.get("prompt", "")))}</pre></td><td><pre>{escape(str(s.get("completion", "")))}</pre>'
        f'</td><td class="num">{_f(s.get("reward"))}<br><span class="small">{_components(s)}</span></td>'
        f'<td>{_correct(s.get("correct"))}</td></tr>' for s in rows)
    more = (f'<p class="note">showing the latest {len(rows)} of {len(samples)} samples.</p>'
            if len(samples) > len(rows) else "")
    return f'{more}<table class="samples">{head}{body}</table>'


def summary_html(text: str) -> str:
    """Before/after table from summary.yaml (the raw file when it does not have the expected shape)."""
    try:
        summary = yaml.safe_load(text)
    except yaml.YAMLError:
        summary = None
    b, a = (summary.get(k) if isinstance(summary, dict) else None for k in ("before", "after"))
    if not (isinstance(b, dict) and isinstance(a, dict)):
        return f"<pre>{escape(text)}</pre>"
    rows = [("held-out accuracy", "heldout_accuracy", ".3f"),
            ("share given full credit", "heldout_exact", ".3f"),
            ("mean response tokens", "heldout_response_length", ".1f"),
            ("KL(policy ‖ reference), nats/seq", "heldout_kl_to_ref", ".3f"),
            ("share given the commonest answer", "heldout_top_answer_share", ".3f")]
    body = "".join(f'<tr><td>{name}</td><td class="num">{_f(b.get(k), spec)}</td><td class="num">{_f(a.get(k), spec)}'
                   f"</td></tr>" for name, k, spec in rows)
    extra = (f'<p class="note">{escape(str(summary.get("steps", "?")))} steps; checkpoint '
             f'{escape(str(summary.get("checkpoint", "–")))}</p>')
    return f"<table><tr><th></th><th>before</th><th>after</th></tr>{body}</table>{extra}"


def audit_html(text: str) -> str:
    """The findings `llmrl audit` wrote to audit.json: a table with the step where each starts."""
    try:
        audit = json.loads(text)
    except ValueError:
        audit = None
    findings = audit.get("findings") if isinstance(audit, dict) else None
    if not isinstance(findings, list):
        return '<p class="warn">audit.json is unreadable; run `llmrl audit RUN_DIR` again.</p>'
    when = f'<p class="note">from `llmrl audit`, {escape(str(audit.get("generated", "?")))}.</p>'
    if not findings:
        return when + "<p>No findings: every detector is within its thresholds.</p>"
    rows = "".join(f'<tr class="finding"><td>{escape(str(f.get("detector")))}</td><td class="num">'
                   f'{_int(f.get("step"))}</td><td>{escape(str(f.get("message")))}</td><td class="num">'
                   f'{_f(f.get("value"), ".3g")} / {_f(f.get("threshold"), ".3g")}</td></tr>'
                   for f in findings if isinstance(f, dict))
    return (f'{when}<table><tr><th>detector</th><th>from step</th><th>finding</th><th>value / threshold</th></tr>'
            f"{rows}</table>")


def sandbox_html(text: str) -> str:
    """Which sandbox layer ran the model's code (sandbox.json, written by `llmrl train`), red when weak or none."""
    try:
        st = json.loads(text)
        mode, layers, missing = st.get("mode"), st.get("layers") or [], st.get("missing") or {}
    except (ValueError, AttributeError):
        return f'<h2>Sandbox</h2><p class="warn">unreadable sandbox.json</p>'
    cls = "note" if mode in ("bwrap", "namespaces") else "warn"
    body = (f'<p class="{cls}">model-written code ran in the <b>{escape(str(mode))}</b> sandbox layer'
            + (": rlimits only, it could read the machine's files and use the network (sandbox.allow_weak)"
               if mode == "weak" else "") + f"; active: {escape(', '.join(map(str, layers)))}</p>")
    if missing:
        items = "".join(f"<li>missing {escape(str(k))}: {escape(str(v))}</li>" for k, v in missing.items())
        body += f"<ul>{items}</ul>"
    return f"<h2>Sandbox</h2>{body}"


def render(run_dir: Path) -> str:
    """The report page of one run folder as a string."""
    metrics, bad = read_jsonl(run_dir / "metrics.jsonl")
    samples, bad_samples = read_jsonl(run_dir / "samples.jsonl") if (run_dir / "samples.jsonl").exists() else ([], 0)
    train = [r for r in metrics if r.get("kind", "train") == "train"]
    evals = [r for r in metrics if r.get("kind") == "eval"]
    last_eval = evals[-1] if evals else {}
    parts = [f'<h1>llmrl run report — {escape(run_dir.name)}</h1><p class="sub">{escape(str(run_dir))} · generated '
             f"{datetime.now():%Y-%m-%d %H:%M} · {len(train)} train steps logged (last step "
             f"{_int(train[-1].get('step')) if train else '–'}), {len(evals)} evaluations (latest held-out accuracy "
             f"{_f(last_eval.get('heldout_accuracy'))}), {len(samples)} samples</p>"]
    if bad or bad_samples:
        parts.append(f'<p class="warn">skipped {bad} unreadable line(s) in metrics.jsonl and {bad_samples} in '
                     f"samples.jsonl.</p>")
    if (run_dir / "summary.yaml").exists():
        parts.append(f"<h2>Before / after</h2>{summary_html((run_dir / 'summary.yaml').read_text())}")
    if (run_dir / "audit.json").exists():
        parts.append(f"<h2>Audit</h2>{audit_html((run_dir / 'audit.json').read_text(errors='replace'))}")
    curves = curves_html(metrics)
    parts.append(f'<h2>Curves</h2><div class="charts">{curves}</div>' if curves else
                 '<h2>Curves</h2><p class="note">no numeric metrics logged yet.</p>')
    if samples:
        parts.append(f"<h2>Credit assignment per token</h2>{credit_html(samples)}")
        parts.append(f"<h2>Sampled completions</h2>{samples_table(samples)}")
    else:
        parts.append('<h2>Samples</h2><p class="note">no samples.jsonl in this run folder.</p>')
    if (run_dir / "sandbox.json").exists():
        parts.append(sandbox_html((run_dir / "sandbox.json").read_text()))
    if (run_dir / "config.yaml").exists():
        parts.append(f"<h2>Config</h2><details><summary>config.yaml</summary>"
                     f"<pre>{escape((run_dir / 'config.yaml').read_text())}</pre></details>")
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><meta name="viewport" '
            f'content="width=device-width, initial-scale=1"><title>llmrl report — {escape(run_dir.name)}</title>'
            f'<style>{CSS}{CHART_CSS}</style></head><body>{"".join(parts)}<script>{JS}</script></body></html>\n')


def write_report(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Write the report of `run_dir` to `out` (default `RUN_DIR/report.html`), atomically; returns its path."""
    run_dir = Path(run_dir)
    if not (run_dir / "metrics.jsonl").is_file():
        raise FileNotFoundError(f"{run_dir} has no metrics.jsonl: not a run folder written by `llmrl train`")
    out = Path(out) if out is not None else run_dir / "report.html"
    page = render(run_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(page, encoding="utf-8")
    os.replace(tmp, out)
    return out
