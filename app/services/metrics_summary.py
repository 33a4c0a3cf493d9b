"""GET /api/metrics: the figures of the Prometheus registry as a JSON summary for people and
the console: totals since the gateway started, rates over the last minute and hour, per model
and per provider.

Source: the same registry /metrics serves (under gunicorn, prometheus_client's multiprocess
files, so every worker of this gateway instance is summed, dead workers' counts included).
Rates need earlier values: each worker's metrics ticker records a sample of the summed figures
every few seconds (app/services/metrics.py), and a rate is the difference with the newest
sample at least a minute (an hour) old, or with the oldest one when the worker is younger than
that (`window_s` says how long the window really was). Not PostgreSQL: the usage table has no
index on time alone, so "the last hour of every key" would read a month's partition per call.
"""
from __future__ import annotations

import os
import time
from datetime import datetime, timezone
from decimal import Decimal
from typing import Any, Iterable

from app.utils.money import format_money

_FIGURES = ("requests", "ok", "errors", "client_disconnected", "refused", "input_tokens", "output_tokens",
            "cost_usd", "duration_sum", "duration_count", "ttft_sum", "ttft_count")
STARTED_FILE = "gateway-started"   # written by gunicorn.config.py's master in the multiprocess directory


def _blank() -> dict[str, float]:
    return dict.fromkeys(_FIGURES, 0.0)


def totals(families: Iterable[Any]) -> dict[str, Any]:
    """The recorded figures summed over every label but model and provider."""
    out: dict[str, Any] = {"all": _blank(), "models": {}, "providers": {}, "refusals": {},
                           "cache": {"hit": 0.0, "miss": 0.0, "saved_usd": 0.0}, "usage": {}}
    models, providers = out["models"], out["providers"]

    def add(where: dict[str, Any], name: str | None, figure: str, value: float) -> None:
        if name is None:
            return
        row = where.get(name)
        if row is None:
            row = where[name] = _blank()
        row[figure] += value

    for family in families:
        for s in family.samples:
            name, labels, value = s.name, s.labels, s.value
            if name == "gateway_requests_total":
                status = labels.get("status", "")
                figure = {"ok": "ok", "error": "errors", "client_disconnected": "client_disconnected",
                          "refused": "refused"}.get(status)
                rows = [out["all"]]
                # a run that reached no provider (a cache hit, a refusal) has provider=""
                for where, key in ((models, labels.get("model")), (providers, labels.get("provider"))):
                    if key:
                        rows.append(where.setdefault(key, _blank()))
                for row in rows:
                    row["requests"] += value
                    if figure:
                        row[figure] += value
            elif name == "gateway_tokens_total":
                figure = "input_tokens" if labels.get("token_type") == "input" else "output_tokens"
                out["all"][figure] += value
                add(models, labels.get("model"), figure, value)
            elif name == "gateway_cost_usd_total":
                out["all"]["cost_usd"] += value
                add(models, labels.get("model"), "cost_usd", value)
            elif name == "gen_ai_client_token_usage_sum":
                figure = "input_tokens" if labels.get("gen_ai_token_type") == "input" else "output_tokens"
                add(providers, labels.get("gen_ai_provider_name") or None, figure, value)
            elif name in ("gen_ai_server_request_duration_seconds_sum", "gen_ai_server_request_duration_seconds_count",
                          "gen_ai_server_time_to_first_token_seconds_sum",
                          "gen_ai_server_time_to_first_token_seconds_count"):
                figure = ("ttft_" if "first_token" in name else "duration_") + name.rsplit("_", 1)[1]
                out["all"][figure] += value
                add(models, labels.get("gen_ai_request_model"), figure, value)
                add(providers, labels.get("gen_ai_provider_name") or None, figure, value)
            elif name == "gateway_refusals_total":
                reason = labels.get("reason", "")
                out["refusals"][reason] = out["refusals"].get(reason, 0.0) + value
            elif name == "gateway_response_cache_total":
                result = labels.get("result", "miss")
                out["cache"][result] = out["cache"].get(result, 0.0) + value
            elif name == "gateway_response_cache_saved_usd_total":
                out["cache"]["saved_usd"] += value
            elif name in ("gateway_usage_rows_queued", "gateway_usage_write_lag_seconds"):
                key = "rows_queued" if name.endswith("queued") else "write_lag_s"
                out["usage"][key] = max(out["usage"].get(key, 0.0), value) if key == "write_lag_s" else \
                    out["usage"].get(key, 0.0) + value
    return out


