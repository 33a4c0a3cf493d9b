"""Two gateway replicas (gunicorn, 2 gevent workers each) behind a real nginx running the
configuration docker-compose.yml ships (deploy/nginx/gateway.conf), on loopback, sharing one
PostgreSQL and one Redis. Through the load balancer: rate limits, token limits, concurrency and
budgets hold exactly across both replicas; every completion has exactly one usage row; a
revocation and a models reload reach all four workers; killing a replica's master mid-load loses
no usage row while nginx moves the traffic to the other (its orphaned workers finish what they
hold); a rolling restart (SIGTERM, drain, start) completes with zero failed requests."""
from __future__ import annotations

import http.client
import json
import os
import shutil
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from decimal import Decimal

import pytest

from Testing.conftest import app_config, usage_rows, wait_for_rows
from Testing.nginx import NginxProcess
from Testing.support import SYSTEM_SECRET, GatewayProcess, http_json, process_alive, wait_until
from Testing.workers import connect_every_worker

pytestmark = pytest.mark.timeout(300)
SYSTEM = {"X-System-Secret": SYSTEM_SECRET}
MESSAGES = [{"role": "user", "content": "count to three"}]


@pytest.fixture(scope="module")
def models_copy(models_file, tmp_path_factory):
    path = tmp_path_factory.mktemp("replica-models") / "models.json"
    shutil.copy(models_file, path)
    return path


@pytest.fixture(scope="module")
def cluster(pg_url, models_copy, tmp_path_factory):
    """Replicas a and b behind nginx. A test that stops a replica starts it again on its port."""
    logs = tmp_path_factory.mktemp("replicas")
    env = {k: str(v) for k, v in app_config(pg_url, models_copy, LOG_LEVEL="INFO", GRACEFUL_TIMEOUT=20).items()}
    replicas = [GatewayProcess(env, workers=2, log_path=logs / f"{name}.log") for name in "ab"]
    nginx = NginxProcess([r.port for r in replicas])
    try:
        for r in replicas:
            r.start()
        nginx.start()
        yield replicas, nginx
    finally:
        nginx.stop()
        for r in replicas:
            r.stop()


def restart(replica: GatewayProcess) -> None:
    """A stopped replica started again on the same port (as a restarted container would be)."""
    replica.stop()
    replica.start()


def mint(nginx: NginxProcess, **fields) -> dict:
    fields.setdefault("name", "replicas")
    fields.setdefault("tenant", "replicas-tenant")
    since = datetime.now(timezone.utc)
    status, _, body = http_json("POST", nginx.base_url + "/v1/api-keys", fields, SYSTEM)
    assert status == 201, body
    return {**body, "since": since}


def chat(nginx: NginxProcess, key: str, model: str = "demo", **extra) -> tuple[int, dict, object]:
    return http_json("POST", nginx.base_url + "/v1/chat/completions",
                     {"model": model, "messages": MESSAGES, **extra}, {"Authorization": f"Bearer {key}"})


def burst(calls, workers: int = 32) -> list:
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(lambda f: f(), calls))


def rows_of(engine, key: dict) -> list[dict]:
    return usage_rows(engine, "api_key_id = :k AND created_at >= :since", {"k": key["id"], "since": key["since"]})


def served_by(nginx: NginxProcess, since: int = 0, log: list | None = None) -> dict[str, int]:
    """Requests each replica answered (the last address tried) in the access log from entry
    `since` (`log`: the log as already read)."""
    counts: dict[str, int] = {}
    for _, addrs in (nginx.access_log() if log is None else log)[since:]:
        if addrs:
            counts[addrs[-1]] = counts.get(addrs[-1], 0) + 1
    return counts


# --- limits across replicas --------------------------------------------------------------------

def test_rpm_is_global_across_replicas(cluster, clean_db):
    """120 concurrent requests through nginx against rpm_limit=30: 30 admitted (GCRA gives one
    more back every 2 s, counted if the burst lasted that long), spread over both replicas."""
    replicas, nginx = cluster
    key = mint(nginx, rpm_limit=30)
    log_start = len(nginx.access_log())
    started = time.monotonic()
    results = burst([lambda: chat(nginx, key["key"], max_tokens=2) for _ in range(120)])
    elapsed = time.monotonic() - started
    ok = [r for r in results if r[0] == 200]
    assert {r[0] for r in results} <= {200, 429}
    assert 30 <= len(ok) <= 30 + int(elapsed / 2), (len(ok), elapsed)
    assert len(served_by(nginx, log_start)) == 2, "both replicas must have answered"
    rows = wait_for_rows(clean_db, len(ok), "api_key_id = :k", {"k": key["id"]})
    assert sorted(r["request_id"] for r in rows) == sorted(r[1]["X-Request-ID"] for r in ok)


