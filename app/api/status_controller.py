"""GET /v1/uptime/<model_id> (probe an alias's deployments) and GET /v1/providers/status
(what the gateway's workers have seen of every deployment). Neither shows a base URL, a header
or a credential: deployments are named by the operator's provider name and upstream model id."""
from __future__ import annotations

import time
from dataclasses import replace
from typing import Any

from flask import Response, request

from app.api.admission import admit_or_raise
from app.api.auth import authenticate, require_system_secret
from app.api.common import json_response, new_request_id
from app.errors import ModelNotFound, PermissionDenied
from app.runtime import runtime
from app.services.provider_health import merge_snapshots
from app.services.rate_limit_service import KeyLimits, key_limits, to_nano
from app.services.router import deployment_name
from app.services.settlement_service import CompletionTrace
from app.services.uptime_service import PROBE_MESSAGES, ProbeResult
from app.utils.token_counter import count_messages


def uptime(model_id: str) -> Response:
    rt = runtime()
    key = authenticate()
    entry = rt.providers.model(model_id)
    if entry is None:
        raise ModelNotFound(f"The model '{model_id}' does not exist on this gateway.", param="model")
    if not key.may_use(model_id):
        raise PermissionDenied(f"This API key may not use the model '{model_id}'.", param="model",
                               code="model_not_allowed")
    new_request_id()
    traces: dict[int, CompletionTrace] = {}

    def admit(results: list[ProbeResult]) -> None:
        """Before a probe round goes out: each probe is a completion of the calling key, so it
        counts against the key's rpm, tpm, daily tokens and budgets (key and tenant) like any
        other; the round holds one concurrency slot (it is one client request). A refusal
        cancels the whole round (releasing what was reserved) and answers like a refused
        completion."""
        limits = key_limits(key)
        try:
            for i, result in enumerate(results):
                trace = CompletionTrace(request_id=new_request_id(), key=key, entry=entry,
                                        deployment=result.deployment, request=result.request, streamed=True)
                traces[id(result)] = trace
                if limits.any:
                    _admit_probe(rt, trace, limits if i == 0 else replace(limits, max_concurrent=0))
        except BaseException:
            for trace in traces.values():
                trace.status = "error"  # never sent: releases its reservation at zero cost
                rt.settlement.settle(trace, record=False)
            raise

    def record(result: ProbeResult) -> None:
        """A probe is billed and recorded like any other (streamed, one output token)."""
        trace = traces[id(result)]
        trace.started = time.perf_counter() - result.latency_ms / 1000
        if result.ttft_ms is not None:
            trace.first_byte_at = trace.started + result.ttft_ms / 1000
        trace.usage, trace.chunks = result.usage, result.chunks
        if not result.ok:
            trace.status = "error"
            trace.error_type = result.error.kind if result.error else "internal"
        rt.settlement.settle(trace)

    return json_response(rt.uptime.check(entry, record, admit))


def _admit_probe(rt: Any, trace: CompletionTrace, limits: KeyLimits) -> None:
    """Reserve one probe on the key's limits: the probe prompt's tokens plus its one output token."""
    trace.prompt_estimate = count_messages(PROBE_MESSAGES, trace.entry.tokenizer)
    tokens = trace.prompt_estimate + 1
    cost = to_nano(trace.entry.pricing.cost(trace.prompt_estimate, 1)) if limits.needs_tokens else 0
    trace.admission = admit_or_raise(rt.limiter, limits, trace.request_id,
                                     tokens if limits.needs_tokens else 0, cost)


def providers_status() -> Response:
    """System secret or any valid key (the report holds no tenant data and no secrets)."""
    rt = runtime()
    if request.headers.get("X-System-Secret"):
        require_system_secret()
    else:
        authenticate()
    interval = rt.settings.HEALTH_PUBLISH_INTERVAL_S
    snapshots = rt.health.fleet_snapshots(max_age_s=max(30.0, interval * 10))
    data: list[dict[str, Any]] = []
    seen: set[str] = set()
    for alias, entry in rt.providers.catalog.models.items():
        for dep in entry.deployments:
            name = deployment_name(dep)
            if name in seen:
                continue
            seen.add(name)
            aliases = [a for a, e in rt.providers.catalog.models.items()
                       if any(deployment_name(d) == name for d in e.deployments)]
            data.append({"deployment": name, "provider": dep.provider, "model": dep.model,
                         "aliases": aliases, **merge_snapshots(name, snapshots)})
    return json_response({"object": "providers.status", "workers_reporting": len(snapshots), "data": data})
