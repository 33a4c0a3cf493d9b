"""GET /metrics (Prometheus text format) and GET /api/metrics (a JSON summary), both read from
the same registry (app/services/metrics.py). Who may read them: anyone when METRICS_TOKEN is
empty, else `Authorization: Bearer <METRICS_TOKEN>` or the system secret (X-System-Secret)."""
from __future__ import annotations

import hmac

from flask import Response, request
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from app.api.auth import require_system_secret
from app.api.common import json_response
from app.errors import AuthenticationFailed, NotFound
from app.runtime import runtime
from app.services.metrics_summary import summary


def _allowed() -> None:
    rt = runtime()
    if not rt.settings.METRICS_ENABLED:
        raise NotFound("Metrics are off on this gateway (METRICS_ENABLED=0).")
    token = rt.settings.METRICS_TOKEN
    if not token:
        return
    if request.headers.get("X-System-Secret"):
        require_system_secret()
        return
    auth = request.headers.get("Authorization", "")
    given = auth[7:].strip() if auth[:7].lower() == "bearer " else ""
    if not given or not hmac.compare_digest(given.encode(), token.encode()):
        raise AuthenticationFailed("Missing or wrong metrics token (Authorization: Bearer <METRICS_TOKEN>).",
                                   code="invalid_metrics_token")


def prometheus() -> Response:
    _allowed()
    body = generate_latest(runtime().metrics.collection_registry())
    return Response(body, mimetype=CONTENT_TYPE_LATEST.split(";")[0], content_type=CONTENT_TYPE_LATEST)


def summary_json() -> Response:
    _allowed()
    rt = runtime()
    outbox = rt.usage_batcher.outbox_depth()
    return json_response(summary(rt.metrics, {"outbox_rows": outbox.get("redis"),
                                              "spool_bytes": outbox.get("spool_bytes")}))
