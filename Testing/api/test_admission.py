"""Admission control as the request path applies it (Flask test client, real Redis/PostgreSQL):
deployment quotas, the embedded in-process limiter, and keep-alive comments on streams."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from Testing.conftest import app_config, close_app, start_app
from Testing.support import SYSTEM_SECRET

MESSAGES = [{"role": "user", "content": "hello"}]


def _models_with_quotas(path: Path, upstream: str) -> Path:
    pricing = {"input_per_mtok": "0.15", "output_per_mtok": "0.60"}
    path.write_text(json.dumps({
        "providers": {"primary": {"type": "openai", "base_url": upstream, "api_key_env": "TEST_UPSTREAM_KEY"},
                      "secondary": {"type": "openai", "base_url": upstream, "api_key_env": "TEST_UPSTREAM_KEY"}},
        "models": {"quota-model": {"deployments": [
            {"provider": "primary", "model": "first-deployment", "priority": 1, "rpm": 2},
            {"provider": "secondary", "model": "second-deployment", "priority": 2, "rpd": 1}],
            "pricing": pricing},
            "tpm-model": {"deployments": [
                {"provider": "primary", "model": "tpm-limited", "priority": 1, "tpm": 100},
                {"provider": "secondary", "model": "tpm-spare", "priority": 2}],
                "pricing": pricing}},
    }))
    return path


@pytest.fixture
def quota_client(pg_url, fake_upstream, tmp_path, clean_db):
    models = _models_with_quotas(tmp_path / "models.json", fake_upstream.base_url)
    app = start_app(app_config(pg_url, models))
    yield app.test_client()
    close_app(app)


def _mint(client, **fields) -> str:
    resp = client.post("/v1/api-keys", json={"name": "k", "tenant": "t", **fields},
                       headers={"X-System-Secret": SYSTEM_SECRET})
    assert resp.status_code == 201, resp.get_json()
    return resp.get_json()["key"]


def test_deployment_at_its_quota_is_skipped_then_429(quota_client, fake_upstream):
    """A deployment at its provider quota is skipped for the next one; when none is left the
    client gets 429, and the usage rows name the deployment that served each request."""
    key = _mint(quota_client)
    fake_upstream.reset()
    headers = {"Authorization": f"Bearer {key}"}
    codes = [quota_client.post("/v1/chat/completions", json={"model": "quota-model", "messages": MESSAGES},
                               headers=headers).status_code for _ in range(4)]
    assert codes == [200, 200, 200, 429]
    served = [r["body"]["model"] for r in fake_upstream.requests() if r["path"].endswith("/chat/completions")]
    assert served == ["first-deployment", "first-deployment", "second-deployment"]


def test_deployment_tpm_quota_counts_tokens_of_keys_without_limits(quota_client, fake_upstream):
    """A deployment's TPM quota counts every request's reserved tokens (prompt + max_tokens),
    even for a key with no limits of its own: the second 60-token request moves on."""
    key = _mint(quota_client)
    fake_upstream.reset()
    for _ in range(2):
        resp = quota_client.post("/v1/chat/completions", headers={"Authorization": f"Bearer {key}"},
                                 json={"model": "tpm-model", "messages": MESSAGES, "max_tokens": 60})
        assert resp.status_code == 200
    served = [r["body"]["model"] for r in fake_upstream.requests() if r["path"].endswith("/chat/completions")]
    assert served == ["tpm-limited", "tpm-spare"]


def test_embedded_limiter_without_redis(pg_url, models_file, clean_db):
    """Without REDIS_URL the in-process limiter applies the same limits (here rpm_limit=2)."""
    app = start_app(app_config(pg_url, models_file, REDIS_URL=""))
    client = app.test_client()
    key = _mint(client, rpm_limit=2)
    headers = {"Authorization": f"Bearer {key}"}
    codes = [client.post("/v1/chat/completions", json={"model": "demo", "messages": MESSAGES},
                         headers=headers).status_code for _ in range(3)]
    assert codes == [200, 200, 429]
    health = client.get("/health").get_json()
    assert "not configured" in health["redis"]
    close_app(app)


def test_keepalive_comments_while_upstream_is_silent(pg_url, models_file, clean_db):
    """While the upstream is silent longer than STREAM_KEEPALIVE_S, the client receives
    `: keep-alive` comments between events (so proxies and clients keep the stream)."""
    app = start_app(app_config(pg_url, models_file, STREAM_KEEPALIVE_S=0.01))
    client = app.test_client()
    key = _mint(client)
    resp = client.post("/v1/chat/completions", json={"model": "slow", "messages": MESSAGES, "stream": True,
                                                     "max_tokens": 3},
                       headers={"Authorization": f"Bearer {key}"}, buffered=True)
    body = resp.get_data()
    assert resp.status_code == 200
    assert b": keep-alive\n\n" in body and body.rstrip().endswith(b"data: [DONE]")
    close_app(app)
