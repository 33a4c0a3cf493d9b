"""The guarded overrides of app/overrides.py: each is used only with the library version and
hooks it was written for, else it is not installed and one log line says so; each can be
switched off; the gunicorn response writer is installed in every real gunicorn worker."""
from __future__ import annotations

import http.client
import logging

import pytest
from gunicorn.http import wsgi as gunicorn_wsgi

from app import overrides
from Testing.conftest import app_config
from Testing.support import GatewayProcess, wait_until

# The versions the overrides were written for: a library upgrade must fail here (and be
# re-checked against the override's hooks) before it disables an override in production.
WRITTEN_FOR = {"gunicorn_response_writer": "27.0.", "http_client_one_send": "3.11.",
               "tiktoken_local_files": "0.14.", "redis_pool_bypass": "8.1."}
OTHER_VERSION = {"gunicorn_response_writer": "28.0.0", "http_client_one_send": "3.13.1",
                 "tiktoken_local_files": "0.15.0", "redis_pool_bypass": "7.4.0"}


def _records(caplog) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "gateway.overrides"]


@pytest.mark.parametrize("override", overrides.ALL, ids=lambda o: o.name)
def test_installed_libraries_are_the_versions_the_overrides_were_written_for(override, caplog):
    """With the pinned libraries every override is usable, and nothing is logged."""
    caplog.set_level(logging.INFO, logger="gateway.overrides")
    assert override.written_for == WRITTEN_FOR[override.name]
    assert override.usable(True) is True
    assert _records(caplog) == []


@pytest.mark.parametrize("override", overrides.ALL, ids=lambda o: o.name)
def test_another_library_version_disables_the_override_with_one_log_line(override, caplog):
    """A version other than the one it was written for: not usable, one warning naming both."""
    caplog.set_level(logging.INFO, logger="gateway.overrides")
    assert override.usable(True, version=OTHER_VERSION[override.name]) is False
    [record] = _records(caplog)
    assert record.levelno == logging.WARNING
    assert override.name in record.getMessage() and OTHER_VERSION[override.name] in record.getMessage()
    assert WRITTEN_FOR[override.name] in record.getMessage()


@pytest.mark.parametrize("override", overrides.ALL, ids=lambda o: o.name)
def test_a_switched_off_override_is_not_used_and_says_so_once(override, caplog):
    caplog.set_level(logging.INFO, logger="gateway.overrides")
    assert override.usable(False) is False
    [record] = _records(caplog)
    assert override.switch in record.getMessage() and "switched off" in record.getMessage()


def test_gunicorn_without_the_hook_keeps_its_own_writer(monkeypatch, caplog):
    """A gunicorn whose Response has no `_emit_body` (the hook the writer is built on): the
    writer is not installed, gunicorn's own Response stays, one warning names the hook."""
    caplog.set_level(logging.INFO, logger="gateway.overrides")
    original = gunicorn_wsgi.Response
    monkeypatch.delattr(gunicorn_wsgi.Response, "_emit_body")
    assert overrides.install_gunicorn_writer(True) is False
    assert gunicorn_wsgi.Response is original
    [record] = _records(caplog)
    assert "Response._emit_body" in record.getMessage()


def test_gunicorn_writer_switched_off_is_not_installed(monkeypatch):
    monkeypatch.setattr(gunicorn_wsgi, "Response", gunicorn_wsgi.Response)  # restored afterwards
    original = gunicorn_wsgi.Response
    assert overrides.install_gunicorn_writer(False) is False
    assert gunicorn_wsgi.Response is original
    assert overrides.install_gunicorn_writer(True) is True
    assert gunicorn_wsgi.Response is overrides.OneSendResponse


def test_redis_without_a_hook_disables_the_pool_bypass(monkeypatch, caplog):
    import redis
    caplog.set_level(logging.INFO, logger="gateway.overrides")
    for owner in [c for c in redis.Connection.__mro__ if "send_packed_command" in c.__dict__]:
        monkeypatch.delattr(owner, "send_packed_command")
    assert overrides.REDIS_POOL_BYPASS.usable(True) is False
    [record] = _records(caplog)
    assert "Connection.send_packed_command" in record.getMessage()


def test_upstream_connection_classes_follow_the_switch():
    assert overrides.http_connection_classes(True) == (overrides.OneSendHTTPConnection,
                                                       overrides.OneSendHTTPSConnection)
    assert overrides.http_connection_classes(False) == (http.client.HTTPConnection, http.client.HTTPSConnection)


def _writer_lines(proc: GatewayProcess) -> dict[int, str]:
    lines = {}
    for line in proc.log_text().splitlines():
        if ": response writer " in line and "worker " in line:
            pid = int(line.split("worker ", 1)[1].split(":", 1)[0])
            lines[pid] = line.split(": response writer ", 1)[1]
    return lines


def test_every_gunicorn_worker_installs_the_response_writer(gateway):
    """Each worker of the real `gunicorn -k gevent` gateway logs, before serving, that its
    HTTP/1 responses use OneSendResponse."""
    pids = gateway.worker_pids()
    assert len(pids) == 2
    wait_until(lambda: set(pids) <= set(_writer_lines(gateway)), message="both workers' writer lines")
    lines = _writer_lines(gateway)
    assert [lines[p] for p in pids] == ["OneSendResponse (override installed)"] * 2


def test_gunicorn_workers_keep_their_own_writer_when_switched_off(pg_url, models_file, tmp_path):
    """OVERRIDE_GUNICORN_WRITER=0: the worker serves with gunicorn's own Response, and says so."""
    env = {k: str(v) for k, v in app_config(pg_url, models_file, LOG_LEVEL="INFO").items()}
    env["OVERRIDE_GUNICORN_WRITER"] = "0"
    with GatewayProcess(env, workers=1, log_path=tmp_path / "gunicorn.log") as proc:
        [pid] = proc.worker_pids()
        wait_until(lambda: pid in _writer_lines(proc), message="the worker's writer line")
        assert _writer_lines(proc)[pid] == "gunicorn's own"
        assert "override gunicorn_response_writer not installed: switched off" in proc.log_text()