def test_tpm_and_budget_are_global_across_replicas(cluster, clean_db):
    """Tokens per minute and a money budget, spent concurrently through both replicas, never
    exceed their limits (reservations are taken in Redis before each call)."""
    _, nginx = cluster
    tpm_key = mint(nginx, tpm_limit=400, name="tpm")
    results = burst([lambda: chat(nginx, tpm_key["key"], "gpt-4o-mini", max_tokens=30) for _ in range(40)])
    admitted = [r for r in results if r[0] == 200]
    assert admitted and len(admitted) < 40
    rows = wait_for_rows(clean_db, len(admitted), "api_key_id = :k", {"k": tpm_key["id"]})
    assert sum(r["total_tokens"] for r in rows) <= 400

    budget_key = mint(nginx, budget_usd="0.0002", name="budget")
    results = burst([lambda: chat(nginx, budget_key["key"], "gpt-4o-mini", max_tokens=50) for _ in range(40)])
    admitted = [r for r in results if r[0] == 200]
    refused = [r for r in results if r[0] == 429]
    assert admitted and refused and len(admitted) + len(refused) == 40
    assert {r[2]["error"]["code"] for r in refused} == {"insufficient_quota"}
    rows = wait_for_rows(clean_db, len(admitted), "api_key_id = :k", {"k": budget_key["id"]})
    assert sum(r["cost_usd"] for r in rows) <= Decimal("0.0002")


def test_concurrency_is_global_across_replicas(cluster, clean_db):
    """12 simultaneous 3-second completions against max_concurrent=3: exactly 3 run, whichever
    replica and worker each landed on; the slots are free again afterwards."""
    _, nginx = cluster
    key = mint(nginx, max_concurrent=3)
    timings = []

    def timed() -> tuple[int, dict, object]:
        start = time.monotonic()
        result = chat(nginx, key["key"], "slow-sim", max_tokens=60)
        timings.append((start, time.monotonic(), result[0]))
        return result

    results = burst([timed] * 12, workers=12)
    last_start = max(t[0] for t in timings)
    first_end = min(t[1] for t in timings if t[2] == 200)
    assert last_start < first_end, "the burst must overlap for the count to mean anything"
    assert sorted(r[0] for r in results) == [200] * 3 + [429] * 9
    assert chat(nginx, key["key"], "demo")[0] == 200


# --- every worker of both replicas ---------------------------------------------------------------

@pytest.fixture
def workers(cluster):
    replicas, _ = cluster
    found = connect_every_worker(replicas)
    assert len(found) == 4
    yield found
    for w in found:
        w.close()


def test_revocation_reaches_every_worker_of_both_replicas(cluster, workers, clean_db):
    _, nginx = cluster
    key = mint(nginx)
    assert all(w.status(key["key"]) == 200 for w in workers)
    status, _, _ = http_json("DELETE", f"{nginx.base_url}/v1/api-keys/{key['id']}", headers=SYSTEM)
    assert status == 200
    wait_until(lambda: all(w.status(key["key"]) == 401 for w in workers), timeout=5,
               message="all four workers refusing the revoked key")


def test_models_reload_reaches_every_worker_of_both_replicas(cluster, workers, models_copy, clean_db):
    _, nginx = cluster
    key = mint(nginx)
    assert all(w.status(key["key"]) == 200 for w in workers)   # every listener subscribed
    data = json.loads(models_copy.read_text())
    data["models"]["demo-everywhere"] = data["models"]["demo"]
    models_copy.write_text(json.dumps(data))
    status, _, body = http_json("POST", nginx.base_url + "/v1/admin/reload", headers=SYSTEM)
    assert status == 200 and body["changed"] is True
    wait_until(lambda: {w.health()["models"]["digest"] for w in workers} == {body["digest"][:16]}, timeout=10,
               message="all four workers on the new catalogue")
    for w in workers:
        assert w.request("POST", "/v1/chat/completions", {"model": "demo-everywhere", "messages": MESSAGES},
                         {"Authorization": f"Bearer {key['key']}"})[0] == 200


# --- failures and restarts under load -----------------------------------------------------------

