"""The per-worker key cache and its pub/sub invalidation: messages drop exactly the named key
or tenant, a lookup that raced an invalidation does not cache what it read, the listener
survives a Redis restart (and clears the cache when it resubscribes, since it may have missed
messages), and without Redis the change is applied in-process."""
from __future__ import annotations

import secrets
import subprocess
import threading
from dataclasses import replace

import pytest

from app.services.api_key_service import KeyCache, KeyInfo
from app.services.key_events import KeyEvents, apply_event, encode_event
from Testing.conftest import app_config, close_app, start_app
from Testing.support import SYSTEM_SECRET, free_port, wait_until

pytestmark = pytest.mark.timeout(60)

INFO = KeyInfo(id=1, tenant_id=10, tenant_name="t", tenant_status="active", name="k", prefix="sk-x",
               role="member", rpm_limit=None, tpm_limit=None, daily_token_limit=None, max_concurrent=None,
               budget_usd=None, tenant_budget_usd=None, allowed_models=None, expires_at=None, revoked_at=None)


def filled_cache() -> KeyCache:
    cache = KeyCache(60)
    cache.put("h1", INFO)
    cache.put("h1-old", replace(INFO))
    cache.put("h2", replace(INFO, id=2))
    cache.put("h3", replace(INFO, id=3, tenant_id=11))
    return cache


def cached(cache: KeyCache) -> set[str]:
    return {h for h in ("h1", "h1-old", "h2", "h3") if cache.get(h)[0]}


def test_events_drop_exactly_what_they_name():
    """A key event drops every cached secret of that key; a tenant event every key of the tenant;
    an unreadable message clears everything (safe side)."""
    cache = filled_cache()
    apply_event(cache, encode_event(key_id=1))
    assert cached(cache) == {"h2", "h3"}
    cache = filled_cache()
    apply_event(cache, encode_event(tenant_id=10))
    assert cached(cache) == {"h3"}
    cache = filled_cache()
    apply_event(cache, b"not json")
    assert cached(cache) == set()


def test_lookup_racing_an_invalidation_is_not_cached():
    """A snapshot read before an invalidation (its generation is older) is not cached."""
    cache = KeyCache(60)
    generation = cache.generation
    cache.invalidate_key_id(1)  # a change lands while the lookup reads the database
    cache.put("h1", INFO, generation)
    assert cache.get("h1") == (False, None)
    cache.put("h1", INFO, cache.generation)
    assert cache.get("h1") == (True, INFO)


