"""The studio's pages: runs, rollout browser, held-out answers, preference pairs, step labels, audit."""

from __future__ import annotations

import math

from flask import Flask, abort, request
from werkzeug.exceptions import BadRequest

from llmrl.report.charts import curves_html
from llmrl.studio.app import (GROUPS_PER_PAGE, LABELLER_COOKIE, MARKS, Studio, _filter_from_args, _group_views,
                              _step_scales, go, labeller, page, url_with, valid_name)
from llmrl.studio.data import filter_samples, groups_of, response_text, text_of


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
    s = studio.settings

    @app.get("/")
    def index():
        return page("index.html", "index", "runs", runs=studio.runs, n_pairs=len(studio.pairs),
                    n_pairs_done=len(studio.pair_keys() & {p.key for p in studio.pairs}), n_steps=len(studio.steps),
                    n_steps_done=len(studio.step_store.keys() & {p.key for p in studio.steps}),
                    pairs_path=studio.pair_store.path, ties_path=studio.tie_store.path,
                    steps_path=studio.step_store.path)

    @app.post("/labeller")
    def set_labeller():
        name = request.form.get("labeller", "").strip()
        if not valid_name(name):
            raise BadRequest("a labeller name is 1 to 64 printable characters")
        resp = go("index", msg="labeller")
        resp.set_cookie(LABELLER_COOKIE, name, httponly=True, samesite="Strict", max_age=365 * 86400)
        return resp

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