@dataclass
class Load:
    """Clients sending completions through nginx on keep-alive connections until stopped."""
    nginx: NginxProcess
    key: str
    clients: int = 6
    results: list = field(default_factory=list)   # (status, request id or error)
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> "Load":
        self.threads = [threading.Thread(target=self._client, args=(i,), daemon=True) for i in range(self.clients)]
        for t in self.threads:
            t.start()
        return self

    def _client(self, i: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self.nginx.port, timeout=30)
        body = {"model": "demo", "messages": MESSAGES, "max_tokens": 8, "stream": i % 2 == 1}
        while not self.stop.is_set():
            resp = None
            try:
                conn.request("POST", "/v1/chat/completions", json.dumps(body),
                             {"Authorization": f"Bearer {self.key}", "Content-Type": "application/json"})
                resp = conn.getresponse()
                payload = resp.read()
                complete = resp.status != 200 or not body["stream"] or payload.endswith(b"data: [DONE]\n\n")
                self.results.append((resp.status if complete else -1, resp.getheader("X-Request-ID")))
            except (OSError, http.client.HTTPException) as exc:
                rid = resp.getheader("X-Request-ID") if resp is not None else None
                self.results.append((-1, rid or type(exc).__name__))
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", self.nginx.port, timeout=30)

    def wait_for(self, more: int) -> None:
        target = len(self.results) + more
        wait_until(lambda: len(self.results) >= target, timeout=60, message=f"{more} more completions")

    def finish(self) -> list:
        self.stop.set()
        for t in self.threads:
            t.join(40)
        return list(self.results)


def assert_one_row_per_completion(engine, key: dict, results: list) -> None:
    served = [rid for status, rid in results if status == 200]
    rows = wait_for_rows(engine, len(served), "api_key_id = :k", {"k": key["id"]}, timeout=30)
    time.sleep(0.5)   # a duplicate would land right after: give it the chance to show
    rows = rows_of(engine, key)
    assert len(rows) == len(served) == len({r["request_id"] for r in rows})
    assert {r["request_id"] for r in rows} == set(served)


def test_killing_a_replica_mid_load_loses_no_usage_row(cluster, clean_db):
    """Replica a's gunicorn master is SIGKILLed under load. Its workers see their parent gone
    at their next heartbeat (every second) and drain as on SIGTERM (gunicorn.config.py,
    DrainingGeventWorker): they stop accepting (nginx passes new connections to b), finish the
    requests and streams they hold, store their usage rows, then exit. Every completed request has exactly one usage
    row; from then on b serves everything without a failure. (gunicorn's own gevent worker
    kept answering requests while its runtime closed, and the rows of those that finished
    after its usage writer stopped were lost: the failure this test caught once in a full
    run.) A request can still be cut only if it outlasts GRACEFUL_TIMEOUT, at most one per
    client; nothing here lasts that long."""
    replicas, nginx = cluster
    a, b = replicas
    key = mint(nginx)
    load = Load(nginx, key["key"]).run()
    try:
        load.wait_for(100)
        workers_of_a = a.worker_pids()
        os.kill(a.proc.pid, signal.SIGKILL)
        wait_until(lambda: not any(process_alive(pid) for pid in workers_of_a), timeout=40,
                   message="replica a's workers gone")
        log_mark = len(nginx.access_log())
        load.wait_for(100)
    finally:
        results = load.finish()
    # One read of the log for both sides: nginx writes a request's line only after the client has
    # its last byte, so a second read can hold one more line than the first.
    log = nginx.access_log()
    assert served_by(nginx, log_mark, log) == {f"127.0.0.1:{b.port}": len(log) - log_mark}
    assert [r for r in results if r[0] != 200] == []   # nothing cut, before the kill or after it
    served = {rid for _, rid in results}
    assert len(served) == len(results) >= 200
    wait_for_rows(clean_db, len(served), "api_key_id = :k", {"k": key["id"]}, timeout=30)
    rows = rows_of(clean_db, key)
    ids = [r["request_id"] for r in rows]
    assert len(ids) == len(set(ids)), "a completion recorded twice"
    assert set(ids) == served, "a completed request without its usage row, or a row of no completion"
    a.proc.wait()
    restart(a)


def test_rolling_restart_has_zero_failed_requests(cluster, clean_db):
    """Each replica in turn gets SIGTERM, drains (in-flight requests finish, idle keep-alive
    connections close) and is started again; the next one is restarted only once nginx sends
    traffic to the restarted one. Not one request fails; every completion has one row."""
    replicas, nginx = cluster
    key = mint(nginx)
    load = Load(nginx, key["key"]).run()
    try:
        load.wait_for(50)
        for replica in replicas:
            replica.stop()                       # SIGTERM, wait for the drained exit
            load.wait_for(30)                    # the other replica carries everything
            mark = len(nginx.access_log())
            replica.start()
            address = f"127.0.0.1:{replica.port}"
            wait_until(lambda: served_by(nginx, mark).get(address, 0) > 0, timeout=60,
                       message=f"nginx sending traffic to the restarted {address} again")
        load.wait_for(50)
    finally:
        results = load.finish()
    failed = [r for r in results if r[0] != 200]
    assert failed == [], failed[:5]
    assert_one_row_per_completion(clean_db, key, results)
