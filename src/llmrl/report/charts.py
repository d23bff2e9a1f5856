"""Inline-SVG line charts drawn in pure Python, and the run's curves (small multiples) built from metrics.jsonl.

`line_chart` draws one chart: axes, "nice" ticks, grid, one `<path class="series">` per series, dots for
sparse series (held-out evaluations), a legend. Every chart is `<svg class="chart" data-series="N">`, N being
the number of series paths it drew, so a test (or a reader of the DOM) can count what was plotted.

`curves_html` picks the series out of the metrics records by the table `CURVES`: a key ending in `*` is a
prefix (`reward/*` = one series per reward term). Missing, null, non-finite and non-numeric values are gaps;
unknown fields are ignored; a chart none of whose series has a value is left out.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from html import escape

PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
           "#17becf"]

# (title, [(record kind, metric key or "prefix*", legend label or None = the key after the prefix), ...])
CURVES = [
    ("reward", [("train", "reward", "total"), ("train", "reward/*", None)]),
    ("held-out accuracy", [("eval", "heldout_accuracy", "held-out"), ("eval", "heldout_exact", "given full credit")]),
    ("KL(policy ‖ reference)", [("train", "kl_to_ref", "train"), ("eval", "heldout_kl_to_ref", "held-out")]),
    ("entropy", [("train", "entropy", "entropy"), ("train", "sampled_entropy", "-log p of the sampled tokens")]),
    ("clip fraction", [("train", "clip_fraction", "clip fraction")]),
    ("samples that teach nothing (fraction)", [
        ("train", "zero_variance_group_fraction", "zero-variance groups"),
        ("train", "duplicate_completion_fraction", "duplicates in group"),
        ("train", "truncated_fraction", "truncated"),
        ("train", "sampling_wasted_fraction", "dynamic sampling: dropped")]),
    ("dynamic sampling rounds", [("train", "sampling_rounds", "rounds")]),
    ("response length (tokens)", [("train", "response_length", "train"),
                                  ("eval", "heldout_response_length", "held-out")]),
    ("time per phase (s)", [("train", "time_rollout", "rollout"), ("train", "time_reward", "reward"),
                            ("train", "time_ref_values", "ref+values"), ("train", "time_update", "update"),
                            ("eval", "time_eval", "eval")]),
    ("losses", [("train", "loss_*", None), ("train", "value_loss", "value")]),
    ("value explained variance", [("train", "value_explained_variance", "explained variance")]),
    ("gradient norm", [("train", "grad_norm", "grad norm")]),
    ("learning rate", [("train", "lr", "lr")]),
    ("rollout tokens / s", [("train", "tokens_per_s", "tokens/s")]),
    ("reward failures", [("train", "reward_failures", "failures")]),
]


@dataclass
class Series:
    name: str
    points: list[tuple[float, float | None]]    # (x, y) in x order; y None = a gap in the line
    markers: bool = False                        # a dot on every point (sparse series such as evaluations)


def number(v) -> float | None:
    """`v` as a finite float, or None for anything else (null, NaN, strings, bools, lists...)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        return None
    return float(v)


def fmt(v: float) -> str:
    """Compact tick label: 0.25, 1.5k, 3e-05."""
    if v == 0:
        return "0"
    if abs(v) >= 1e4:
        return f"{v / 1e3:.4g}k"
    return f"{v:.3g}"


def nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """About `n` round tick values (1, 2, 2.5 or 5 times a power of ten apart) covering [lo, hi]."""
    raw = (hi - lo) / n
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    first = math.ceil(lo / step - 1e-9)
    return [round(k * step, 12) for k in range(first, math.floor(hi / step + 1e-9) + 1)]


def _span(values: list[float]) -> tuple[float, float]:
    lo, hi = min(values), max(values)
    if hi - lo <= 1e-9 * max(abs(lo), abs(hi)):      # a flat line: +-10% around it (+-1 around 0)
        pad = abs(hi) * 0.1 or 1.0
        return lo - pad, hi + pad
    pad = (hi - lo) * 0.05
    return lo - pad, hi + pad


def _legend_rows(names: list[str], width: float) -> list[list[tuple[str, int, float]]]:
    """Lay legend items out left to right, wrapping: rows of (name, colour index, x offset)."""
    rows, x = [[]], 0.0
    for i, name in enumerate(names):
        w = 22 + 6.2 * len(name)
        if x and x + w > width:
            rows.append([])
            x = 0.0
        rows[-1].append((name, i, x))
        x += w
    return rows


CHART_CSS = ("svg.chart text{font-size:10.5px;fill:#444}svg.chart .title{font-size:12.5px;font-weight:600;fill:#222}"
             "svg.chart .grid{stroke:#eee}svg.chart .axis{stroke:#888;fill:none}"
             "svg.chart path.series{fill:none;stroke-width:1.6;stroke-linejoin:round}")


