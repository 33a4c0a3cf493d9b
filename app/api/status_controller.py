"""GET /v1/uptime/<model_id> (probe an alias's deployments) and GET /v1/providers/status
(what the gateway's workers have seen of every deployment). Neither shows a base URL, a header
or a credential: deployments are named by the operator's provider name and upstream model id."""
from __future__ import annotations

from typing import Any

from flask import Response, request

from app.api.auth import authenticate, require_system_secret
from app.api.common import json_response, new_request_id
from app.errors import ModelNotFound, PermissionDenied
from app.providers.catalog import Deployment
from app.runtime import runtime
from app.services.completion import CompletionRun
from app.services.provider_health import merge_snapshots
from app.services.rate_limit_service import deployment_quota
from app.services.router import deployment_name
from app.services.uptime_service import probe_request


def uptime(model_id: str) -> Response:
    """Each probe is a completion run of the calling key (admitted, billed, recorded)."""
    rt = runtime()
    key = authenticate()
    entry = rt.providers.model(model_id)  # its deployments whose provider is configured
    if entry is None:
        raise ModelNotFound(f"The model '{model_id}' does not exist on this gateway.", param="model")
    if not key.may_use(model_id):
        raise PermissionDenied(f"This API key may not use the model '{model_id}'.", param="model",
                               code="model_not_allowed")
    new_request_id()

    def open_run(deployment: Deployment, holds_slot: bool) -> CompletionRun:
        return CompletionRun.begin(rt, key, probe_request(model_id), "uptime", deployment=deployment,
                                   hold_slot=holds_slot)

    return json_response(rt.uptime.check(entry, open_run))


def _queue(rt, dep: Deployment) -> dict[str, Any]:
    """The deployment's provider queue (requests waiting for its quota), when it has a quota."""
    quota = deployment_quota(dep)
    stats = rt.limiter.deployment_queue(quota) if quota is not None else None
    if stats is None:
        return {}
    return {"queue": {"length": stats.length, "oldest_wait_s": round(stats.oldest_wait_s, 3)}}


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
                         "aliases": aliases, **merge_snapshots(name, snapshots), **_queue(rt, dep)})
    return json_response({"object": "providers.status", "workers_reporting": len(snapshots), "data": data})
