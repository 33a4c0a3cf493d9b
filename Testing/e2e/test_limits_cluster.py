"""The admission tests of Testing/e2e/test_limits.py, unchanged, on a real 3-master Redis
Cluster: two gunicorn gateway processes (2 gevent workers each) with
`REDIS_URL=redis+cluster://...`. Limits, budgets, concurrency leases and refunds hold exactly
as on one Redis, because every key of a script call carries the tenant's hash tag (one slot,
one master) and the gateway's cluster client routes each call to that master. The key events
and the usage outbox run on the cluster in the same processes."""
from __future__ import annotations

import pytest

from Testing.conftest import app_config, truncate
# In the order of test_limits.py: a test's rows may land after the next test emptied the tables.
from Testing.e2e.test_limits import (  # noqa: F401  (the same tests, collected here again)
    test_rpm_exact_under_concurrency_across_processes, test_tpm_concurrent_requests_never_exceed_the_limit,
    test_short_answer_refunds_its_reservation, test_request_larger_than_tpm_is_refused_with_a_reason,
    test_daily_token_limit, test_budget_never_exceeded_under_concurrency, test_tenant_budget_is_shared_by_its_keys,
    test_concurrency_limit_and_disconnect_releases_the_slot, test_killed_worker_slots_come_back_by_lease_expiry)
from Testing.e2e.test_limits import mint as mint_key
from Testing.support import GatewayProcess, http_json, wait_until
from Testing.workers import connect_every_worker

pytestmark = pytest.mark.timeout(180)


def _cluster_gateway(pg_url, models_file, cluster, log_dir, **overrides) -> GatewayProcess:
    env = {k: str(v) for k, v in app_config(pg_url, models_file, REDIS_URL=cluster.url, **overrides).items()}
    return GatewayProcess(env, workers=2, log_path=log_dir / "gunicorn.log").start()


@pytest.fixture(scope="module")
def gateway(pg_url, models_file, redis_cluster, tmp_path_factory):
    """Overrides the session's gateway: this one keeps its limits on the cluster."""
    proc = _cluster_gateway(pg_url, models_file, redis_cluster, tmp_path_factory.mktemp("cluster-a"))
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def gateway_b(pg_url, models_file, redis_cluster, tmp_path_factory):
    proc = _cluster_gateway(pg_url, models_file, redis_cluster, tmp_path_factory.mktemp("cluster-b"),
                            CONCURRENCY_LEASE_S=2)
    yield proc
    proc.stop()


@pytest.fixture
def clean_db(pg_engine, redis_cluster):
    """Empty tables (ids never reused) and an empty cluster."""
    truncate(pg_engine)
    redis_cluster.flush()
    return pg_engine


def test_health_and_provider_status_on_the_cluster(gateway, redis_cluster, clean_db):
    """/health pings the cluster; the provider health board is shared through it (after calls
    on both workers, GET /v1/providers/status merges the reports of both), and so is the uptime
    probe's cache."""
    status, _, body = http_json("GET", gateway.base_url + "/health")
    assert status == 200 and body["redis"] == "ok"
    key = mint_key(gateway)["key"]
    workers = connect_every_worker([gateway])
    try:
        for w in workers:
            assert w.request("POST", "/v1/chat/completions", {"model": "demo", "messages": [{"role": "user", "content": "hi"}]},
                             {"Authorization": f"Bearer {key}"})[0] == 200
        report = lambda: http_json("GET", gateway.base_url + "/v1/providers/status",  # noqa: E731
                                   headers={"Authorization": f"Bearer {key}"})[2]
        wait_until(lambda: report()["workers_reporting"] == 2, timeout=10, message="both workers' reports")
        # the uptime probe's answer is cached in the cluster for every worker
        status, _, body = http_json("GET", gateway.base_url + "/v1/uptime/demo",
                                    headers={"Authorization": f"Bearer {key}"})
        assert status == 200, body
        owner = redis_cluster.node(redis_cluster.slot_owner("gw:uptime:demo"))
        assert owner.get("gw:uptime:demo") is not None
    finally:
        for w in workers:
            w.close()


def test_revocation_reaches_every_worker_through_the_cluster(gateway, gateway_b, clean_db):
    """Key events are published through the cluster client and heard by every worker's
    listener (subscribed on one node of the cluster)."""
    key = mint_key(gateway, name="revoked")
    workers = connect_every_worker([gateway, gateway_b])
    try:
        assert len(workers) == 4 and all(w.status(key["key"]) == 200 for w in workers)
        status, _, _ = http_json("DELETE", f"{gateway.base_url}/v1/api-keys/{key['id']}",
                                 headers={"X-System-Secret": gateway.env["SYSTEM_SECRET"]})
        assert status == 200
        wait_until(lambda: all(w.status(key["key"]) == 401 for w in workers), timeout=5,
                   message="every worker refusing the revoked key")
    finally:
        for w in workers:
            w.close()
