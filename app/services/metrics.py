"""The gateway's Prometheus metrics: defined once per process, observed in two places.

- `observe_run(trace, event)`: every completion run, once, from its settlement
  (app/services/settlement_service.py): requests, latency, time to first token, tokens, cost,
  retries, fallbacks, response cache, refusals after admission.
- `observe_refusal(endpoint, reason)`: a request refused before a run existed (a key's limit),
  from the error handler of app/errors.py.

Everything else (circuit states, provider queues, the usage writer's queue, lag and outbox,
key-cache lookups) is read when the figures are asked for, or every few seconds by the
metrics ticker: nothing on the request path.

Under gunicorn the values live in prometheus_client's multiprocess files
(PROMETHEUS_MULTIPROC_DIR, prepared by gunicorn.config.py), so that any worker's answer sums
every worker's counts, dead workers' included. Without that directory (run.py, tests) each
`GatewayMetrics` has its own registry.

Cheap on purpose (docs/metrics.md gives the measured cost): the label children of each
(endpoint, model, provider, status) combination are bound once and cached, and an observation
only adds to a per-process dict of pending amounts (a dict update, not a locked write to the
multiprocess file per value); `flush()` moves them into prometheus_client's values, every
FLUSH_S by the ticker, before this process's figures are read, and when the runtime closes.
A worker killed with SIGKILL loses at most its last FLUSH_S of counts (as it loses the usage
rows still in its memory). The pending amounts are keyed by prometheus_client's value objects
(`_value` of a counter child, `_sum` / `_buckets` / `_upper_bounds` of a histogram child) of
the pinned version (requirements.txt); Testing/services/test_metrics.py checks what they give. Label values are bounded (`LabelBound`): only names from the code or
the catalogue, never client input, never a key's secret, tenants and keys by numeric id only
when a setting asks for it.
"""
from __future__ import annotations

import logging
import os
import re
import threading
import time
from bisect import bisect_left
from typing import Any, Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics
from prometheus_client.core import GaugeMetricFamily

disable_created_metrics()  # no `_created` series: they double the output and nobody graphs them

log = logging.getLogger("gateway.metrics")

# OpenTelemetry GenAI semantic conventions (gen_ai.server.request.duration, ...): bucket bounds
# as the conventions advise.
DURATION_BUCKETS = (0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92)
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0)
TOKEN_BUCKETS = (1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304, 16777216, 67108864)

# gen_ai.operation.name of each endpoint (the conventions' values).
OPERATIONS = {"chat.completions": "chat", "responses": "chat", "messages": "chat", "api.chat": "chat",
              "uptime": "chat", "embeddings": "embeddings", "images": "generate_content"}
STATUSES = ("ok", "error", "client_disconnected", "refused")
CIRCUIT_STATES = {"closed": 0, "half_open": 1, "open": 2}
MAX_LABEL_VALUES = 200         # distinct values one label may take per process; past it: "other"
MAX_LABEL_LENGTH = 100
FLUSH_S = 1.0                  # pending amounts reach the (multiprocess) values at least this often
TICK_S = 5.0                   # the ticker: gauges of this worker, key-cache counts, history
HISTORY_S = 3600.0             # /api/metrics rates look back this far at most
_SAFE = re.compile(r"^[A-Za-z0-9_.:/@+ \-]+$")


def multiprocess_dir() -> str | None:
    """The multiprocess directory prometheus_client writes to, when it is in that mode. It
    chose its mode when first imported (by this module): a PROMETHEUS_MULTIPROC_DIR set later
    (from .env by run.py) does not count, the values being in this process's memory."""
    from prometheus_client import values
    if values.ValueClass.__name__ != "MmapedValue":
        return None
    path = os.environ.get("PROMETHEUS_MULTIPROC_DIR") or os.environ.get("prometheus_multiproc_dir") or None
    if path:
        os.makedirs(path, exist_ok=True)
    return path


