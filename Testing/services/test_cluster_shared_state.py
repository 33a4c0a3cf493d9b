"""Everything the gateway shares through Redis also works on a real 3-master Redis Cluster
(`REDIS_URL=redis+cluster://...`): key events (classic pub/sub, forwarded by the cluster bus to
every node), the provider health board, the maintenance lock, and the client's URL forms. The
limiter's scripts and the usage outbox are run on the cluster by their own test modules
(Testing/services/test_rate_limit_service.py, test_usage_outbox.py)."""
from __future__ import annotations

import secrets
from dataclasses import replace

import pytest
import redis
from redis.cluster import RedisCluster

from app.extensions import cluster_nodes, is_cluster_url, make_redis, subscriber_urls
from app.services import maintenance
from app.services.api_key_service import KeyCache
from app.services.circuit_breaker import BreakerConfig
from app.services.key_events import KeyEvents
from app.services.provider_health import HealthBoard
from Testing.services.test_key_events import INFO, cached
from Testing.support import wait_until

pytestmark = pytest.mark.timeout(60)


def test_cluster_urls():
    """`redis+cluster://a:1,b:2` names a cluster by some of its nodes; REDIS_CLUSTER=1 makes a
    plain URL one; the subscriber tries the named nodes in turn."""
    assert is_cluster_url("redis+cluster://a:7000,b:7001") and is_cluster_url("redis://a:7000", cluster=True)
    assert not is_cluster_url("redis://a:6379/0") and not is_cluster_url("", cluster=True)
    assert cluster_nodes("redis+cluster://:pw@a:7000,b:7001/") == [("a", 7000), ("b", 7001)]
    urls = subscriber_urls("rediss+cluster://u:pw@a:7000,b:7001")
    assert [next(urls) for _ in range(3)] == ["rediss://u:pw@a:7000", "rediss://u:pw@b:7001", "rediss://u:pw@a:7000"]


def test_client_of_a_cluster_url_routes_to_every_master(redis_cluster):
    client = make_redis(redis_cluster.url, 4)
    assert isinstance(client, RedisCluster)
    for i in range(30):
        client.set(f"probe:{i}", i)
    assert all(redis_cluster.node(p).dbsize() > 0 for p in redis_cluster.ports)
    plain_setting = make_redis(f"redis://127.0.0.1:{redis_cluster.ports[1]}/0", 4, cluster=True)
    assert isinstance(plain_setting, RedisCluster) and int(plain_setting.get("probe:7")) == 7
    client.close()
    plain_setting.close()


def test_key_events_reach_a_listener_on_another_node(redis_cluster):
    """The listener subscribes on one node; a change published through the cluster client (any
    node) still reaches it."""
    channel = "test-key-events-" + secrets.token_hex(4)
    cache = KeyCache(60)
    listener = KeyEvents(cache, redis_cluster.url, channel)
    publishers = [KeyEvents(KeyCache(60), redis_cluster.url, channel,
                            publisher=redis.Redis(host="127.0.0.1", port=port)) for port in redis_cluster.ports]
    try:
        listener.start()
        assert listener.subscribed.wait(5)
        for key_id, publisher in enumerate(publishers, start=1):   # one publisher per node
            cache.put(f"h{key_id}", replace(INFO, id=key_id))
            publisher.changed(key_id=key_id)
            wait_until(lambda k=key_id: cache.get(f"h{k}") == (False, None), timeout=2, interval=0.01,
                       message=f"event published on node {key_id}")
        cache.put("h1", INFO)
        KeyEvents(KeyCache(60), redis_cluster.url, channel, publisher=make_redis(redis_cluster.url, 2)).changed(key_id=1)
        wait_until(lambda: cached(cache) == set(), timeout=2, interval=0.01, message="event through the cluster client")
    finally:
        listener.stop(2)


def test_process_events_share_the_channel(redis_cluster):
    """A `{"event": ...}` message (the models reload) goes to its handler, not to the key cache."""
    channel = "test-key-events-" + secrets.token_hex(4)
    cache = KeyCache(60)
    cache.put("h1", INFO)
    seen = []
    listener = KeyEvents(cache, redis_cluster.url, channel)
    listener.handlers["models.reload"] = seen.append
    try:
        listener.start()
        assert listener.subscribed.wait(5)
        cache.put("h1", INFO)
        KeyEvents(KeyCache(60), redis_cluster.url, channel, publisher=make_redis(redis_cluster.url, 2)) \
            .publish("models.reload", digest="abc")
        wait_until(lambda: seen, timeout=2, interval=0.01, message="the handler called")
        assert seen == [{"event": "models.reload", "digest": "abc"}]
        assert cache.get("h1") == (True, INFO)
    finally:
        listener.stop(2)


def test_health_board_shared_on_the_cluster(redis_cluster):
    """Two workers' views of a deployment meet in the cluster (GET /v1/providers/status)."""
    config = BreakerConfig(failure_threshold=5, failure_ratio=0.5, window=20, min_requests=10, cooldown_s=30)
    a = HealthBoard(config, redis_client=make_redis(redis_cluster.url, 2), publish_interval_s=60)
    b = HealthBoard(config, redis_client=make_redis(redis_cluster.url, 2), publish_interval_s=60)
    a.worker_id, b.worker_id = "host:1", "host:2"   # two workers (one test process here)
    redis_cluster.flush()   # no report of another test's gateway workers
    try:
        a.success(a.get("openai/x"), 0.01)
        b.success(b.get("openai/x"), 0.02)
        a.publish()
        snapshots = b.fleet_snapshots(max_age_s=60)
        assert len(snapshots) == 2 and all("openai/x" in s for s in snapshots)
    finally:
        a.stop()
        b.stop()


def test_maintenance_runs_once_per_period_across_schedulers(redis_cluster):
    """Three schedulers at once: one takes the period's lock, the others skip; a failed run
    gives the lock back."""
    client = make_redis(redis_cluster.url, 2)
    tokens = [maintenance.take_lock(client, 60) for _ in range(3)]
    assert sum(t is not None for t in tokens) == 1
    holder = next(t for t in tokens if t)
    maintenance.give_back(client, "someone-else")      # not ours: kept
    assert maintenance.take_lock(client, 60) is None
    maintenance.give_back(client, holder)
    assert maintenance.take_lock(client, 60) is not None
    client.delete(maintenance.LOCK_KEY)
    client.close()
