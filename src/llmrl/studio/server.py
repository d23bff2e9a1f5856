"""The studio's Flask app: the state (`app.Studio`), the access token and headers, and the pages (`routes`).

    app = create_app(Settings(runs=[Path("runs/grpo")], labels_dir=Path("labels")))
"""

from __future__ import annotations

import hmac
from pathlib import Path

from flask import Flask, abort, request

from llmrl.studio.app import MAX_BODY, Settings, Studio, token_cookie, visible
from llmrl.studio.routes import register


def create_app(settings: Settings) -> Flask:
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
            request.args.get("token") or request.cookies.get(token_cookie(), ""))
        if not hmac.compare_digest(given.encode(), token.encode()):
            abort(403, "missing or wrong access token: open the URL `llmrl studio` printed")

    @app.before_request
    def reload_changed_runs():
        studio.refresh()

    @app.after_request
    def remember_token(resp):
        if request.args.get("token") == token:
            resp.set_cookie(token_cookie(), token, httponly=True, samesite="Strict")
        resp.headers["X-Content-Type-Options"] = "nosniff"
        resp.headers["Content-Security-Policy"] = ("default-src 'none'; style-src 'unsafe-inline'; "
                                                   "script-src 'unsafe-inline'; form-action 'self'; img-src 'self'")
        resp.headers["Referrer-Policy"] = "no-referrer"
        return resp

    register(app, studio)
    return app
