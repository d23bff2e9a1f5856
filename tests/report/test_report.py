"""The HTML run report: structure counted with a parser, escaping of model text, the CLI, and a headless-Chromium
render (skipped when /usr/bin/chromium is absent; install it with `apt-get install -y chromium`)."""

import argparse
import json
import os
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest

from llmrl.report import add_subcommand, write_report
from llmrl.report.charts import nice_ticks
from llmrl.report.html import heat_style, token_text

CHROMIUM = "/usr/bin/chromium"
HOSTILE = '<script>alert(1)</script><img src=x onerror="document.body.dataset.pwned=1">'


class Page(HTMLParser):
    """Elements as (tag, attrs, index of the enclosing svg.chart or None); raw text per element class."""

    def __init__(self, text: str):
        super().__init__()
        self.elements, self.svg, self.text = [], None, []
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "svg" and "chart" in attrs.get("class", "").split():
            self.svg = len(self.elements)
        self.elements.append((tag, attrs, self.svg))

    def handle_endtag(self, tag):
        if tag == "svg":
            self.svg = None

    def handle_data(self, data):
        self.text.append(data)

    def find(self, tag, cls=None):
        return [(a, s) for t, a, s in self.elements if t == tag and (cls is None or cls in a.get("class", "").split())]


def train_row(step, **extra):
    return {"kind": "train", "step": step, "reward": 0.1 * step, "reward/correct": 0.1 * step, "reward/format": 0.5,
            "reward_failures": 0, "kl_to_ref": 0.01 * step, "entropy": 1.0 - 0.05 * step, "clip_fraction": 0.02,
            "response_length": 20 + step, "tokens_per_s": 50.0, "time_rollout": 1.0, "time_reward": 0.1,
            "time_ref_values": 0.3, "time_update": 2.0, "time_step": 3.4, "lr": 1e-5, "grad_norm": 0.7,
            "loss_policy": -0.01, "zero_variance_group_fraction": 0.5, "duplicate_completion_fraction": 0.25,
            "truncated_fraction": 0.1 * step, **extra}


def sample(step, group, reward, tokens, advantages, mask=None, step_ids=None, completion=None):
    return {"step": step, "group": group, "prompt": f"What is 6*7? (group {group})",
            "completion": completion if completion is not None else "".join(tokens), "tokens": tokens,
            "response_mask": mask or [1] * len(tokens), "advantages": advantages, "step_ids": step_ids,
            "reward": reward, "reward_components": {"correct": reward, "format": 1.0}, "correct": reward}


