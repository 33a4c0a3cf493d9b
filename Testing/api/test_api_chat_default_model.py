"""POST /api/chat without a model uses API_CHAT_DEFAULT_MODEL (an app built by the factory,
real PostgreSQL and Redis)."""
from __future__ import annotations

from Testing.conftest import app_config, close_app, minter, start_app
from Testing.support import SYSTEM_SECRET


def test_the_default_model_setting_is_used_when_the_request_names_none(pg_url, models_file, clean_db):
    application = start_app(app_config(pg_url, models_file, API_CHAT_DEFAULT_MODEL="demo"))
    try:
        client = application.test_client()
        key = minter(client, {"X-System-Secret": SYSTEM_SECRET})()["key"]
        resp = client.post("/api/chat", json={"message": "hi"}, headers={"Authorization": f"Bearer {key}"})
        assert resp.status_code == 200, resp.get_json()
        assert resp.get_json()["model"] == "demo"
    finally:
        close_app(application)
