"""Key changes reach every worker of every gateway process through pub/sub: two gunicorn
processes (2 gevent workers each) share PostgreSQL and Redis; their key caches live for 60 s,
so only the pub/sub invalidation can explain a change seen by every worker well before that
(within PROOF_S = 30 s, half the cache's lifetime: a proof that holds on a busy machine). The
test holds one keep-alive connection to each of the four workers, warms every worker's cache,
makes the change through one process, and prints how long until all four workers apply it (a
few milliseconds on an idle machine; the figure is reported, not asserted)."""
from __future__ import annotations

import json
import time
from datetime import datetime, timedelta, timezone

import pytest

from Testing.conftest import app_config
from Testing.support import SYSTEM_SECRET, GatewayProcess, http_json, wait_until
from Testing.workers import Worker, connect_every_worker

pytestmark = pytest.mark.timeout(180)

SYSTEM = {"X-System-Secret": SYSTEM_SECRET}
CACHE_TTL_S = 60
PROOF_S = CACHE_TTL_S / 2  # seen by every worker before this: only pub/sub can explain it


@pytest.fixture(scope="module")
def replicas(pg_url, models_file, tmp_path_factory):
    """Two gateway processes whose key caches would stay stale for a minute without pub/sub."""
    env = {k: str(v) for k, v in app_config(pg_url, models_file, AUTH_CACHE_TTL_S=CACHE_TTL_S, KEEPALIVE=60).items()}
    procs = []
    try:
        for name in ("a", "b"):
            procs.append(GatewayProcess(env, workers=2, log_path=tmp_path_factory.mktemp(f"prop-{name}") / "log")
                         .start())
        yield procs
    finally:
        for p in procs:
            p.stop()


@pytest.fixture
def workers(replicas):
    """One connection per worker of both processes."""
    found = connect_every_worker(replicas)
    assert len(found) == 4
    yield found
    for w in found:
        w.close()


def admin(proc: GatewayProcess, method: str, path: str, body=None) -> dict:
    status, _, answer = http_json(method, proc.base_url + path, body, headers=SYSTEM)
    assert status in (200, 201), (status, answer)
    return answer


def warm(workers: list[Worker], *keys: str) -> None:
    for w in workers:
        for key in keys:
            assert w.status(key) == 200, f"worker {w.pid} refused a valid key"


def seconds_until_all(workers: list[Worker], key: str, status: int, since: float) -> float:
    """Poll every worker until each answers `status` for `key`; the time since `since`."""
    pending = list(workers)
    while pending:
        pending = [w for w in pending if w.status(key) != status]
        if pending and time.monotonic() - since > PROOF_S:
            raise AssertionError(f"workers {[w.pid for w in pending]} still do not answer {status} after "
                                 f"{PROOF_S:g} s: the change did not come through pub/sub")
        if pending:
            time.sleep(0.01)
    elapsed = time.monotonic() - since
    print(f"all {len(workers)} workers answer {status} after {elapsed * 1000:.0f} ms")
    return elapsed


def mint(proc: GatewayProcess, tenant: str, **fields) -> dict:
    return admin(proc, "POST", "/v1/api-keys", {"name": "prop", "tenant": tenant, **fields})


def test_revocation_reaches_every_worker_through_pubsub(replicas, workers, clean_db):
    """A key revoked through process A is refused by all four workers of A and B (through pub/sub)."""
    key = mint(replicas[0], "prop-revoke")
    warm(workers, key["key"])
    started = time.monotonic()
    admin(replicas[0], "DELETE", f"/v1/api-keys/{key['id']}")
    seconds_until_all(workers, key["key"], 401, started)


def test_suspension_and_reactivation_reach_every_worker_through_pubsub(replicas, workers, clean_db):
    """Suspending a tenant through process B stops all its keys on every worker (keys of other
    tenants keep working); reactivating brings them back, both through pub/sub."""
    tenant = admin(replicas[1], "POST", "/v1/tenants", {"name": "prop-suspend"})
    keys = [mint(replicas[0], "prop-suspend")["key"] for _ in range(2)]
    bystander = mint(replicas[0], "prop-other")["key"]
    warm(workers, *keys, bystander)
    started = time.monotonic()
    admin(replicas[1], "PATCH", f"/v1/tenants/{tenant['id']}", {"status": "suspended"})
    for k in keys:
        seconds_until_all(workers, k, 401, started)
    assert all(w.status(bystander) == 200 for w in workers)
    started = time.monotonic()
    admin(replicas[1], "PATCH", f"/v1/tenants/{tenant['id']}", {"status": "active"})
    for k in keys:
        seconds_until_all(workers, k, 200, started)


def test_rotation_without_grace_reaches_every_worker_through_pubsub(replicas, workers, clean_db):
    """After a rotation with no grace period the old secret is refused everywhere (pub/sub) and
    the new one works everywhere."""
    key = mint(replicas[0], "prop-rotate")
    warm(workers, key["key"])
    started = time.monotonic()
    rotated = admin(replicas[1], "POST", f"/v1/api-keys/{key['id']}/rotate")
    seconds_until_all(workers, key["key"], 401, started)
    warm(workers, rotated["key"])


def test_rotation_grace_period_holds_on_every_worker(replicas, workers, clean_db):
    """With grace_period_s=5 the old secret keeps working on every worker (with the new one)
    inside the grace period, then is refused everywhere (each worker's cached entry knows when
    the grace ends)."""
    key = mint(replicas[0], "prop-grace")
    warm(workers, key["key"])
    started = time.monotonic()
    rotated = admin(replicas[0], "POST", f"/v1/api-keys/{key['id']}/rotate", {"grace_period_s": 5})
    warm(workers, key["key"], rotated["key"])  # eight requests, well inside the 5 s
    seconds_until_all(workers, key["key"], 401, started + 5)
    warm(workers, rotated["key"])


def test_patch_reaches_every_worker_through_pubsub(replicas, workers, clean_db):
    """A PATCH (allowed models; an expiry in the past) is applied by every worker (pub/sub)."""
    key = mint(replicas[0], "prop-patch")
    warm(workers, key["key"])
    started = time.monotonic()
    admin(replicas[1], "PATCH", f"/v1/api-keys/{key['id']}", {"allowed_models": ["gpt-4o-mini"]})

    def everywhere() -> bool:
        for w in workers:
            w.conn.request("GET", "/v1/models", headers={"Authorization": f"Bearer {key['key']}"})
            if [m["id"] for m in json.loads(w.conn.getresponse().read())["data"]] != ["gpt-4o-mini"]:
                return False
        return True
    wait_until(everywhere, timeout=PROOF_S, interval=0.01, message="allowed_models on every worker")
    started = time.monotonic()
    past = (datetime.now(timezone.utc) - timedelta(seconds=1)).isoformat()
    admin(replicas[0], "PATCH", f"/v1/api-keys/{key['id']}", {"expires_at": past})
    seconds_until_all(workers, key["key"], 401, started)
