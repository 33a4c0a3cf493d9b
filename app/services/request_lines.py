"""The request log: one line per model request (logger `gateway.requests`), and the JSON log format.

A completion run's line is written by its settlement (`RequestLog.run`), once, whichever way it
ended; a request answered with an error before (or without) a run, by the error handler of
app/errors.py (`RequestLog.error`). Fields are built from ids, names of the code and of the
catalogue, and figures: never a key, a secret, a prompt or an upstream message.

`LOG_FORMAT=json` turns every log line of the gateway into one JSON object (`JsonFormatter`);
the request lines then carry their fields as JSON members. `text` (the default) writes them as
`name=value` pairs after the word `request`.
"""
from __future__ import annotations

import json
import logging
import time
from typing import Any

from app.utils.money import format_money

log = logging.getLogger("gateway.requests")

# The run endpoint name of each model route (url rule), for lines and labels of requests that
# were answered before a run began; other routes are named by their rule.
ROUTE_ENDPOINTS = {
    "/v1/chat/completions": "chat.completions", "/chat/completions": "chat.completions",
    "/v1/embeddings": "embeddings", "/embeddings": "embeddings",
    "/v1/images/generations": "images", "/images/generations": "images", "/image": "images",
    "/v1/responses": "responses", "/responses": "responses", "/v1/messages": "messages",
    "/api/chat": "api.chat", "/v1/uptime/<path:model_id>": "uptime",
}


def route_endpoint(rule: str | None) -> str:
    """The endpoint name of a URL rule ("unmatched" when no route matched)."""
    if rule is None:
        return "unmatched"
    return ROUTE_ENDPOINTS.get(rule, rule)


class RequestLog:
    """Writes the request lines (nothing when REQUEST_LOG=0 or the level hides INFO)."""

    def __init__(self, enabled: bool = True, json_format: bool = False) -> None:
        self.enabled = enabled
        self.json_format = json_format

    def run(self, trace: Any, event: Any) -> None:
        """The line of a settled completion run (`event`: its usage event, or None). Never raises."""
        if not self.enabled or not log.isEnabledFor(logging.INFO):
            return
        try:
            dep = trace.deployment
            key = trace.key
            fields: dict[str, Any] = {
                "event": "request", "request_id": trace.public_request_id or trace.request_id,
                "usage_id": trace.request_id, "key_id": key.id, "tenant_id": key.tenant_id,
                "tenant": key.tenant_name, "endpoint": trace.endpoint, "model": trace.entry.alias,
                "deployment": f"{dep.provider}/{dep.model}" if dep is not None else None,
                "status": "refused" if trace.refusal else trace.status, "streamed": trace.streamed,
                "attempts": trace.attempts, "cache": trace.cache,
            }
            if event is not None:
                fields["prompt_tokens"], fields["completion_tokens"] = event.prompt_tokens, event.completion_tokens
                fields["cost_usd"] = format_money(event.cost_usd)
                fields["latency_ms"], fields["ttft_ms"] = event.latency_ms, event.ttft_ms
            if trace.error_type is not None:
                fields["error_type"] = trace.error_type
            if trace.refusal is not None:
                fields["refusal"] = trace.refusal
            if trace.saved_cost is not None:
                fields["saved_usd"] = format_money(trace.saved_cost)
            self._write(fields)
        except Exception:  # noqa: BLE001 - a log line must never break a settlement
            logging.getLogger("gateway").exception("request line of %s not written", trace.request_id)

    def error(self, *, request_id: str | None, endpoint: str, http_status: int, code: str | None,
              refusal: str | None, key: Any = None) -> None:
        """The line of a request answered with an error that no run logged."""
        if not self.enabled or not log.isEnabledFor(logging.INFO):
            return
        self._write({"event": "request", "request_id": request_id, "key_id": getattr(key, "id", None),
                     "tenant_id": getattr(key, "tenant_id", None), "tenant": getattr(key, "tenant_name", None),
                     "endpoint": endpoint, "status": "refused" if refusal else "error",
                     "http_status": http_status, "error_code": code, "refusal": refusal})

    def _write(self, fields: dict[str, Any]) -> None:
        """The record made here and handed to the logger's handlers: `log.info` would also walk
        the stack for the caller's file and line (about 10 µs, a third of a line's cost)."""
        if self.json_format:
            record = logging.LogRecord(log.name, logging.INFO, __file__, 0, "request", None, None)
        else:
            text = " ".join(f"{k}={v}" for k, v in fields.items() if v is not None and k != "event")
            record = logging.LogRecord(log.name, logging.INFO, __file__, 0, "request %s", (text,), None)
        record.fields = fields
        log.handle(record)


# Built once: json.dumps with arguments builds an encoder per call.
_encode = json.JSONEncoder(separators=(",", ":"), default=str).encode


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts (UTC, ms), level, logger, message, the record's `fields`
    (request lines) and the exception's text (already redacted by the redacting filter)."""

    _second = -1
    _stamp = ""

    def _ts(self, created: float) -> str:
        second = int(created)
        if second != self._second:  # one strftime per second, not per line
            self._stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
            self._second = second
        return f"{self._stamp}.{int((created - second) * 1000):03d}Z"

    def format(self, record: logging.LogRecord) -> str:
        data: dict[str, Any] = {"ts": self._ts(record.created), "level": record.levelname, "logger": record.name,
                                "message": record.getMessage()}
        fields = getattr(record, "fields", None)
        if fields:
            data.update(fields)
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            data["exception"] = record.exc_text
        return _encode(data)


def use_json_format() -> None:
    """Every handler of the root logger and of gunicorn's error log writes JSON (idempotent)."""
    for name in ("", "gunicorn.error"):
        for handler in logging.getLogger(name).handlers:
            if not isinstance(handler.formatter, JsonFormatter):
                handler.setFormatter(JsonFormatter())
