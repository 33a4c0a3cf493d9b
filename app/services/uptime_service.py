"""Uptime probes: a minimal streaming completion (one output token) to each deployment of an
alias, timed to the first event and to the end.

Results are cached for `cache_s` seconds, in Redis when there is one (so every worker and
replica answers from the same probe) else in the worker, and one worker probes an alias at
a time: the endpoint cannot be used to flood a provider. Each probe is a real upstream call,
so it is a completion run of the calling key (`open_run`, app/services/completion.py): admitted
on the key's limits, billed and recorded like any other. Its outcome feeds the deployment's
health record (a successful probe closes an open circuit); a provider that is not configured
is not called and says nothing about the deployment's health.
"""
from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

from app.errors import APIError
from app.providers.base import ProviderError
from app.providers.catalog import Deployment, ModelEntry
from app.providers.provider_manager import ProviderManager
from app.services.completion import CompletionRun
from app.services.provider_health import HealthBoard
from app.services.router import deployment_name

log = logging.getLogger("gateway.uptime")
PROBE_MESSAGES = [{"role": "user", "content": "Reply with one word: ok"}]
# (deployment, whether this probe holds the round's concurrency slot) -> its admitted run
OpenRun = Callable[[Deployment, bool], CompletionRun]


def probe_request(alias: str) -> dict[str, Any]:
    """The body of one probe: the smallest streamed completion."""
    return {"model": alias, "messages": PROBE_MESSAGES, "max_tokens": 1, "stream": True}


@dataclass
class ProbeResult:
    deployment: Deployment
    ok: bool = False
    ttft_ms: int | None = None
    latency_ms: int = 0
    error: ProviderError | None = None

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

    def check(self, entry: ModelEntry, open_run: OpenRun) -> dict[str, Any]:
        """The alias's report, from the cache or from a new probe round. Every probe of a round
        is admitted before any goes out; a refusal (APIError) cancels the round: the runs
        already admitted are closed, nothing is probed or cached. The round holds one
        concurrency slot (it is one client request)."""
        cached = self._cached(entry.alias)
        if cached is not None:
            return {**cached, "cached": True}
        lock = self._locks.setdefault(entry.alias, threading.Lock())
        with lock:  # concurrent checks of one alias in this worker wait for one probe round
            cached = self._cached(entry.alias)
            if cached is not None:
                return {**cached, "cached": True}
            results = [ProbeResult(dep) for dep in entry.deployments]
            runs: list[CompletionRun] = []
            try:
                for result in results:
                    runs.append(open_run(result.deployment, not runs))
            except BaseException:
                for run in runs:
                    run.close()
                raise
            self._probe_all(results, runs)
            report = {
                "object": "uptime", "model": entry.alias,
                "status": "up" if any(r.ok for r in results) else "down",
                "checked_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "deployments": [r.public() for r in results],
            }
            self._store(entry.alias, report)
        return {**report, "cached": False}

    def _probe_all(self, results: list[ProbeResult], runs: list[CompletionRun]) -> None:
        """Probe the deployments side by side (a hung one costs its timeout once, not N times)."""
        threads = [threading.Thread(target=self._probe, args=(r, run), daemon=True)
                   for r, run in zip(results, runs)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    def _probe(self, result: ProbeResult, run: CompletionRun) -> None:
        dep = result.deployment
        started = time.perf_counter()
        try:
            for _ in run.stream():  # settles when the stream ends (or fails)
                if result.ttft_ms is None:
                    result.ttft_ms = int((time.perf_counter() - started) * 1000)
            result.ok = True
        except ProviderError as exc:
            result.error = exc
        except APIError as exc:  # failed before the first event: the provider's error is its cause
            cause = exc.__cause__
            result.error = cause if isinstance(cause, ProviderError) else ProviderError(exc.message)
        except Exception as exc:  # noqa: BLE001 - a probe reports, it never raises
            log.warning("uptime probe of %s/%s failed: %s", dep.provider, dep.model, type(exc).__name__)
            result.error = ProviderError("the probe failed inside the gateway")
        finally:
            run.close()
        result.latency_ms = int((time.perf_counter() - started) * 1000)
        rec = self.health.get(deployment_name(dep))
        if result.ok:
            self.health.success(rec, result.latency_ms / 1000)
        elif result.error is None or result.error.kind != "not_configured":
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
