"""data/models.json changes without a restart, on a real gunicorn with 2 gevent workers:
`POST /v1/admin/reload` reloads it in every worker (the others are told through Redis); an
invalid file is refused with an error naming the bad entry and every worker keeps the old
catalogue; SIGHUP to the gunicorn master restarts the workers on a valid file and leaves them
alone on an invalid one."""
from __future__ import annotations

import json
import shutil
import signal
from pathlib import Path

import pytest
import redis

from Testing.conftest import app_config, wait_for_rows
from Testing.support import REDIS_URL, SYSTEM_SECRET, GatewayProcess, http_json, wait_until
from Testing.workers import connect_every_worker

pytestmark = pytest.mark.timeout(180)
SYSTEM = {"X-System-Secret": SYSTEM_SECRET}
MESSAGES = [{"role": "user", "content": "hi"}]


@pytest.fixture
def models_copy(models_file, tmp_path) -> Path:
    path = tmp_path / "models.json"
    shutil.copy(models_file, path)
    return path


@pytest.fixture
def gateway(pg_url, models_copy, tmp_path, clean_db):
    env = {k: str(v) for k, v in app_config(pg_url, models_copy, LOG_LEVEL="INFO", KEEPALIVE=30).items()}
    proc = GatewayProcess(env, workers=2, log_path=tmp_path / "gunicorn.log").start()
    yield proc
    proc.stop()


def add_alias(path: Path, alias: str, **changes) -> None:
    data = json.loads(path.read_text())
    data["models"][alias] = {**data["models"]["demo"], **changes}
    path.write_text(json.dumps(data))


def mint(gw: GatewayProcess) -> str:
    status, _, body = http_json("POST", gw.base_url + "/v1/api-keys", {"name": "r", "tenant": "reload"}, SYSTEM)
    assert status == 201, body
    return body["key"]


def listening_workers(channel: str) -> int:
    client = redis.Redis.from_url(REDIS_URL)
    try:
        return dict(client.pubsub_numsub(channel))[channel.encode()]
    finally:
        client.close()


def every_worker_listening(gw: GatewayProcess, key: str, count: int) -> list:
    """A connection to each worker, each having looked a key up (its listener runs from then)."""
    workers = connect_every_worker([gw])
    for w in workers:
        assert w.status(key) == 200
    wait_until(lambda: listening_workers(gw.env["KEY_EVENTS_CHANNEL"]) >= count, timeout=10,
               message="every worker subscribed to the key-events channel")
    return workers


def chat(worker, key: str, model: str) -> tuple[int, dict]:
    return worker.request("POST", "/v1/chat/completions", {"model": model, "messages": MESSAGES, "max_tokens": 4},
                          {"Authorization": f"Bearer {key}"})


def test_reload_request_reaches_every_worker(gateway, models_copy, clean_db):
    """A new alias added to the file is served by both workers after one POST to one of them."""
    key = mint(gateway)
    workers = every_worker_listening(gateway, key, 2)
    before = {w.pid: w.health()["models"] for w in workers}
    assert all(chat(w, key, "demo-reloaded")[0] == 404 for w in workers)
    add_alias(models_copy, "demo-reloaded")

    status, body = workers[0].request("POST", "/v1/admin/reload", headers=SYSTEM)

    assert status == 200, body
    assert body["object"] == "models.reload" and body["changed"] is True
    assert body["models"] == before[workers[0].pid]["count"] + 1
    wait_until(lambda: all(w.health()["models"]["digest"] == body["digest"][:16] for w in workers),
               timeout=10, message="every worker on the new catalogue")
    for w in workers:
        status, answer = chat(w, key, "demo-reloaded")
        assert status == 200, answer
    rows = wait_for_rows(clean_db, 2, "model = 'demo-reloaded'")
    assert len(rows) == 2


def test_reload_needs_the_system_secret(client, mint):
    """Only the operator reloads: a key (even a tenant admin's) gets 403, no secret 401."""
    for role in ("member", "admin"):
        key = mint(role=role, tenant="reload-auth")["key"]
        resp = client.post("/v1/admin/reload", headers={"Authorization": f"Bearer {key}"})
        assert resp.status_code == 403 and resp.get_json()["error"]["type"] == "permission_error"
    resp = client.post("/v1/admin/reload")
    assert resp.status_code == 401 and resp.get_json()["error"]["code"] == "invalid_system_secret"


def test_reload_of_an_unchanged_file_changes_nothing(client, admin_headers):
    resp = client.post("/v1/admin/reload", headers=admin_headers)
    assert resp.status_code == 200 and resp.get_json()["changed"] is False


def test_invalid_file_is_refused_naming_the_entry_and_the_old_catalogue_serves(gateway, models_copy):
    key = mint(gateway)
    workers = every_worker_listening(gateway, key, 2)
    digests = {w.pid: w.health()["models"]["digest"] for w in workers}
    add_alias(models_copy, "broken", pricing={"input_per_mtok": "cheap", "output_per_mtok": "0.1"})

    status, body = workers[0].request("POST", "/v1/admin/reload", headers=SYSTEM)

    assert status == 400
    error = body["error"]
    assert error["code"] == "invalid_models_file" and error["type"] == "invalid_request_error"
    assert error["param"] == "models.broken.pricing.input_per_mtok"
    assert "models.broken.pricing.input_per_mtok" in error["message"]
    for w in workers:
        assert w.health()["models"]["digest"] == digests[w.pid]
        assert chat(w, key, "demo")[0] == 200
        assert chat(w, key, "broken")[0] == 404


def test_sighup_restarts_workers_on_a_valid_file_only(gateway, models_copy):
    """SIGHUP: an invalid file leaves the running workers (and their catalogue) in place, with
    the refusal in the log; a valid one brings new workers that serve it."""
    key = mint(gateway)
    old_pids = set(gateway.worker_pids())
    add_alias(models_copy, "broken", context_window="big")

    gateway.proc.send_signal(signal.SIGHUP)

    wait_until(lambda: "models file refused" in gateway.log_text(), timeout=60, message="the refusal logged")
    assert "models.broken.context_window" in gateway.log_text()
    assert set(gateway.worker_pids()) == old_pids
    status, _, _ = http_json("POST", gateway.base_url + "/v1/chat/completions",
                             {"model": "demo", "messages": MESSAGES, "max_tokens": 4}, {"Authorization": f"Bearer {key}"})
    assert status == 200

    data = json.loads(models_copy.read_text())
    del data["models"]["broken"]
    models_copy.write_text(json.dumps(data))
    add_alias(models_copy, "demo-hup")
    gateway.proc.send_signal(signal.SIGHUP)

    wait_until(lambda: len(set(gateway.worker_pids()) - old_pids) == 2 and len(gateway.worker_pids()) == 2,
               timeout=60, message="two new workers")
    status, _, body = http_json("POST", gateway.base_url + "/v1/chat/completions",
                                {"model": "demo-hup", "messages": MESSAGES, "max_tokens": 4},
                                {"Authorization": f"Bearer {key}"})
    assert status == 200, body
