"""The studio's pages: runs, rollout browser, held-out answers, preference pairs, step labels, audit."""

from __future__ import annotations

import math

from urllib.parse import urlencode

from flask import Flask, abort, current_app, redirect, render_template, request, url_for
from werkzeug.exceptions import BadRequest

from llmrl.report.charts import curves_html
from llmrl.report.html import sample_tokens
from llmrl.studio.app import CSS, GROUPS_PER_PAGE, LABELLER_COOKIE, MARKS, MESSAGES, Studio, visible
from llmrl.studio.data import (SampleFilter, filter_samples, groups_of, response_text, sample_length,
                               text_of)


# ----------------------------------------------------------------------------- helpers

def page(template: str, view: str, title: str, **kw):
    studio: Studio = request_studio()
    return render_template(template, view=view, title=title, css=CSS, token=studio.settings.token,
                           labeller=labeller(), message=MESSAGES.get(request.args.get("msg", "")), **kw)


def request_studio() -> Studio:
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


def _run(studio: Studio, run_id: int):
    if not 0 <= run_id < len(studio.runs):
        abort(404, f"no run {run_id}")
    return studio.runs[run_id]


def _item(items: list, key: str):
    found = next((it for it in items if it.key == key), None)
    if found is None:
        raise BadRequest("unknown item key (was the studio restarted with other inputs?)")
    return found


def register(app: Flask, studio: Studio) -> None:
    register_browse(app, studio)
    register_labels(app, studio)


def register_browse(app: Flask, studio: Studio) -> None:
    """Runs, rollouts, held-out answers, audit."""
    s = studio.settings

    @app.get("/")
    def index():
        return page("index.html", "index", "runs", runs=studio.runs, n_pairs=len(studio.pairs),
                    n_pairs_done=len(studio.pair_keys() & {p.key for p in studio.pairs}), n_steps=len(studio.steps),
                    n_steps_done=len(studio.step_store.keys() & {p.key for p in studio.steps}),
                    pairs_path=studio.pair_store.path, ties_path=studio.tie_store.path,
                    steps_path=studio.step_store.path)

    @app.get("/run/<int:run_id>")
    def rollouts(run_id: int):
        run, f = _run(studio, run_id), _filter_from_args()
        groups = filter_samples(run.samples, f)
        pages = max(1, math.ceil(len(groups) / GROUPS_PER_PAGE))
        page_no = min(max(1, request.args.get("page", 1, type=int)), pages)
        shown = dict(list(groups.items())[(page_no - 1) * GROUPS_PER_PAGE:page_no * GROUPS_PER_PAGE])
        args = {k: v for k, v in request.args.items() if k not in ("token", "page")}
        comps = sorted({k for r in run.samples if isinstance(r.get("reward_components"), dict)
                        for k in r["reward_components"]})
        return page("rollouts.html", "rollouts", run.name, run=run, run_id=run_id, f=f, args=args,
                    steps=sorted({int(r["step"]) for r in run.samples if isinstance(r.get("step"), int)}),
                    components=comps, n_groups=len(groups), n_samples=sum(map(len, groups.values())),
                    groups=_group_views(shown, groups_of(run.samples), _step_scales(run.samples)),
                    page=page_no, pages=pages, page_url=lambda n: url_with("rollouts", run_id=run_id, **args, page=n))

    @app.get("/run/<int:run_id>/heldout")
    def heldout(run_id: int):
        run = _run(studio, run_id)
        steps = sorted({int(r["step"]) for r in run.heldout if isinstance(r.get("step"), int)})
        prompts: dict[str, dict] = {}
        for r in run.heldout:
            p = prompts.setdefault(text_of(r.get("prompt")), {"prompt": text_of(r.get("prompt")),
                                                              "answer": r.get("answer", ""), "cells": {}})
            p["cells"][r.get("step")] = {"completion": r.get("completion", ""), "correct": r.get("correct")}
        accuracy = {int(e["step"]): f"{e['heldout_accuracy']:.3f}" for e in run.evals
                    if isinstance(e.get("step"), int) and isinstance(e.get("heldout_accuracy"), (int, float))}
        return page("heldout.html", "heldout", f"{run.name} held-out", run=run, run_id=run_id, steps=steps,
                    prompts=list(prompts.values()), accuracy=accuracy)

    @app.get("/audit")
    def audit():
        from llmrl.audit import DETECTORS, audit_run, load_run

        reports = []
        for run in studio.runs:
            try:
                findings, error = audit_run(load_run(run.path), s.audit_options), None
            except (ValueError, FileNotFoundError) as e:
                findings, error = [], str(e)
            reports.append({"run": run, "findings": findings, "error": error, "curves": curves_html(run.metrics)})
        return page("audit.html", "audit", "audit", reports=reports, detectors=DETECTORS.names(),
                    config_name=s.audit_config_name)


