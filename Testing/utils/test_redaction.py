"""Configured secrets are removed verbatim from messages and log records (app/utils/redaction.py)."""
from __future__ import annotations

import io
import logging
import secrets

from app.utils.redaction import RedactingFilter, redact, register_secret, register_secret_env


def test_key_of_any_shape_from_its_variable_is_redacted(monkeypatch):
    """A provider key whose shape no pattern knows is removed because its variable is registered,
    including a rotated value (read at each redaction)."""
    monkeypatch.setenv("TEST_REDACT_GROQ_KEY", "gsk_" + "a1" * 20)
    register_secret_env("TEST_REDACT_GROQ_KEY")
    assert redact("bad key gsk_" + "a1" * 20 + "!") == "bad key [redacted]!"
    monkeypatch.setenv("TEST_REDACT_GROQ_KEY", "rotated-value-123")
    assert redact("key rotated-value-123 refused") == "key [redacted] refused"


def test_oauth_token_learnt_at_run_time_is_redacted():
    """An access token (GigaChat's OAuth) registered when obtained is never shown."""
    token = "eyJ" + secrets.token_hex(16)
    register_secret(token)
    assert token not in redact(f"token {token} expired")


def test_log_filter_redacts_messages_arguments_and_tracebacks():
    token = "tok-" + secrets.token_hex(12)
    register_secret(token)
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(RedactingFilter())
    logger = logging.getLogger("test.redaction")
    logger.addHandler(handler)
    try:
        logger.warning("upstream said %s", token)
        try:
            raise ValueError(f"bad {token}")
        except ValueError:
            logger.exception("failed")
    finally:
        logger.removeHandler(handler)
    out = stream.getvalue()
    assert token not in out and out.count("[redacted]") == 2