class LabelBound:
    """One label's values, bounded: a value longer than MAX_LABEL_LENGTH or with characters
    outside [A-Za-z0-9_.:/@+ -] (a catalogue's upstream model ids may hold spaces) is
    "invalid"; past `limit` distinct values, new ones are "other". Values come from the code or the catalogue; this is the safety net that keeps a
    mistake (or a catalogue of thousands of aliases) from exploding the series count."""

    __slots__ = ("limit", "seen")

    def __init__(self, limit: int = MAX_LABEL_VALUES) -> None:
        self.limit = limit
        self.seen: set[str] = set()

    def __call__(self, value: Any) -> str:
        if value is None:
            return ""
        text = str(value)
        if text in self.seen:
            return text
        if not text:
            return ""
        if len(text) > MAX_LABEL_LENGTH or not _SAFE.match(text):
            return "invalid"
        if len(self.seen) >= self.limit:
            return "other"
        self.seen.add(text)
        return text


class GatewayMetrics:
    """The metrics of one gateway process (see the module docstring)."""

    def __init__(self, enabled: bool = True, tenant_labels: bool = False, key_labels: bool = False,
                 mp_dir: str | None = None) -> None:
        self.enabled = enabled
        self.tenant_labels = tenant_labels
        self.key_labels = key_labels
        self.mp_dir = mp_dir if mp_dir is not None else multiprocess_dir()
        # Multiprocess: values go to the directory's files and are collected from there; the
        # metric objects are then registered nowhere. Otherwise: this object's own registry.
        self.registry = None if self.mp_dir else CollectorRegistry(auto_describe=True)
        self.started_at = time.time()
        self._bound = {name: LabelBound() for name in
                       ("endpoint", "model", "provider", "status", "error", "reason", "tenant", "key")}
        self._runs: dict[tuple, tuple] = {}
        self._tokens: dict[tuple, tuple] = {}
        self._refusals: dict[tuple, Any] = {}
        self._pending: dict[Any, float] = {}    # prometheus_client value -> amount not yet added
        self._pending_lock = threading.Lock()
        self._lock = threading.Lock()
        self._ticker: threading.Thread | None = None
        self._stop = threading.Event()
        self.history: list[tuple[float, dict[str, Any]]] = []
        self.sources: dict[str, Callable[[], Any]] = {}
        reg = self.registry
        extra = (["tenant_id"] if tenant_labels else []) + (["api_key_id"] if key_labels else [])
        gen_ai = ["gen_ai_operation_name", "gen_ai_provider_name", "gen_ai_request_model"]
        self.requests = Counter("gateway_requests", "Completion runs, by how they ended",
                                ["endpoint", "model", "provider", "status"], registry=reg)
        self.duration = Histogram("gen_ai_server_request_duration_seconds",
                                  "Time from the request's arrival to its last byte (OpenTelemetry "
                                  "gen_ai.server.request.duration)", gen_ai + ["error_type"],
                                  buckets=DURATION_BUCKETS, registry=reg)
        self.ttft = Histogram("gen_ai_server_time_to_first_token_seconds",
                              "Streamed answers: time from the request's arrival to the first piece "
                              "(OpenTelemetry gen_ai.server.time_to_first_token)", gen_ai, buckets=TTFT_BUCKETS,
                              registry=reg)
        self.token_usage = Histogram("gen_ai_client_token_usage", "Tokens per completion, input and output "
                                     "(OpenTelemetry gen_ai.client.token.usage)", gen_ai + ["gen_ai_token_type"],
                                     buckets=TOKEN_BUCKETS, registry=reg)
        self.tokens = Counter("gateway_tokens", "Tokens billed, input and output", ["model", "token_type"] + extra,
                              registry=reg)
        self.cost = Counter("gateway_cost_usd", "Cost billed in USD", ["model"] + extra, registry=reg)
        self.refusals = Counter("gateway_refusals", "Requests refused by a limit, quota or breaker, by which",
                                ["endpoint", "reason"], registry=reg)
        self.retries = Counter("gateway_upstream_retries", "Upstream calls made again on the same or another "
                               "deployment after a failure", ["model"], registry=reg)
        self.fallbacks = Counter("gateway_fallbacks", "Runs answered (or failed) on a deployment other than "
                                 "the first tried", ["model"], registry=reg)
        self.cache = Counter("gateway_response_cache", "Response cache lookups, hit or miss",
                             ["model", "result"], registry=reg)
        self.cache_saved = Counter("gateway_response_cache_saved_usd", "Cost the response cache saved (USD)",
                                   ["model"], registry=reg)
        self.key_cache = Counter("gateway_key_cache_lookups", "API key lookups, answered by the per-worker "
                                 "cache (hit) or the database (miss)", ["result"], registry=reg)
        self.rows_queued = Gauge("gateway_usage_rows_queued", "Usage rows waiting in the workers' memory for "
                                 "the usage writer", registry=reg, multiprocess_mode="livesum")
        self.write_lag = Gauge("gateway_usage_write_lag_seconds", "Age of the oldest usage row still waiting "
                               "for the writer (0: none waits)", registry=reg, multiprocess_mode="livemax")
        self._key_cache_seen = [0, 0]
        if reg is not None:
            reg.register(ScrapeCollector(self))

    # -- the request path ------------------------------------------------------------------------

    def _run_children(self, endpoint: str, alias: str, provider: str, status: str, error: str) -> tuple:
        """The values one run of this combination adds to: requests, then (bounds, sum, buckets)
        of the duration, time-to-first-token, input and output token histograms, and the model
        label. Bound once per combination."""
        key = (endpoint, alias, provider, status, error)
        children = self._runs.get(key)
        if children is None:
            b = self._bound
            ep, model, prov = b["endpoint"](endpoint), b["model"](alias), b["provider"](provider)
            op = OPERATIONS.get(endpoint, "chat")
            children = (self.requests.labels(ep, model, prov, b["status"](status))._value,
                        _histogram(self.duration.labels(op, prov, model, b["error"](error))),
                        _histogram(self.ttft.labels(op, prov, model)),
                        _histogram(self.token_usage.labels(op, prov, model, "input")),
                        _histogram(self.token_usage.labels(op, prov, model, "output")),
                        model)
            self._runs[key] = children
        return children

    def _token_children(self, model: str, tenant_id: Any, key_id: Any) -> tuple:
        key = (model, tenant_id, key_id)
        children = self._tokens.get(key)
        if children is None:
            extra = []
            if self.tenant_labels:
                extra.append(self._bound["tenant"](tenant_id))
            if self.key_labels:
                extra.append(self._bound["key"](key_id))
            children = (self.tokens.labels(model, "input", *extra)._value,
                        self.tokens.labels(model, "output", *extra)._value,
                        self.cost.labels(model, *extra)._value)
            self._tokens[key] = children
        return children

    def observe_run(self, trace: Any, event: Any) -> None:
        """One settled completion run (`event`: its usage event, None when it could not be
        worked out). Never raises."""
        if not self.enabled:
            return
        try:
            dep = trace.deployment
            status = "refused" if trace.refusal else trace.status
            error = "" if status == "ok" else (trace.refusal or trace.error_type or "")
            requests, duration, ttft, tok_in, tok_out, model = self._run_children(
                trace.endpoint, trace.entry.alias, dep.provider if dep is not None else "", status, error)
            adds: list[tuple[Any, float]] = [(requests, 1.0)]
            _observe(adds, duration, time.perf_counter() - trace.started)
            if trace.streamed and trace.first_byte_at is not None:
                _observe(adds, ttft, trace.first_byte_at - trace.started)
            if event is not None and (event.prompt_tokens or event.completion_tokens or event.cost_usd):
                _observe(adds, tok_in, event.prompt_tokens)
                _observe(adds, tok_out, event.completion_tokens)
                t_in, t_out, cost = self._token_children(model, trace.key.tenant_id, trace.key.id)
                adds.append((t_in, event.prompt_tokens))
                adds.append((t_out, event.completion_tokens))
                if event.cost_usd:
                    adds.append((cost, float(event.cost_usd)))
            if trace.attempts > 1:
                adds.append((self.retries.labels(model)._value, trace.attempts - 1))
            if trace.deployments_tried > 1:
                adds.append((self.fallbacks.labels(model)._value, 1.0))
            if trace.cache is not None:
                adds.append((self.cache.labels(model, "hit" if trace.cache == "hit" else "miss")._value, 1.0))
                if trace.saved_cost:
                    adds.append((self.cache_saved.labels(model)._value, float(trace.saved_cost)))
            self._add(adds)
            if trace.refusal:
                self.observe_refusal(trace.endpoint, trace.refusal)
        except Exception:  # noqa: BLE001 - figures must never break a settlement
            log.exception("metrics of run %s not observed", getattr(trace, "request_id", "?"))

    def observe_refusal(self, endpoint: str, reason: str) -> None:
        if not self.enabled:
            return
        value = self._refusals.get((endpoint, reason))
        if value is None:
            value = self._refusals[(endpoint, reason)] = self.refusals.labels(
                self._bound["endpoint"](endpoint), self._bound["reason"](reason))._value
        self._add(((value, 1.0),))

    def _add(self, adds: Iterable[tuple[Any, float]]) -> None:
        pending = self._pending
        with self._pending_lock:
            for value, amount in adds:
                pending[value] = pending.get(value, 0.0) + amount

    def flush(self) -> None:
        """Move the pending amounts into prometheus_client's values (the multiprocess files)."""
        with self._pending_lock:
            if not self._pending:
                return
            pending, self._pending = self._pending, {}
        for value, amount in pending.items():
            value.inc(amount)

    # -- the ticker (off the request path) -------------------------------------------------------

    def start(self) -> None:
        """Start this worker's ticker (once): the gauges of its usage writer, its key-cache
        counts, and a history sample for /api/metrics rates, every TICK_S seconds."""
        if not self.enabled:
            return
        with self._lock:
            if self._ticker is not None or self._stop.is_set():
                return
            self._ticker = threading.Thread(target=self._tick_forever, name="metrics-ticker", daemon=True)
            self._ticker.start()

    def stop(self) -> None:
        """End the ticker; what is pending is added now (a closing worker keeps its counts)."""
        self._stop.set()
        self.flush()

    def _tick_forever(self) -> None:
        self.tick()
        last_tick = time.monotonic()
        while not self._stop.wait(FLUSH_S):
            try:
                self.flush()
            except Exception:  # noqa: BLE001
                log.exception("metrics flush failed")
            if time.monotonic() - last_tick >= TICK_S:
                last_tick = time.monotonic()
                self.tick()

    def tick(self, now: float | None = None) -> None:
        """Refresh this worker's gauges and counts, and record a history sample. Never raises."""
        try:
            self.record_sample(now)
        except Exception:  # noqa: BLE001
            log.exception("metrics tick failed")

    def refresh_local(self) -> None:
        """This worker's figures that are counted outside prometheus_client: the usage writer's
        queue and lag, the key cache's hits and misses (added as deltas)."""
        batcher = self.sources.get("usage_batcher")
        if batcher is not None:
            b = batcher()
            self.rows_queued.set(b.depth)
            self.write_lag.set(round(b.write_lag_s, 3))
        key_cache = self.sources.get("key_cache")
        if key_cache is not None:
            cache = key_cache()
            with self._lock:
                hits, misses = cache.hits, cache.misses
                dh, dm = hits - self._key_cache_seen[0], misses - self._key_cache_seen[1]
                self._key_cache_seen = [hits, misses]
            if dh > 0:
                self.key_cache.labels("hit").inc(dh)
            if dm > 0:
                self.key_cache.labels("miss").inc(dm)

    def record_sample(self, now: float | None = None) -> None:
        from app.services.metrics_summary import totals
        now = time.time() if now is None else now
        sample = totals(self.collect_counters())
        with self._lock:
            self.history.append((now, sample))
            while self.history and now - self.history[0][0] > HISTORY_S + 2 * TICK_S:
                self.history.pop(0)

    # -- reading ------------------------------------------------------------------------------------

    def collection_registry(self) -> CollectorRegistry:
        """A registry whose collection holds every worker's figures (multiprocess) or this
        process's, plus the figures read at scrape time. This worker's own counts first."""
        self.flush()
        self.refresh_local()
        if self.registry is not None:
            return self.registry
        from prometheus_client import multiprocess
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, path=self.mp_dir)
        registry.register(ScrapeCollector(self))
        return registry

    def collect_counters(self) -> list[Any]:
        """The recorded families (every worker's under gunicorn), without the scrape-time ones."""
        self.flush()
        self.refresh_local()
        if self.registry is not None:
            return [f for c in (self.requests, self.tokens, self.cost, self.refusals, self.cache, self.cache_saved,
                                self.duration, self.ttft, self.token_usage, self.rows_queued, self.write_lag)
                    for f in c.collect()]
        from prometheus_client import multiprocess
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, path=self.mp_dir)
        return list(registry.collect())


