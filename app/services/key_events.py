"""Key and tenant changes reach every worker of every process within a second.

Each worker keeps its own `KeyCache` (a lookup per request would cost a database round trip).
When an admin changes, rotates or revokes a key, or changes or suspends a tenant, the worker
that made the change drops the affected entries at once and publishes a small message on a
Redis pub/sub channel (`KEY_EVENTS_CHANNEL`); a listener in every worker drops the same
entries when the message arrives (a few milliseconds later). The cache's TTL stays as the
backstop for what pub/sub cannot promise (a listener that is reconnecting to Redis).

The listener is a background thread (a greenlet under gevent) started by the app's
`Runtime.start()` in the process that serves requests (a gunicorn worker after the fork, never
its master), once however many threads call it. Every (re)subscription expires the whole cache, so messages
published while it was disconnected cannot leave stale entries behind (the expired entries only
serve as the fallback while the database is unreachable, see `lookup_key`). Without Redis
(embedded mode) there is one process, and the local invalidation is all there is.
"""
from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from typing import Any, Callable, Optional, Protocol

import redis

from app.extensions import subscriber_urls
from app.services.api_key_service import KeyCache

log = logging.getLogger("gateway.key_events")


def encode_event(*, key_id: int | None = None, tenant_id: int | None = None) -> str:
    """The message: which key or which tenant (all its keys) changed."""
    if key_id is not None:
        return json.dumps({"key_id": int(key_id)})
    if tenant_id is not None:
        return json.dumps({"tenant_id": int(tenant_id)})
    return json.dumps({"all": True})


def apply_event(cache: KeyCache, raw: bytes | str) -> None:
    """Drop the cache entries a message names (anything unreadable clears everything)."""
    try:
        event = json.loads(raw)
        if "key_id" in event:
            cache.invalidate_key_id(int(event["key_id"]))
        elif "tenant_id" in event:
            cache.invalidate_tenant_id(int(event["tenant_id"]))
        else:
            cache.clear()
    except (ValueError, TypeError, AttributeError):
        cache.clear()


def publish_event(client: Optional[redis.Redis], channel: str, message: str) -> bool:
    """Publish on the channel; False (logged) when Redis is unreachable: the TTL then applies."""
    if client is None:
        return False
    try:
        client.publish(channel, message)
        return True
    except redis.RedisError as exc:
        log.warning("could not publish a key change (%s); other workers see it within the "
                    "cache TTL", type(exc).__name__)
        return False


class KeyChangeNotifier(Protocol):
    """What an admin use case tells after its commit: this key, or every key of this tenant."""

    def changed(self, *, key_id: int | None = None, tenant_id: int | None = None) -> None: ...


class KeyEventPublisher:
    """The notifier of a process that keeps no key cache (the command line): publish only.

    `delivered` says what happened to the last event: True (published), False (Redis was
    unreachable: gateways see the change within their cache TTL), None (nothing published yet
    or no Redis configured).
    """

    def __init__(self, client: Optional[redis.Redis], channel: str) -> None:
        self.client = client
        self.channel = channel
        self.delivered: bool | None = None

    def changed(self, *, key_id: int | None = None, tenant_id: int | None = None) -> None:
        if self.client is not None:
            self.delivered = publish_event(self.client, self.channel,
                                           encode_event(key_id=key_id, tenant_id=tenant_id))