def register_labels(app: Flask, studio: Studio) -> None:
    """The labeller's name, preference pairs, step labels."""
    s = studio.settings

    @app.post("/labeller")
    def set_labeller():
        name = request.form.get("labeller", "").strip()
        if not valid_name(name):
            raise BadRequest("a labeller name is 1 to 64 printable characters")
        resp = go("index", msg="labeller")
        resp.set_cookie(LABELLER_COOKIE, name, httponly=True, samesite="Strict", max_age=365 * 86400)
        return resp

    @app.get("/pairs")
    def pairs():
        done = studio.pair_keys()
        item = studio.next_item(studio.pairs, done, request.args.get("after"))
        return page("pairs.html", "pairs", "preference pairs", item=item, total=len(studio.pairs),
                    done=len(done & {p.key for p in studio.pairs}), pairs_path=studio.pair_store.path,
                    prompt=text_of(item.prompt) if item else "", a=response_text(item.a) if item else "",
                    b=response_text(item.b) if item else "")

    @app.post("/pairs")
    def label_pair():
        item, choice = _item(studio.pairs, request.form.get("key", "")), request.form.get("choice", "")
        if choice not in ("a", "b", "tie"):
            raise BadRequest("choice must be a, b or tie")
        if item.key in studio.pair_keys():
            return go("pairs", msg="duplicate")
        if choice == "tie":
            written = studio.tie_store.append({"prompt": item.prompt, "a": item.a, "b": item.b, "tie": True,
                                               "source": item.source}, key=item.key, labeller=labeller(),
                                              exclusive_with=(studio.pair_store,))
        else:
            chosen, rejected = (item.a, item.b) if choice == "a" else (item.b, item.a)
            written = studio.pair_store.append({"prompt": item.prompt, "chosen": chosen, "rejected": rejected,
                                                "source": item.source}, key=item.key, labeller=labeller(),
                                               exclusive_with=(studio.tie_store,))
        return go("pairs", msg="saved" if written else "duplicate")

    @app.get("/steps")
    def steps():
        done = studio.step_store.keys()
        item = studio.next_item(studio.steps, done, request.args.get("after"))
        return page("steps.html", "steps", "step labels", item=item, total=len(studio.steps), mode=s.step_mode,
                    done=len(done & {p.key for p in studio.steps}), steps_path=studio.step_store.path)

    @app.post("/steps")
    def label_steps():
        item = _item(studio.steps, request.form.get("key", ""))
        marks = [request.form.get(f"step_{i}", "") for i in range(len(item.steps))]
        if not all(m in MARKS for m in marks):
            raise BadRequest(f"every step needs a mark ({', '.join(MARKS)})")
        written = studio.step_store.append({"prompt": item.prompt, "steps": item.steps,
                                            "labels": [MARKS[m] for m in marks], "marks": marks,
                                            "source": item.source}, key=item.key, labeller=labeller())
        return go("steps", msg="saved" if written else "duplicate")