class ScrapeCollector:
    """Figures read when /metrics is asked for: circuit state and provider queue of every
    deployment (fleet-wide when Redis is shared), the usage outbox. Only the scraping worker
    runs it, so its answer does not depend on which worker was asked."""

    def __init__(self, metrics: GatewayMetrics) -> None:
        self.metrics = metrics

    def describe(self) -> Iterable[Any]:
        return []

    def collect(self) -> Iterable[Any]:
        sources = self.metrics.sources
        deployments = sources.get("deployments")
        if deployments is not None:
            circuit = GaugeMetricFamily("gateway_circuit_state", "Circuit breaker of each deployment, the worst "
                                        "any worker sees: 0 closed, 1 half-open, 2 open", labels=["deployment"])
            q_len = GaugeMetricFamily("gateway_provider_queue_length", "Requests waiting for a deployment's "
                                      "provider quota (provider throttling queue)", labels=["deployment"])
            q_wait = GaugeMetricFamily("gateway_provider_queue_oldest_wait_seconds", "How long the oldest "
                                       "request in a deployment's provider queue has waited", labels=["deployment"])
            try:
                for name, state, queue in deployments():
                    circuit.add_metric([name], CIRCUIT_STATES.get(state, 0))
                    if queue is not None:
                        q_len.add_metric([name], queue.length)
                        q_wait.add_metric([name], round(queue.oldest_wait_s, 3))
            except Exception:  # noqa: BLE001 - Redis down: the families stay empty
                log.warning("metrics: deployment states not read", exc_info=True)
            yield circuit
            yield q_len
            yield q_wait
        outbox = sources.get("outbox")
        if outbox is not None:
            depth = outbox()
            rows = GaugeMetricFamily("gateway_usage_outbox_rows", "Usage rows in the shared Redis outbox, "
                                     "waiting for PostgreSQL")
            if depth.get("redis") is not None:
                rows.add_metric([], depth["redis"])
            yield rows
            spool = GaugeMetricFamily("gateway_usage_outbox_spool_bytes", "Bytes of usage rows in this machine's "
                                      "spool files, waiting for PostgreSQL")
            if "spool_bytes" in depth:
                spool.add_metric([], depth["spool_bytes"])
            yield spool
        from app.services.metrics_summary import started_at
        yield GaugeMetricFamily("gateway_metrics_start_time_seconds", "When this gateway instance's figures "
                                "started (unix time; its counters count from then)", value=started_at(self.metrics))


def _histogram(child: Any) -> tuple:
    """(upper bounds, sum value, bucket values) of a bound Histogram child."""
    return child._upper_bounds, child._sum, child._buckets


def _observe(adds: list[tuple[Any, float]], histogram: tuple, amount: float) -> None:
    """What `Histogram.observe(amount)` adds, as pending amounts (the bucket: the first bound
    not below the amount, as prometheus_client picks it)."""
    bounds, total, buckets = histogram
    adds.append((total, amount))
    adds.append((buckets[bisect_left(bounds, amount)], 1.0))