@pytest.fixture
def own_redis(tmp_path):
    """A private redis-server the test can restart on the same port."""
    port = free_port()
    cmd = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
           "--dir", str(tmp_path)]
    procs: list[subprocess.Popen] = []

    def start() -> None:
        procs.append(subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        import redis
        wait_until(lambda: _pings(redis.Redis(port=port, socket_connect_timeout=0.2)), timeout=5,
                   message="redis-server")

    def stop() -> None:
        procs[-1].terminate()
        procs[-1].wait(5)

    start()
    yield f"redis://127.0.0.1:{port}/0", start, stop
    for p in procs:
        if p.poll() is None:
            p.terminate()
            p.wait(5)


def _pings(client) -> bool:
    try:
        return bool(client.ping())
    except Exception:
        return False
    finally:
        client.close()


def test_listener_survives_a_redis_restart(own_redis):
    """Messages published from another process's KeyEvents reach the listener; after Redis is
    restarted the listener resubscribes by itself (clearing the cache) and receives again."""
    import redis
    url, start, stop = own_redis
    channel = "test-key-events-" + secrets.token_hex(4)
    cache = filled_cache()
    listener = KeyEvents(cache, url, channel, max_retry_s=0.2)
    publisher = KeyEvents(KeyCache(60), url, channel, publisher=redis.Redis.from_url(url))
    try:
        listener.start()
        assert listener.subscribed.wait(5)
        cache = listener.cache
        for h, info in (("h1", INFO), ("h2", replace(INFO, id=2))):
            cache.put(h, info)
        publisher.changed(key_id=1)
        # waited for, not timed: the entries would otherwise live for their 60 s TTL
        wait_until(lambda: cached(cache) == {"h2"}, timeout=10, interval=0.01, message="key event")
        stop()
        wait_until(lambda: not listener.subscribed.is_set(), timeout=10, message="listener to notice")
        start()
        wait_until(listener.subscribed.is_set, timeout=10, message="listener to resubscribe")
        assert listener.subscriptions == 2 and cached(cache) == set()  # cleared on resubscription
        cache.put("h3", replace(INFO, id=3, tenant_id=11))
        publisher.publisher = redis.Redis.from_url(url)
        publisher.changed(tenant_id=11)
        wait_until(lambda: cached(cache) == set(), timeout=10, interval=0.01, message="tenant event")
    finally:
        listener.stop()


def test_listener_starts_once_however_many_threads_start_it():
    """start() from 16 threads at once (run.py's threaded server) makes one listener; a second
    start() keeps it; without Redis nothing starts; a stopped listener does not start again."""
    events = KeyEvents(KeyCache(1), "", "x")
    events.start()
    assert events._thread is None
    events = KeyEvents(KeyCache(1), "redis://127.0.0.1:1/0", "x", max_retry_s=0.05)
    gate = threading.Barrier(16)
    started: list[threading.Thread] = []

    def race() -> None:
        gate.wait()
        events.start()
        started.append(events._thread)
    try:
        threads = [threading.Thread(target=race) for _ in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(started) == 16 and len({id(t) for t in started}) == 1
        first = events._thread
        events.start()
        assert events._thread is first and first.is_alive()
    finally:
        events.stop(timeout=5)
    events.start()
    assert events._thread is first and not first.is_alive()


def test_embedded_mode_invalidates_in_process(pg_url, models_file, clean_db):
    """Without Redis a revocation, a rotation and a suspension apply in the process at once
    (the cache TTL is a minute here)."""
    application = start_app(app_config(pg_url, models_file, REDIS_URL="", AUTH_CACHE_TTL_S=60))
    try:
        c = application.test_client()
        system = {"X-System-Secret": SYSTEM_SECRET}
        keys = [c.post("/v1/api-keys", headers=system, json={"name": f"k{i}", "tenant": "emb"}).get_json()
                for i in range(3)]
        for k in keys:
            assert c.get("/v1/models", headers={"Authorization": f"Bearer {k['key']}"}).status_code == 200
        c.delete(f"/v1/api-keys/{keys[0]['id']}", headers=system)
        c.post(f"/v1/api-keys/{keys[1]['id']}/rotate", headers=system)
        for k in keys[:2]:
            assert c.get("/v1/models", headers={"Authorization": f"Bearer {k['key']}"}).status_code == 401
        c.patch(f"/v1/tenants/{keys[2]['tenant_id']}", headers=system, json={"status": "suspended"})
        assert c.get("/v1/models", headers={"Authorization": f"Bearer {keys[2]['key']}"}).status_code == 401
    finally:
        close_app(application)


def test_an_acknowledged_event_waits_for_every_listener(own_redis):
    """`publish_acknowledged` answers True only once every listener that received the event has
    handled it (two listeners here, each with a handler that records it); with a subscriber that
    never acknowledges (a bare pub/sub client) it gives up and answers False."""
    import redis
    url, _, _ = own_redis
    channel = "test-key-events-" + secrets.token_hex(4)
    client = redis.Redis.from_url(url)
    seen: list[tuple[str, dict]] = []
    listeners = [KeyEvents(KeyCache(60), url, channel, publisher=client) for _ in range(2)]
    for name, listener in zip(("a", "b"), listeners):
        listener.handlers["thing-cleared"] = lambda event, name=name: seen.append((name, event["what"]))
    bare = redis.Redis.from_url(url).pubsub()
    try:
        for listener in listeners:
            listener.start()
            assert listener.subscribed.wait(5)
        assert listeners[0].publish_acknowledged("thing-cleared", what="x") is True
        assert sorted(seen) == [("a", "x"), ("b", "x")]            # both handled before the answer
        assert client.keys("gw:events:ack:*") == []                # the count is not left behind
        bare.subscribe(channel)
        wait_until(lambda: bare.get_message(timeout=0.1) is not None, timeout=5, message="bare subscription")
        assert listeners[1].publish_acknowledged("thing-cleared", timeout_s=0.3, what="y") is False
        assert sorted(seen) == [("a", "x"), ("a", "y"), ("b", "x"), ("b", "y")]
    finally:
        bare.close()
        for listener in listeners:
            listener.stop()
