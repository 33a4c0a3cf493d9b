"""Redis restarted under a running gunicorn gateway (issue 16 item 14): the limiter's pooled
connections died with the old server; the gateway reconnects before deciding Redis is down."""
from __future__ import annotations

import pytest

from Testing.conftest import app_config
from Testing.e2e.test_limits import chat, mint, private_redis  # noqa: F401 (a fixture)
from Testing.support import GatewayProcess


def _gateway(pg_url, models_file, tmp_path, redis_url, fail_mode):
    env = {k: str(v) for k, v in app_config(pg_url, models_file, REDIS_URL=redis_url,
                                            RATE_LIMIT_FAIL_MODE=fail_mode).items()}
    return GatewayProcess(env, workers=2, log_path=tmp_path / "gw.log")


def test_open_mode_never_serves_an_over_budget_key_after_a_restart(pg_url, models_file, tmp_path,
                                                                  private_redis, clean_db):
    """fail mode open, a key whose budget is 0 (every request over budget): refused before the
    restart, and still refused by the first requests after it (no 'Redis down, admit')."""
    with _gateway(pg_url, models_file, tmp_path, private_redis.url, "open") as gw:
        key = mint(gw, budget_usd="0")["key"]
        assert {chat(gw, key)[0] for _ in range(20)} == {429}  # every worker holds connections
        private_redis.stop()
        private_redis.start()
        after = [chat(gw, key) for _ in range(20)]
        assert {status for status, _, _ in after} == {429}, [a[2] for a in after if a[0] != 429]


def test_closed_mode_has_no_stray_503_after_a_restart(pg_url, models_file, tmp_path, private_redis, clean_db):
    """fail mode closed: once Redis answers again, not one request gets 503."""
    with _gateway(pg_url, models_file, tmp_path, private_redis.url, "closed") as gw:
        key = mint(gw, rpm_limit=100000)["key"]
        assert {chat(gw, key)[0] for _ in range(20)} == {200}
        private_redis.stop()
        private_redis.start()
        after = [chat(gw, key) for _ in range(20)]
        assert {status for status, _, _ in after} == {200}, [a[2] for a in after if a[0] != 200]
