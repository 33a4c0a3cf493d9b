"""The web console: static pages served by the gateway itself (`/ui/...`).

The console has no privileges of its own: its JavaScript calls the same JSON API with the
caller's key or system secret, which it keeps in the tab's sessionStorage. Every page is the
same HTML shell (`app/static/console/index.html`); `console.js` renders the page the path names.
Every answer of this blueprint carries a strict Content-Security-Policy: scripts and styles only
from this origin, no inline script or style, no framing, API calls only to this origin.
"""
from __future__ import annotations

from pathlib import Path

from flask import Blueprint, Response, redirect, send_file

from app.api.common import reject_unstorable_url_values

STATIC_DIR = Path(__file__).resolve().parent.parent / "static"
SHELL = STATIC_DIR / "console" / "index.html"

CONTENT_SECURITY_POLICY = "; ".join((
    "default-src 'none'",
    "script-src 'self'",
    "style-src 'self'",
    "img-src 'self'",
    "connect-src 'self'",
    "font-src 'self'",
    "manifest-src 'self'",
    "base-uri 'none'",
    "form-action 'self'",
    "frame-ancestors 'none'",
))
SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cross-Origin-Opener-Policy": "same-origin",
}

# Assets under /ui/assets/ (console pages, styles, scripts and the vendored chart library).
console = Blueprint("console", __name__, static_folder=str(STATIC_DIR), static_url_path="/ui/assets")
console.before_request(reject_unstorable_url_values)  # a NUL in the URL: 400, as for the API


@console.after_request
def _security_headers(resp: Response) -> Response:
    for name, value in SECURITY_HEADERS.items():
        resp.headers[name] = value
    if resp.mimetype == "text/html":
        resp.headers["Cache-Control"] = "no-store"
    return resp


def shell(page: str = "") -> Response:
    """The console's HTML shell for any /ui path (the script renders the page it names)."""
    return send_file(SHELL, mimetype="text/html", max_age=0)


def to_console(page: str = "") -> Response:
    return redirect(f"/ui/{page}", code=302)


console.add_url_rule("/", endpoint="root", view_func=to_console, methods=["GET"])
console.add_url_rule("/ui", endpoint="ui", view_func=shell, methods=["GET"])
console.add_url_rule("/ui/", endpoint="home", view_func=shell, methods=["GET"])
console.add_url_rule("/ui/<path:page>", endpoint="page", view_func=shell, methods=["GET"])
for alias, page in (("/playground", "playground"), ("/console", ""), ("/dashboard", "usage")):
    console.add_url_rule(alias, endpoint=f"alias_{page or 'home'}", view_func=to_console, methods=["GET"],
                         defaults={"page": page})
