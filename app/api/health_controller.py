"""GET /health: database, Redis and this worker's counters."""
from __future__ import annotations

import os

from flask import Response, current_app
from sqlalchemy import text
from sqlalchemy.exc import SQLAlchemyError

from app.api.common import json_response
from app.runtime import runtime
from app.services import read_replica


def health() -> Response:
    rt = runtime()
    status, code = {"status": "ok"}, 200
    try:
        with rt.engine.connect() as conn:
            conn.execute(text("SELECT 1"))
        status["database"] = "ok" if not rt.settings.embedded_database else "ok (embedded sqlite)"
    except SQLAlchemyError:
        status["database"], code = "unavailable", 503
    if rt.redis is None:
        status["redis"] = "not configured (embedded in-process limiter)"
    else:
        try:
            rt.redis.ping()
            status["redis"] = "ok"
        except Exception:
            status["redis"], code = "unavailable", 503
    if code != 200:
        status["status"] = "degraded"
    # Counters of the worker that answered (each gunicorn worker has its own).
    status["worker"] = {"pid": os.getpid(), **rt.usage_batcher.stats(),
                        "rate_limit_fail_mode": rt.settings.RATE_LIMIT_FAIL_MODE,
                        "fail_open_admissions": rt.limiter.fail_open_admissions}
    # The catalogue this worker serves (a reload reaches every worker: compare their digests).
    reloader = current_app.extensions.get("catalog_reloader")
    status["models"] = {"count": len(rt.providers.catalog.models),
                        "digest": reloader.digest[:16] if reloader else None}
    # The PostgreSQL replica of the read-only queries (reads fall back to the primary when it fails).
    if rt.settings.DATABASE_READ_URL:
        status["read_replica"] = read_replica.of(current_app, rt).status()
    # Usage records waiting for PostgreSQL: the shared Redis list and this machine's spool files.
    status["usage_outbox"] = rt.usage_batcher.outbox_depth()
    return json_response(status, code)
