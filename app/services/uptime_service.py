"""Uptime probes: a minimal streaming completion (one output token) to each deployment of an
alias, timed to the first event and to the end.

Results are cached for `cache_s` seconds, in Redis when there is one (so every worker and
replica answers from the same probe) else in the worker, and one worker probes an alias at
a time: the endpoint cannot be used to flood a provider. Each probe is a real upstream call:
the caller admits it against the calling key's limits first (`admit`) and records its usage
(`on_probe`) like any other completion, and its outcome feeds
the deployment's health record (a successful probe closes an open circuit).
"""
from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from app.providers.base import ProviderError
from app.providers.catalog import Deployment, ModelEntry
from app.providers.provider_manager import ProviderManager
from app.services.provider_health import HealthBoard

log = logging.getLogger("gateway.uptime")
PROBE_MESSAGES = [{"role": "user", "content": "Reply with one word: ok"}]


@dataclass
class ProbeResult:
    deployment: Deployment
    request: dict[str, Any]
    ok: bool = False
    ttft_ms: int | None = None
    latency_ms: int = 0
    error: ProviderError | None = None
    usage: dict[str, Any] | None = None
    chunks: list[bytes] = field(default_factory=list)

    def public(self) -> dict[str, Any]:
        return {"provider": self.deployment.provider, "model": self.deployment.model,
                "status": "up" if self.ok else "down", "time_to_first_token_ms": self.ttft_ms,
                "latency_ms": self.latency_ms, "error": self.error.kind if self.error else None}


class UptimeChecker:
    def __init__(self, providers: ProviderManager, health: HealthBoard, redis_client: Any,
                 cache_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.providers = providers
        self.clock = clock  # the worker's cache lifetime (Redis keeps its own TTL)
        self.health = health
        self.redis = redis_client
        self.cache_s = cache_s
        self._local: dict[str, tuple[float, dict[str, Any]]] = {}
        self._locks: dict[str, threading.Lock] = {}

    def check(self, entry: ModelEntry, on_probe: Callable[[ProbeResult], None],
              admit: Callable[[list[ProbeResult]], None] | None = None) -> dict[str, Any]:
        """The alias's report, from the cache or from a new probe round. `admit` sees the round's
        probes before any goes out and may raise to cancel it (nothing probed, nothing cached);
        `on_probe` gets each probe's outcome afterwards."""
        cached = self._cached(entry.alias)
        if cached is not None:
            return {**cached, "cached": True}
        lock = self._locks.setdefault(entry.alias, threading.Lock())
        with lock:  # concurrent checks of one alias in this worker wait for one probe round
            cached = self._cached(entry.alias)
            if cached is not None:
                return {**cached, "cached": True}
            results = self._planned(entry)
            if admit is not None:
                admit(results)
            self._probe_all(results)
            for result in results:
                on_probe(result)
            report = {
                "object": "uptime", "model": entry.alias,
                "status": "up" if any(r.ok for r in results) else "down",
                "checked_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "deployments": [r.public() for r in results],
            }
            self._store(entry.alias, report)
        return {**report, "cached": False}

    @staticmethod
    def _planned(entry: ModelEntry) -> list[ProbeResult]:
        return [ProbeResult(dep, {"model": dep.model, "messages": PROBE_MESSAGES, "max_tokens": 1,
                                  "stream": True}) for dep in entry.deployments]

    def _probe_all(self, results: list[ProbeResult]) -> None:
        """Probe the deployments side by side (a hung one costs its timeout once, not N times)."""
        threads = [threading.Thread(target=self._probe, args=(r,), daemon=True) for r in results]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    def _probe(self, result: ProbeResult) -> None:
        dep = result.deployment
        rec = self.health.get(f"{dep.provider}/{dep.model}")
        started = time.perf_counter()
        try:
            for piece in self.providers.provider(dep.provider).stream(result.request):
                if result.ttft_ms is None:
                    result.ttft_ms = int((time.perf_counter() - started) * 1000)
                if piece.usage is not None:
                    result.usage = piece.usage
                if not piece.usage_only:
                    result.chunks.append(piece.data())
            result.ok = True
        except ProviderError as exc:
            result.error = exc
        except Exception as exc:  # noqa: BLE001 - a probe reports, it never raises
            log.warning("uptime probe of %s/%s failed: %s", dep.provider, dep.model, type(exc).__name__)
            result.error = ProviderError("the probe failed inside the gateway")
        result.latency_ms = int((time.perf_counter() - started) * 1000)
        if result.ok:
            self.health.success(rec, result.latency_ms / 1000)
        else:
            self.health.failure(rec, result.error)

    def _cached(self, alias: str) -> dict[str, Any] | None:
        if self.redis is not None:
            try:
                raw = self.redis.get(f"gw:uptime:{alias}")
                return json.loads(raw) if raw else None
            except Exception:  # noqa: BLE001 - fall back to the worker's cache
                pass
        hit = self._local.get(alias)
        return hit[1] if hit and hit[0] > self.clock() else None

    def _store(self, alias: str, report: dict[str, Any]) -> None:
        self._local[alias] = (self.clock() + self.cache_s, report)
        if self.redis is not None and self.cache_s > 0:
            try:
                self.redis.set(f"gw:uptime:{alias}", json.dumps(report), px=int(self.cache_s * 1000))
            except Exception:  # noqa: BLE001
                pass