class KeyEvents:
    """The publisher and the per-worker listener of one app."""

    def __init__(self, cache: KeyCache, redis_url: str, channel: str,
                 publisher: Optional[redis.Redis] = None, max_retry_s: float = 2.0) -> None:
        self.cache = cache
        self.redis_url = redis_url
        self.channel = channel
        self.publisher = publisher
        self.max_retry_s = max_retry_s
        self.subscribed = threading.Event()   # set while the listener is subscribed
        self.subscriptions = 0                # how many times it (re)subscribed
        # Other process-wide events share the channel and the listener (one subscription per
        # worker): a message {"event": NAME, ...} goes to handlers[NAME]; on_subscribe hooks
        # run at every (re)subscription, to catch up with what may have been missed.
        self.handlers: dict[str, Callable[[dict], None]] = {}
        self.on_subscribe: list[Callable[[], None]] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def changed(self, *, key_id: int | None = None, tenant_id: int | None = None) -> None:
        """After a committed change: drop it here at once, and tell every other worker."""
        message = encode_event(key_id=key_id, tenant_id=tenant_id)
        apply_event(self.cache, message)
        publish_event(self.publisher, self.channel, message)

    def start(self) -> None:
        """Start the listener (with Redis; once: later and concurrent calls do nothing, and
        a stopped listener is not started again)."""
        with self._lock:
            if not self.redis_url or self._thread is not None or self._stop.is_set():
                return
            self._thread = threading.Thread(target=self._run, name="key-events", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 0.0) -> None:
        """Ask the listener to end (it does within half a second); wait up to `timeout`."""
        self._stop.set()
        thread = self._thread
        if timeout and thread is not None and thread.is_alive():
            thread.join(timeout)

    def publish(self, event: str, **fields: Any) -> bool:
        """Tell every worker of every replica about a process-wide event (see `handlers`)."""
        return publish_event(self.publisher, self.channel, json.dumps({"event": event, **fields}))

    def publish_acknowledged(self, event: str, timeout_s: float = 2.0, **fields: Any) -> bool:
        """`publish`, then wait until every listener that received the event has handled it
        (each one counts itself in a Redis key the message names): True once they all have, False
        (logged) when Redis is unreachable or `timeout_s` passed first. What a change that must be
        seen everywhere before its answer uses (a response-cache clear and the workers' hot copies)."""
        if self.publisher is None:
            return False
        ack = f"gw:events:ack:{uuid.uuid4().hex}"
        try:
            receivers = int(self.publisher.publish(self.channel, json.dumps({"event": event, "ack": ack, **fields})))
            deadline = time.monotonic() + timeout_s
            while int(self.publisher.get(ack) or 0) < receivers:
                if time.monotonic() >= deadline:
                    log.warning("%s: %s of %d listeners acknowledged within %.1fs", event,
                                int(self.publisher.get(ack) or 0), receivers, timeout_s)
                    return False
                time.sleep(0.002)
            return True
        except redis.RedisError as exc:
            log.warning("could not publish %s (%s)", event, type(exc).__name__)
            return False
        finally:
            try:
                self.publisher.delete(ack)
            except redis.RedisError:
                pass

    def _acknowledge(self, event: dict) -> None:
        ack = event.get("ack")
        if isinstance(ack, str) and ack.startswith("gw:events:ack:") and self.publisher is not None:
            try:
                self.publisher.pipeline(transaction=False).incr(ack).pexpire(ack, 60_000).execute()
            except redis.RedisError as exc:
                log.warning("could not acknowledge %s (%s)", event.get("event"), type(exc).__name__)

    def _dispatch(self, raw: bytes | str) -> None:
        try:
            event = json.loads(raw)
        except ValueError:
            event = None
        handler = self.handlers.get(event.get("event")) if isinstance(event, dict) else None
        if handler is not None:
            try:
                handler(event)
            except Exception:
                log.exception("handling the %r event failed", event.get("event"))
        elif not (isinstance(event, dict) and "event" in event):
            apply_event(self.cache, raw)
        if isinstance(event, dict):
            self._acknowledge(event)   # after handling: the publisher may be waiting for it

    def _caught_up(self) -> None:
        self.cache.expire_all()
        for hook in self.on_subscribe:
            try:
                hook()
            except Exception:
                log.exception("a resubscription hook failed")

    def _run(self) -> None:
        delay = 0.05
        urls = subscriber_urls(self.redis_url)   # a cluster: its nodes in turn
        while not self._stop.is_set():
            client = redis.Redis.from_url(next(urls), socket_connect_timeout=2, socket_timeout=5,
                                          socket_keepalive=True, health_check_interval=5)
            pubsub = client.pubsub()
            try:
                pubsub.subscribe(self.channel)
                while not self._stop.is_set():
                    message = pubsub.get_message(timeout=0.5)
                    if message is None:
                        continue
                    if message["type"] == "subscribe":
                        # Anything published while we were not listening is unknown: every
                        # entry is looked up again (kept only as the outage fallback).
                        self._caught_up()
                        self.subscriptions += 1
                        self.subscribed.set()
                        delay = 0.05
                    elif message["type"] == "message":
                        self._dispatch(message["data"])
            except (redis.RedisError, OSError) as exc:
                if self.subscribed.is_set():
                    log.warning("key-change listener lost Redis (%s); reconnecting (cache TTL "
                                "applies meanwhile)", type(exc).__name__)
            except Exception:  # never let the listener die: the cache would go stale silently
                log.exception("key-change listener failed; restarting it")
            finally:
                self.subscribed.clear()
                _close_quietly(pubsub, client)
            self._stop.wait(delay)
            delay = min(delay * 2, self.max_retry_s)


def _close_quietly(*resources: Any) -> None:
    for resource in resources:
        try:
            resource.close()
        except Exception:
            pass
