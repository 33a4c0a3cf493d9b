"""Secrets never shown: every configured credential is removed verbatim, whatever its shape,
from upstream messages relayed to clients and from log records.

Providers register the environment variables holding their keys (read at each redaction, so
a rotated key is covered) and the credentials they obtain at run time (OAuth access tokens).
Values that merely look like credentials (`sk-...`, `Bearer ...`, `key=...`, Google `AIza...`)
are removed too, for secrets the gateway was never told about.
"""
from __future__ import annotations

import logging
import os
import re

_SECRET_PATTERN = re.compile(r"(sk-[A-Za-z0-9_\-*]{4,}|(?:Bearer|Basic)\s+\S+|key=[^&\s]+"
                             r"|AIza[0-9A-Za-z_\-]{10,})")
MIN_SECRET_LEN = 6  # a shorter value would redact ordinary words
REDACTED = "[redacted]"

_secret_env_names: set[str] = set()
_secret_values: set[str] = set()


def register_secret_env(name: str | None) -> None:
    """The environment variable `name` holds a credential: its value is never shown."""
    if name:
        _secret_env_names.add(name)


def register_secret(value: str | None) -> None:
    """`value` (an OAuth access token, ...) is a credential: it is never shown."""
    if value and len(value) >= MIN_SECRET_LEN:
        _secret_values.add(value)


def configured_secrets() -> list[str]:
    """Every configured secret value, longest first (a key that contains another goes whole)."""
    values = set(_secret_values)
    for name in _secret_env_names:
        value = os.environ.get(name, "")
        if len(value) >= MIN_SECRET_LEN:
            values.add(value)
    return sorted(values, key=len, reverse=True)


def redact(text: str) -> str:
    """`text` without any configured secret or anything shaped like a credential."""
    for secret in configured_secrets():
        if secret in text:
            text = text.replace(secret, REDACTED)
    return _SECRET_PATTERN.sub(REDACTED, text)


class RedactingFilter(logging.Filter):
    """A handler filter: the formatted message (and traceback text) of every record is
    redacted before any handler writes it."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        clean = redact(message)
        if clean != message:
            record.msg, record.args = clean, None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        return True


def install_log_redaction() -> None:
    """Put the redacting filter on every handler of the root logger and of gunicorn's error
    log (call it once the handlers exist). Idempotent."""
    loggers = [logging.getLogger(), logging.getLogger("gunicorn.error")]
    for logger in loggers:
        for handler in logger.handlers:
            if not any(isinstance(f, RedactingFilter) for f in handler.filters):
                handler.addFilter(RedactingFilter())
