"""gunicorn.config.py: what the production server refuses to do silently."""
from __future__ import annotations

from Testing.conftest import app_config
from Testing.support import SYSTEM_SECRET, GatewayProcess, http_json


def test_embedded_limiter_runs_one_worker_and_says_why(pg_url, models_file, tmp_path, clean_db):
    """Without REDIS_URL each worker would hold its own limiter (every limit times the number of
    workers): gunicorn starts one worker although two were asked for, logs why, and a key's
    rpm limit holds exactly."""
    env = {k: str(v) for k, v in app_config(pg_url, models_file, REDIS_URL="").items()}
    with GatewayProcess(env, workers=2, log_path=tmp_path / "gw.log") as gw:
        assert len(gw.worker_pids()) == 1
        assert "REDIS_URL is not set" in gw.log_text() and "starting 1 worker instead of 2" in gw.log_text()
        status, _, body = http_json("POST", gw.base_url + "/v1/api-keys",
                                    {"name": "rpm", "tenant": "embedded", "rpm_limit": 2},
                                    {"X-System-Secret": SYSTEM_SECRET})
        assert status == 201, body
        statuses = [http_json("POST", gw.base_url + "/v1/chat/completions",
                              {"model": "demo", "messages": [{"role": "user", "content": "hi"}]},
                              {"Authorization": f"Bearer {body['key']}"})[0] for _ in range(6)]
        assert statuses == [200, 200, 429, 429, 429, 429]
