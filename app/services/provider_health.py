"""What each worker has seen of each deployment: circuit breaker, recent outcomes, latency,
last error. Recording an outcome is a few attribute writes (it runs on every request).

Breaker decisions stay per worker (see `circuit_breaker`); for `GET /v1/providers/status`
each worker publishes a snapshot of its observations to one Redis hash from a background
loop (only when something changed, every `publish_interval_s`), never on the request path.
The status endpoint merges the fresh snapshots of every worker of every replica.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from collections import deque
from typing import Any, Callable, Iterable

from app.providers.base import ProviderError
from app.services.circuit_breaker import CLOSED, HALF_OPEN, OPEN, BreakerConfig, CircuitBreaker

log = logging.getLogger("gateway.health")

HEALTH_KEY = "gw:provider_health"
RECENT = 100  # outcomes kept per deployment for the success ratio and p50
_STATE_RANK = {CLOSED: 0, HALF_OPEN: 1, OPEN: 2}


class DeploymentHealth:
    __slots__ = ("name", "breaker", "recent", "latencies", "last_error", "last_error_at",
                 "last_used", "requests", "failures")

    def __init__(self, name: str, breaker: CircuitBreaker) -> None:
        self.name = name
        self.breaker = breaker
        self.recent: deque[bool] = deque(maxlen=RECENT)       # True = success
        self.latencies: deque[int] = deque(maxlen=RECENT)     # ms of successful attempts
        self.last_error: str | None = None
        self.last_error_at: float | None = None               # unix time
        self.last_used = 0.0                                  # monotonic
        self.requests = 0
        self.failures = 0

    def snapshot(self) -> dict[str, Any]:
        return {"state": self.breaker.state, "retry_in_s": round(self.breaker.retry_in(), 3),
                "recent": [1 if ok else 0 for ok in self.recent], "latencies": list(self.latencies),
                "last_error": self.last_error, "last_error_at": self.last_error_at,
                "requests": self.requests, "failures": self.failures}


class HealthBoard:
    """The worker's health records, one per deployment name ("provider/model")."""

    def __init__(self, breaker_config: BreakerConfig, redis_client: Any = None,
                 publish_interval_s: float = 0.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.breaker_config = breaker_config
        self.clock = clock
        self.redis = redis_client
        self.publish_interval_s = publish_interval_s
        self.worker_id = f"{socket.gethostname()}:{os.getpid()}"
        self._records: dict[str, DeploymentHealth] = {}
        self._dirty = False
        self._publisher: threading.Thread | None = None
        self._stopped = threading.Event()
        self._lock = threading.Lock()

    def get(self, name: str) -> DeploymentHealth:
        rec = self._records.get(name)
        if rec is None:
            rec = self._records[name] = DeploymentHealth(name, CircuitBreaker(self.breaker_config, self.clock))
        return rec

    def success(self, rec: DeploymentHealth, latency_s: float) -> None:
        rec.requests += 1
        rec.recent.append(True)
        rec.latencies.append(int(latency_s * 1000))
        if rec.breaker.state != CLOSED:
            log.info("circuit of %s closed again (this worker)", rec.name)
        rec.breaker.record_success()
        self._changed()

    def failure(self, rec: DeploymentHealth, exc: ProviderError | None, *, trips_breaker: bool = True) -> None:
        rec.requests += 1
        rec.failures += 1
        rec.recent.append(False)
        rec.last_error = exc.kind if exc is not None else "internal"
        rec.last_error_at = time.time()
        if trips_breaker:
            was = rec.breaker.state
            rec.breaker.record_failure(exc.retry_after if exc is not None else None)
            if rec.breaker.state == OPEN and was != OPEN:
                log.warning("circuit of %s opened for %.1fs after %s (this worker)", rec.name,
                            rec.breaker.open_for, rec.last_error)
        self._changed()

    def _changed(self) -> None:
        self._dirty = True

    # -- sharing observations (off the request path) -------------------------------------------

    def start(self) -> None:
        """Start the publisher (with Redis and a publish interval; once): a daemon thread, i.e.
        a greenlet under gevent. Called by the app's Runtime.start() in the worker."""
        with self._lock:
            if (self._publisher is None and not self._stopped.is_set() and self.redis is not None
                    and self.publish_interval_s > 0):
                self._publisher = threading.Thread(target=self._publish_loop, name="health-publisher",
                                                   daemon=True)
                self._publisher.start()

    def _publish_loop(self) -> None:
        while not self._stopped.wait(self.publish_interval_s):
            if self._dirty:
                self.publish()

    def publish(self) -> None:
        """Write this worker's snapshot to Redis (also called by the status endpoint so that its
        own worker's view is never stale). Failures are logged, never raised."""
        if self.redis is None:
            return
        self._dirty = False
        payload = json.dumps({"at": time.time(), "deployments": self.local_snapshot()})
        try:
            pipe = self.redis.pipeline(transaction=False)
            pipe.hset(HEALTH_KEY, self.worker_id, payload)
            pipe.expire(HEALTH_KEY, max(60, int(self.publish_interval_s * 30)))
            pipe.execute()
        except Exception as exc:  # noqa: BLE001 - reporting must never break anything
            self._dirty = True
            log.debug("provider health not published: %s", type(exc).__name__)

    def local_snapshot(self) -> dict[str, dict[str, Any]]:
        return {name: rec.snapshot() for name, rec in list(self._records.items())}

    def fleet_snapshots(self, max_age_s: float) -> list[dict[str, dict[str, Any]]]:
        """Snapshots of every worker that published within `max_age_s` (this one included,
        fresh). Without Redis, or with sharing off (interval 0): this worker's only."""
        own = self.local_snapshot()
        if self.redis is None or self.publish_interval_s <= 0:
            return [own]
        self.publish()
        try:
            raw = self.redis.hgetall(HEALTH_KEY)
        except Exception:  # noqa: BLE001
            return [own]
        now, result, stale = time.time(), [own], []
        for worker, value in raw.items():
            worker = worker.decode() if isinstance(worker, bytes) else worker
            if worker == self.worker_id:
                continue
            try:
                data = json.loads(value)
            except ValueError:
                continue
            if now - float(data.get("at", 0)) > max_age_s:
                stale.append(worker)
                continue
            result.append(data.get("deployments") or {})
        if stale:
            try:
                self.redis.hdel(HEALTH_KEY, *stale)
            except Exception:  # noqa: BLE001
                pass
        return result

    def stop(self) -> None:
        """End the publisher loop (the app is being closed)."""
        self._stopped.set()


def merge_snapshots(name: str, snapshots: Iterable[dict[str, dict[str, Any]]]) -> dict[str, Any]:
    """One deployment's view over all workers: the worst circuit state (and how many workers
    see each), success ratio and p50 latency over their recent outcomes, the latest error, and
    a status: down (a circuit open, or every recent call failed), degraded (some failed, or a
    circuit half-open), up, or unknown (no call seen yet)."""
    states = {CLOSED: 0, HALF_OPEN: 0, OPEN: 0}
    recent: list[int] = []
    latencies: list[int] = []
    last_error, last_error_at, requests, failures, retry_in = None, None, 0, 0, 0.0
    for snap in snapshots:
        data = snap.get(name)
        if not data:
            continue
        states[data.get("state", CLOSED)] = states.get(data.get("state", CLOSED), 0) + 1
        if data.get("state") == OPEN:
            retry_in = max(retry_in, float(data.get("retry_in_s") or 0))
        recent += data.get("recent") or []
        latencies += data.get("latencies") or []
        requests += int(data.get("requests") or 0)
        failures += int(data.get("failures") or 0)
        at = data.get("last_error_at")
        if at is not None and (last_error_at is None or at > last_error_at):
            last_error, last_error_at = data.get("last_error"), at
    worst = max((s for s, n in states.items() if n), key=_STATE_RANK.__getitem__, default=CLOSED)
    latencies.sort()
    ratio = sum(recent) / len(recent) if recent else None
    if worst == OPEN or ratio == 0:
        status = "down"
    elif ratio is None:
        status = "unknown"
    else:
        status = "up" if ratio >= 0.9 and worst == CLOSED else "degraded"
    return {
        "status": status,
        "circuit": worst,
        "workers_by_circuit": {s: n for s, n in states.items() if n},
        "open_retry_in_s": round(retry_in, 3) if worst == OPEN else None,
        "recent_requests": len(recent),
        "recent_success_ratio": round(sum(recent) / len(recent), 4) if recent else None,
        "p50_latency_ms": latencies[len(latencies) // 2] if latencies else None,
        "requests": requests, "failures": failures,
        "last_error": last_error,
        "last_error_at": (time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(last_error_at))
                          if last_error_at is not None else None),
    }
