"""The guarded overrides of app/overrides.py: each is used only with the library version and
hooks it was written for, else it is not installed and one log line says so; each can be
switched off; every real gunicorn worker reports the overrides it uses."""
from __future__ import annotations

import logging

import pytest

from app import overrides
from Testing.conftest import app_config
from Testing.support import GatewayProcess, wait_until

# The versions the overrides were written for: a library upgrade must fail here (and be
# re-checked against the override's hooks) before it disables an override in production.
WRITTEN_FOR = {"tiktoken_local_files": "0.14.", "redis_pool_bypass": "8.1."}
OTHER_VERSION = {"tiktoken_local_files": "0.15.0", "redis_pool_bypass": "7.4.0"}


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


def test_redis_without_a_hook_disables_the_pool_bypass(monkeypatch, caplog):
    import redis
    caplog.set_level(logging.INFO, logger="gateway.overrides")
    for owner in [c for c in redis.Connection.__mro__ if "send_packed_command" in c.__dict__]:
        monkeypatch.delattr(owner, "send_packed_command")
    assert overrides.REDIS_POOL_BYPASS.usable(True) is False
    [record] = _records(caplog)
    assert "Connection.send_packed_command" in record.getMessage()


def test_tiktoken_without_the_hook_is_not_patched(monkeypatch, caplog):
    """A tiktoken whose encoding constructors no longer go through `load_tiktoken_bpe`: the
    local-file loader is not used, one warning names the missing hook."""
    import tiktoken_ext.openai_public as op
    caplog.set_level(logging.INFO, logger="gateway.overrides")
    monkeypatch.delattr(op, "load_tiktoken_bpe")
    assert overrides.TIKTOKEN_LOADER.usable(True) is False
    [record] = _records(caplog)
    assert "openai_public.load_tiktoken_bpe" in record.getMessage()


def _ready_lines(proc: GatewayProcess) -> list[str]:
    return [line for line in proc.log_text().splitlines() if "gateway ready:" in line]


def test_every_gunicorn_worker_uses_the_overrides(gateway):
    """Each worker of the real `gunicorn -k gevent` gateway built its runtime with both
    overrides in use, and says so when it is ready."""
    assert len(gateway.worker_pids()) == 2
    wait_until(lambda: len(_ready_lines(gateway)) >= 2, message="both workers ready")
    assert all(line.endswith("overrides: redis_pool_bypass=on, tiktoken_local_files=on")
               for line in _ready_lines(gateway))


def test_gunicorn_workers_without_the_redis_bypass_say_so(pg_url, models_file, tmp_path):
    """OVERRIDE_REDIS_POOL_BYPASS=0: the worker builds its runtime without the override, and
    one line says it is switched off (the limiter's rules through redis-py's pipeline are
    tested in Testing/services/test_rate_limit_service.py, backend "redis-pipeline")."""
    env = {k: str(v) for k, v in app_config(pg_url, models_file, LOG_LEVEL="INFO").items()}
    env["OVERRIDE_REDIS_POOL_BYPASS"] = "0"
    with GatewayProcess(env, workers=1, log_path=tmp_path / "gunicorn.log") as proc:
        wait_until(lambda: len(_ready_lines(proc)) == 1, message="the worker ready")
        assert _ready_lines(proc)[0].endswith("overrides: redis_pool_bypass=off, tiktoken_local_files=on")
        assert proc.log_text().count("override redis_pool_bypass not installed: switched off") == 1
