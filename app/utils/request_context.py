"""The public id of the HTTP request being served (its X-Request-ID), for code below the API
layer that logs it (the request log line of a completion run) without knowing Flask.

A context variable: per greenlet under gevent, per thread under run.py's server. The API layer
sets it for each request (app/api/common.py `new_request_id`) before a run begins.
"""
from __future__ import annotations

from contextvars import ContextVar

_public_id: ContextVar[str | None] = ContextVar("gateway_public_request_id", default=None)


def set_public_request_id(value: str | None) -> None:
    _public_id.set(value)


def public_request_id() -> str | None:
    return _public_id.get()
