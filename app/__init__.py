"""The gateway's Flask application factory."""
from __future__ import annotations

import logging
from typing import Any, Mapping

from flask import Flask, Response, g

from app.api.request_guard import RequestGuard
from app.config import Settings, load_dotenv_once
from app.errors import register_error_handlers
from app.extensions import cors, db
from app.runtime import Runtime, build_runtime
from app.services import catalog_reload
from app.utils.clock import SYSTEM_CLOCK, Clock

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

    app = Flask(__name__)
    app.config.from_mapping(settings.to_flask())
    if settings.embedded_database:
        from app.config import DEFAULT_SQLITE_PATH
        DEFAULT_SQLITE_PATH.parent.mkdir(parents=True, exist_ok=True)
    db.init_app(app)
    cors.init_app(app, origins=[o.strip() for o in settings.CORS_ORIGINS.split(",") if o.strip()],
                  expose_headers=["X-Request-ID", "Retry-After", "x-ratelimit-limit-requests",
                                  "x-ratelimit-remaining-requests", "x-ratelimit-reset-requests",
                                  "x-ratelimit-limit-tokens", "x-ratelimit-remaining-tokens",
                                  "x-ratelimit-reset-tokens"])

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
    app.after_request(_request_id_header)
    # Client address, connections per address, the body read with a deadline, security headers.
    app.wsgi_app = RequestGuard(app.wsgi_app, settings)  # type: ignore[method-assign]
    _announce_mode(rt)
    return app


def _request_id_header(resp: Response) -> Response:
    rid = g.get("request_id")
    if rid:
        resp.headers["X-Request-ID"] = rid
        resp.headers["request-id"] = rid  # the name Anthropic's SDKs read (`message._request_id`)
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
