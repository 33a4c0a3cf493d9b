"""The gateway's Flask application factory."""
from __future__ import annotations

import logging
from typing import Any, Mapping

from flask import Flask, Response, current_app, g, request

from app.api.common import assign_request_id
from app.api.request_guard import RequestGuard
from app.api.stream_deadline import with_send_deadline
from app.config import Settings, load_dotenv_once
from app.errors import register_error_handlers
from app.extensions import cors, db
from app.runtime import Runtime, build_runtime
from app.services import catalog_reload
from app.services.request_lines import use_json_format
from app.utils.clock import SYSTEM_CLOCK, Clock
from app.utils.redaction import install_log_redaction

log = logging.getLogger("gateway")


def create_app(config: Settings | Mapping[str, Any] | None = None, clock: Clock = SYSTEM_CLOCK) -> Flask:
    """Build the app around a runtime (not started: see app/runtime.py). `config`: a Settings,
    or a mapping of overrides on top of the environment. `clock`: the time source of every
    time-dependent decision (tests pass a FakeClock)."""
    load_dotenv_once()
    if isinstance(config, Settings):
        settings = config
    else:
        settings = Settings.from_env()
        for name, value in (config or {}).items():
            setattr(settings, name, value)
        settings.DATABASE_URL = Settings.from_env({"DATABASE_URL": settings.DATABASE_URL}).DATABASE_URL
    _configure_logging(settings.LOG_LEVEL)
    if settings.LOG_FORMAT == "json":
        use_json_format()
    install_log_redaction()

    app = Flask(__name__)
    app.config.from_mapping(settings.to_flask())
    if settings.embedded_database:
        from app.config import DEFAULT_SQLITE_PATH
        DEFAULT_SQLITE_PATH.parent.mkdir(parents=True, exist_ok=True)
    db.init_app(app)
    cors.init_app(app, origins=[o.strip() for o in settings.CORS_ORIGINS.split(",") if o.strip()],
                  expose_headers=["X-Request-ID", "X-Gateway-Request-ID", "Retry-After",
                                  "x-ratelimit-limit-requests", "x-ratelimit-remaining-requests",
                                  "x-ratelimit-reset-requests",
                                  "x-ratelimit-limit-tokens", "x-ratelimit-remaining-tokens",
                                  "x-ratelimit-reset-tokens"])
    _answer_cors_without_origin_at_once(app)

    with app.app_context():
        engine = db.engine
    rt = build_runtime(settings, engine=engine, clock=clock)
    app.extensions["gateway"] = rt
    # models.json reloads in every worker of every replica (POST /v1/admin/reload, key events)
    app.extensions["catalog_reloader"] = catalog_reload.CatalogReloader(rt).install()

    from app.api.routes import api, messages_api
    from app.api.console_controller import console
    app.register_blueprint(api)
    app.register_blueprint(messages_api)
    app.register_blueprint(console)
    register_error_handlers(app)
    app.before_request(_assign_request_id)
    app.after_request(_request_id_header)
    app.after_request(_stream_idle_deadline)
    # Client address, connections per address, the body read with a deadline, security headers.
    app.wsgi_app = RequestGuard(app.wsgi_app, settings)  # type: ignore[method-assign]
    _announce_mode(rt)
    return app


def _answer_cors_without_origin_at_once(app: Flask) -> None:
    """flask-cors matches the path and builds its headers again for every response, ~8% of a
    cached answer's CPU here, though for a request without an `Origin` header (API clients,
    every non-browser call) they never change. They are asked of flask-cors once, for such a
    request, and then set by a hook that runs just before its own; flask-cors leaves a response
    that already has `Access-Control-Allow-Origin` alone (its documented behaviour for views
    that set CORS themselves). Browsers (with `Origin`) and preflights still go through it."""
    with app.test_request_context("/v1/models", method="GET"):
        probe = app.process_response(app.response_class())   # only flask-cors' hook is registered yet
    constant = [(k, v) for k, v in probe.headers.items() if k.startswith("Access-Control-")]
    if not any(k == "Access-Control-Allow-Origin" for k, _ in constant):
        return   # several origins configured: nothing is sent without Origin, leave it to flask-cors

    def _cors_without_origin(resp: Response) -> Response:
        if ("HTTP_ORIGIN" not in request.environ and request.method != "OPTIONS"
                and "Access-Control-Allow-Origin" not in resp.headers):
            resp.headers.extend(constant)
        return resp
    app.after_request(_cors_without_origin)   # after-request hooks run last-registered first


def _assign_request_id() -> None:
    assign_request_id()  # (a before_request function that returned a value would be the response)


def _request_id_header(resp: Response) -> Response:
    """The request's public id (the client's X-Request-ID when valid, else the gateway's),
    and the gateway's own id of the usage row when the client named the request itself."""
    rid = g.get("request_id")
    if rid:
        resp.headers["X-Request-ID"] = rid
        resp.headers["request-id"] = rid  # the name Anthropic's SDKs read (`message._request_id`)
    own = g.get("gateway_request_id")
    if own:
        resp.headers["X-Gateway-Request-ID"] = own
    return resp


def _stream_idle_deadline(resp: Response) -> Response:
    """A streamed answer to a client that stops reading blocks its worker's send once the
    client's TCP window is full: under gunicorn each write gets a deadline
    (STREAM_CLIENT_IDLE_S, app/api/stream_deadline.py). The upstream is not read meanwhile
    (back-pressure in app/utils/streaming.py)."""
    idle = current_app.config.get("STREAM_CLIENT_IDLE_S") or 0
    sock = request.environ.get("gunicorn.socket")
    if idle > 0 and sock is not None and not resp.is_sequence and resp.mimetype == "text/event-stream":
        resp.response = with_send_deadline(resp.response, sock, idle)
    return resp


def _configure_logging(level: str) -> None:
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("gateway").setLevel(level.upper())


def _announce_mode(rt: Runtime) -> None:
    settings, n_models = rt.settings, len(rt.providers.catalog.models)
    db_mode = "embedded SQLite (instance/)" if settings.embedded_database else "PostgreSQL"
    limiter = ("embedded in-process limiter (REDIS_URL not set: limits hold for this process only)"
               if settings.embedded_limiter else "Redis")
    log.info("gateway ready: database=%s, limits=%s, %d models, overrides: %s", db_mode, limiter, n_models,
             ", ".join(f"{name}={'on' if on else 'off'}" for name, on in rt.overrides.items()))
    if not settings.SYSTEM_SECRET:
        log.warning("SYSTEM_SECRET is not set: the admin API answers 503")