def _diff(now: dict[str, float], then: dict[str, float] | None) -> dict[str, float]:
    then = then or {}
    return {k: v - then.get(k, 0.0) for k, v in now.items()}


def _money(value: float) -> str:
    return format_money(Decimal(str(round(max(value, 0.0), 10))))


def _figures(row: dict[str, float]) -> dict[str, Any]:
    return {"requests": int(row["requests"]), "ok": int(row["ok"]), "errors": int(row["errors"]),
            "client_disconnected": int(row["client_disconnected"]), "refused": int(row["refused"]),
            "input_tokens": int(row["input_tokens"]), "output_tokens": int(row["output_tokens"]),
            "cost_usd": _money(row["cost_usd"]),
            "avg_duration_s": round(row["duration_sum"] / row["duration_count"], 4) if row["duration_count"] else None,
            "avg_ttft_s": round(row["ttft_sum"] / row["ttft_count"], 4) if row["ttft_count"] else None}


def _rate(row: dict[str, float], window: float) -> dict[str, Any]:
    w = window if window > 0 else 1.0
    return {"window_s": round(window, 1), "requests": int(row["requests"]), "errors": int(row["errors"]),
            "requests_per_s": round(row["requests"] / w, 4),
            "tokens_per_s": round((row["input_tokens"] + row["output_tokens"]) / w, 2),
            "input_tokens": int(row["input_tokens"]), "output_tokens": int(row["output_tokens"]),
            "cost_usd": _money(row["cost_usd"])}


def _baseline(history: list[tuple[float, dict[str, Any]]], now: float, window: float) -> tuple[float, Any]:
    """The newest sample at least `window` old, else the oldest one (its age is the window)."""
    chosen = None
    for at, sample in history:
        if now - at >= window:
            chosen = (at, sample)
        else:
            break
    if chosen is None and history:
        chosen = history[0]
    return chosen if chosen is not None else (now, None)


def started_at(metrics: Any) -> float:
    """When the counters started: the gunicorn master's start (multiprocess), else this process's."""
    if metrics.mp_dir:
        try:
            with open(os.path.join(metrics.mp_dir, STARTED_FILE)) as f:
                return float(f.read().strip())
        except (OSError, ValueError):
            pass
    return metrics.started_at


def summary(metrics: Any, extra: dict[str, Any] | None = None, now: float | None = None) -> dict[str, Any]:
    """The JSON document of GET /api/metrics."""
    now = time.time() if now is None else now
    current = totals(metrics.collect_counters())
    with metrics._lock:
        history = list(metrics.history)
    windows = {}
    for label, seconds in (("last_minute", 60.0), ("last_hour", 3600.0)):
        at, then = _baseline(history, now, seconds)
        windows[label] = (now - at, then)

    def rates(pick: Any) -> dict[str, Any]:
        return {label: _rate(_diff(pick(current), pick(then) if then is not None else None), window)
                for label, (window, then) in windows.items()}

    def per(kind: str) -> list[dict[str, Any]]:
        rows = []
        for name in sorted(current[kind]):
            rows.append({"name": name, **_figures(current[kind][name]),
                         **rates(lambda sample, n=name: sample[kind].get(n, _blank()))})
        return rows

    started = started_at(metrics)
    return {
        "object": "metrics.summary",
        "source": ("prometheus multiprocess registry (all workers)" if metrics.mp_dir
                   else "prometheus registry (this process)"),
        "since": datetime.fromtimestamp(started, timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z"),
        "totals": {**_figures(current["all"]), "refusals": {k: int(v) for k, v in sorted(current["refusals"].items())},
                   "cache": {"hits": int(current["cache"].get("hit", 0)),
                             "misses": int(current["cache"].get("miss", 0)),
                             "saved_usd": _money(current["cache"]["saved_usd"])}},
        **rates(lambda sample: sample["all"]),
        "models": per("models"),
        "providers": per("providers"),
        "usage_writer": {"rows_queued": int(current["usage"].get("rows_queued", 0)),
                         "write_lag_s": round(current["usage"].get("write_lag_s", 0.0), 3), **(extra or {})},
    }