def standalone_svg(svg: str) -> str:
    """A chart from `line_chart` as an .svg file of its own: the chart CSS inlined, on a white background."""
    head, rest = svg.split(">", 1)
    font = "svg.chart{font-family:system-ui,'DejaVu Sans',sans-serif}"
    return (f'<?xml version="1.0" encoding="UTF-8"?>\n{head}><style>{font}{CHART_CSS}</style>'
            f'<rect width="100%" height="100%" fill="#fff"/>{rest}\n')


def line_chart(title: str, series: list[Series], *, width: int = 360, height: int = 210,
               x_label: str = "step") -> str:
    """One SVG line chart. Series with no finite point are dropped; returns "" when none is left."""
    drawn = [s for s in series if any(y is not None for _, y in s.points)]
    if not drawn:
        return ""
    xs = [x for s in drawn for x, y in s.points if y is not None]
    ys = [y for s in drawn for _, y in s.points if y is not None]
    x0, x1 = (min(xs), max(xs)) if max(xs) > min(xs) else (min(xs) - 1, max(xs) + 1)
    y0, y1 = _span(ys)
    left, right, top = 54, 14, 26
    legend = _legend_rows([s.name for s in drawn], width - left - right) if len(drawn) > 1 else []
    bottom = 36 + (15 * len(legend) + 6 if legend else 0)     # tick labels and x label, then the legend rows
    pw, ph = width - left - right, height - top - bottom
    sx = lambda x: left + (x - x0) / (x1 - x0) * pw     # noqa: E731
    sy = lambda y: top + (y1 - y) / (y1 - y0) * ph      # noqa: E731
    out = [f'<svg class="chart" data-series="{len(drawn)}" role="img" aria-label="{escape(title)}" '
           f'viewBox="0 0 {width} {height}" width="{width}" height="{height}" xmlns="http://www.w3.org/2000/svg">',
           f'<text class="title" x="{left}" y="16">{escape(title)}</text>']
    for t in nice_ticks(y0, y1):
        y = sy(t)
        out.append(f'<line class="grid" x1="{left}" x2="{left + pw}" y1="{y:.1f}" y2="{y:.1f}"/>'
                   f'<text class="tick" x="{left - 5}" y="{y + 3.5:.1f}" text-anchor="end">{fmt(t)}</text>')
    for t in nice_ticks(x0, x1, 6):
        x = sx(t)
        out.append(f'<line class="axis" x1="{x:.1f}" x2="{x:.1f}" y1="{top + ph}" y2="{top + ph + 4}"/>'
                   f'<text class="tick" x="{x:.1f}" y="{top + ph + 15}" text-anchor="middle">{fmt(t)}</text>')
    out.append(f'<path class="axis" d="M{left},{top}V{top + ph}H{left + pw}"/>'
               f'<text class="tick" x="{left + pw}" y="{top + ph + 28}" text-anchor="end">{escape(x_label)}</text>')
    for i, s in enumerate(drawn):
        colour, d, pen_down = PALETTE[i % len(PALETTE)], [], False
        for x, y in s.points:
            if y is None:
                pen_down = False
                continue
            d.append(f'{"L" if pen_down else "M"}{sx(x):.1f},{sy(y):.1f}')
            pen_down = True
        out.append(f'<path class="series" stroke="{colour}" d="{"".join(d)}"><title>{escape(s.name)}</title></path>')
        finite = [(x, y) for x, y in s.points if y is not None]
        if s.markers or len(finite) == 1:
            out += [f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="2.8" fill="{colour}">'
                    f'<title>{escape(s.name)} @ {fmt(x)}: {y:.4g}</title></circle>' for x, y in finite]
    for r, row in enumerate(legend):
        y = top + ph + 46 + 15 * r
        for name, i, dx in row:
            x = left + dx
            out.append(f'<line x1="{x:.1f}" x2="{x + 14:.1f}" y1="{y - 4}" y2="{y - 4}" stroke-width="2.5" '
                       f'stroke="{PALETTE[i % len(PALETTE)]}"/><text class="legend" x="{x + 18:.1f}" y="{y}">'
                       f'{escape(name)}</text>')
    out.append("</svg>")
    return "".join(out)


def _series(records: list[dict], kind: str, key: str, label: str | None) -> list[Series]:
    rows = [r for r in records if r.get("kind", "train") == kind]
    if key.endswith("*"):
        keys = list(dict.fromkeys(k for r in rows for k in r if k.startswith(key[:-1])))
        labelled = [(k, k[len(key) - 1:]) for k in keys]
    else:
        labelled = [(key, label or key)]
    out = []
    for k, name in labelled:
        points = [(number(r.get("step")), number(r.get(k))) for r in rows]
        points = sorted(((x, y) for x, y in points if x is not None), key=lambda p: p[0])
        out.append(Series(name, points, markers=kind == "eval"))
    return out


def curves_html(records: list[dict]) -> str:
    """The small multiples of `CURVES` that have data, each wrapped in a `<figure>`."""
    charts = []
    for title, specs in CURVES:
        svg = line_chart(title, [s for spec in specs for s in _series(records, *spec)])
        if svg:
            charts.append(f"<figure>{svg}</figure>")
    return "".join(charts)