@pytest.fixture
def run_dir(tmp_path):
    d = tmp_path / "run"
    d.mkdir()
    rows = [{"kind": "eval", "step": 0, "heldout_accuracy": 0.2, "heldout_response_length": 30,
             "heldout_kl_to_ref": 0.0, "time_eval": 5.0}]
    for step in range(1, 7):
        extra = {"kl_to_ref": None} if step == 4 else {}           # a null: a gap in the KL line
        rows.append(train_row(step, weird={"nested": [1]}, note="text", flag=True, **extra))
        if step % 3 == 0:
            rows.append({"kind": "eval", "step": step, "heldout_accuracy": 0.2 + 0.05 * step, "heldout_exact": 0.2,
                         "heldout_response_length": 30 - step, "heldout_kl_to_ref": 0.02 * step, "time_eval": 5.0})
    del rows[1]["kl_to_ref"]                                       # a missing field
    lines = [json.dumps(r) for r in rows] + ['{"kind": "train", "step": 7, "rew']   # a torn last line
    (d / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    samples = [
        # step 6, group 0: a tool call whose output token "42" is masked; two reasoning steps split at "\n"
        sample(6, 0, 1.0, ["I", " call", " calc", "42", "\n", "So", " 42"], [0.5, 0.5, 0.5, 0.0, 0.5, 0.5, 0.5],
               mask=[1, 1, 1, 0, 1, 1, 1], step_ids=[0, 0, 0, 0, 0, 1, 1]),
        sample(6, 0, 0.0, ["<script>", "alert(1)", "</script>"], [-0.5, -0.5, -0.5], completion=HOSTILE),
        sample(6, 1, 1.0, ["42"], [0.0]),
        sample(3, 0, 0.0, ["41"], [-0.25]),
        sample(1, 0, 1.0, ["older", " step"], [0.1, 0.1]),       # in the table, but not among the latest 2 steps
    ]
    (d / "samples.jsonl").write_text("".join(json.dumps(s) + "\n" for s in samples))
    (d / "config.yaml").write_text("run:\n  name: <b>run</b>\n")
    (d / "summary.yaml").write_text("steps: 6\ncheckpoint: run/final\nbefore: {heldout_accuracy: 0.2, "
                                    "heldout_response_length: 30}\nafter: {heldout_accuracy: 0.5, "
                                    "heldout_response_length: 24, heldout_kl_to_ref: 0.12}\n")
    return d


def test_report_structure(run_dir):
    path = write_report(run_dir)
    assert path == run_dir / "report.html"
    text = path.read_text()
    page = Page(text)
    charts = {a["aria-label"]: a for a, _ in page.find("svg", "chart")}
    series = [s for _, s in page.find("path", "series")]
    for i, (tag, a, _) in enumerate(page.elements):        # data-series counts the series paths each chart drew
        if tag == "svg" and "chart" in a.get("class", ""):
            assert int(a["data-series"]) == series.count(i)
    assert {k: int(a["data-series"]) for k, a in charts.items()} == {
        "reward": 3, "held-out accuracy": 2, "KL(policy ‖ reference)": 2, "entropy": 1, "clip fraction": 1,
        "response length (tokens)": 2, "time per phase (s)": 5, "losses": 1, "gradient norm": 1,
        "learning rate": 1, "rollout tokens / s": 1, "reward failures": 1,
        "samples that teach nothing (fraction)": 3}
    assert all(a["d"].startswith("M") for a, _ in page.find("path", "series"))
    kl = next(a["d"] for a, s in page.find("path", "series") if page.elements[s][1]["aria-label"].startswith("KL"))
    assert kl.count("M") == 2                              # the null at step 4 breaks the train KL line
    # heatmaps: the latest two steps (6 and 3, not 1), every token of their samples, one masked, one step boundary
    toks = page.find("span", "tok")
    assert len(toks) == 7 + 3 + 1 + 1
    assert len(page.find("span", "obs")) == 1 and len(page.find("span", "step-boundary")) == 1
    assert sum(a["title"].startswith("A=") for a, _ in toks) == 11
    assert 'title="A=0.500" style="background:rgb(33,102,172);color:#fff"' in text      # full blue at max |A|
    assert "⏎</i><br>" in text
    # model text is escaped everywhere: the only script is the report's own
    assert len(page.find("script")) == 1 and not page.find("img")
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in text and "<b>run</b>" not in text
    assert text.index("<td class=\"num\">6</td>") < text.index("<td class=\"num\">3</td>")     # latest step first
    assert "older" in text and "<h3>step 6" in text and "<h3>step 1" not in text
    assert "skipped 1 unreadable line(s) in metrics.jsonl" in text
    assert "<th>before</th>" in text and "0.500" in text and "<summary>config.yaml</summary>" in text
    assert "https://" not in text and "http://" not in text.replace('xmlns="http://www.w3.org/2000/svg"', "")


def test_report_minimal_run_and_errors(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"kind": "train", "step": 1}\n')
    out = write_report(tmp_path, tmp_path / "sub" / "r.html")
    page = Page(out.read_text())
    assert not page.find("svg") and "no samples.jsonl" in out.read_text()
    with pytest.raises(FileNotFoundError, match="no metrics.jsonl"):
        write_report(tmp_path / "missing")


def test_cli_subcommand(run_dir, tmp_path, capsys):
    parser = argparse.ArgumentParser()
    add_subcommand(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["report", str(run_dir), "--out", str(tmp_path / "x.html")])
    assert args.fn(args) == 0 and (tmp_path / "x.html").exists() and "x.html" in capsys.readouterr().out
    args = parser.parse_args(["report", str(tmp_path / "nope")])
    assert args.fn(args) == 2 and "no metrics.jsonl" in capsys.readouterr().err


def test_helpers_by_hand():
    assert nice_ticks(0.0, 1.0) == [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]
    assert nice_ticks(-0.13, 0.37) == [-0.1, 0.0, 0.1, 0.2, 0.3]
    assert heat_style(0.0, 2.0) == "background:rgb(255,255,255)"
    assert heat_style(-2.0, 2.0) == "background:rgb(215,48,39);color:#fff"
    assert heat_style(1.0, 2.0) == "background:rgb(144,178,214)"
    assert heat_style(9.0, 2.0) == heat_style(2.0, 2.0)
    assert token_text(" a<\n") == '<i class="ws">·</i>a&lt;<i class="ws">⏎</i><br>'
    assert token_text("") == '<i class="ws">∅</i>'


def chromium(tmp_path, *args) -> str:
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'profile'}"]
    try:
        return subprocess.run([CHROMIUM, *flags, *args], capture_output=True, text=True, timeout=90, check=True).stdout
    except subprocess.TimeoutExpired:   # an alert() from unescaped model text blocks headless Chromium forever
        pytest.fail("chromium hung: did model text run as script (a blocking alert dialog)?")


@pytest.mark.skipif(not os.path.exists(CHROMIUM), reason=f"{CHROMIUM} absent (apt-get install -y chromium)")
def test_report_renders_in_chromium(run_dir, tmp_path):
    path = write_report(run_dir)
    page = Page(chromium(tmp_path, "--dump-dom", path.as_uri()))
    body = page.find("body")[0][0]
    n_series = len(page.find("path", "series"))
    assert body.get("data-ready") == "1" and "data-pwned" not in body      # our JS ran, the hostile text did not
    assert n_series == 24 and int(body["data-drawn"]) == n_series           # every series has a rendered box
    png = tmp_path / "shot.png"
    chromium(tmp_path, f"--screenshot={png}", "--window-size=1200,3000", path.as_uri())
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    Image = pytest.importorskip("PIL.Image")
    colours = Image.open(png).convert("RGB").resize((120, 300)).getcolors(maxcolors=1 << 16)
    assert colours is None or len(colours) > 50                             # not a blank page
    if os.environ.get("LLMRL_REPORT_SHOT"):                                 # keep the screenshot to look at
        Path(os.environ["LLMRL_REPORT_SHOT"]).write_bytes(png.read_bytes())


def test_standalone_svg_carries_its_styles():
    from llmrl.report.charts import Series, line_chart, standalone_svg
    svg = standalone_svg(line_chart("t", [Series("a", [(0, 1.0), (1, 2.0)]), Series("b", [(0, 2.0), (1, 1.0)])]))
    assert svg.startswith("<?xml") and svg.count("<svg") == 1 and "<style>" in svg
    assert "path.series{fill:none" in svg       # without it a browser fills the lines black
