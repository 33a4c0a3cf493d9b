"""Scheduled upkeep of the usage store, run exactly once per period across every replica.

`db_manager.py maintain` creates the usage partitions ahead (USAGE_PARTITIONS_AHEAD months) and,
when USAGE_RETENTION_DAYS is set, prunes older usage; when RESPONSES_RETENTION_DAYS is set, it
also deletes older stored Responses API answers. Any number of schedulers (the compose
`maintenance` service, a cron line on every host, several of both) may run it: a run first takes
a Redis lock for the period (`SET NX PX`), so one of them does the work and the others say they
skipped. A run that fails gives the lock back so that the next attempt, anywhere, retries.
Without Redis there is nothing to share a lock with: it just runs.
"""
from __future__ import annotations

import logging
import secrets
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

from sqlalchemy.engine import Engine

from app.services import usage_partitions
from app.services.response_store import ResponseStore

log = logging.getLogger("gateway.maintenance")

LOCK_KEY = "gw:{maintenance}:lock"
# Delete the lock only if it is still ours (it may have expired and been taken since).
_RELEASE_LUA = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0"


@dataclass
class MaintenanceRun:
    ran: bool
    partitions_created: list[str] = field(default_factory=list)
    pruned: dict[str, int] | None = None
    responses_pruned: int | None = None

    def summary(self) -> str:
        if not self.ran:
            return "maintenance skipped: another scheduler ran it this period (Redis lock held)"
        text = f"maintenance done: {len(self.partitions_created)} partition(s) created"
        if self.partitions_created:
            text += f" ({', '.join(self.partitions_created)})"
        if self.pruned is not None:
            text += (f"; pruned {self.pruned['partitions_dropped']} partition(s), "
                     f"{self.pruned['rows_deleted']} row(s), {self.pruned['rollup_rows_deleted']} rollup row(s)")
        if self.responses_pruned is not None:
            text += f"; {self.responses_pruned} stored response(s) deleted"
        return text


def take_lock(client: Any, period_s: float) -> str | None:
    """The lock for this period, or None when another scheduler holds it."""
    token = secrets.token_hex(8)
    return token if client.set(LOCK_KEY, token, nx=True, px=int(period_s * 1000)) else None


def give_back(client: Any, token: str) -> None:
    client.eval(_RELEASE_LUA, 1, LOCK_KEY, token)


def upkeep(engine: Engine, months_ahead: int, retention_days: int,
           now: datetime | None = None, responses_retention_days: int = 0) -> MaintenanceRun:
    """Partitions ahead, then retention (when set): the work itself, no lock."""
    now = now or datetime.now(timezone.utc)
    run = MaintenanceRun(ran=True, partitions_created=usage_partitions.ensure_ahead(engine, months_ahead, now))
    midnight = now.replace(hour=0, minute=0, second=0, microsecond=0)
    if retention_days > 0:
        run.pruned = usage_partitions.prune(engine, midnight - timedelta(days=retention_days))
    if responses_retention_days > 0:
        run.responses_pruned = ResponseStore(engine).prune(midnight - timedelta(days=responses_retention_days))
    return run


def run_once(engine: Engine, client: Any, period_s: float, months_ahead: int,
             retention_days: int, responses_retention_days: int = 0) -> MaintenanceRun:
    """Do the upkeep unless another scheduler did it this period."""
    token = take_lock(client, period_s) if client is not None else "no-redis"
    if token is None:
        return MaintenanceRun(ran=False)
    try:
        return upkeep(engine, months_ahead, retention_days, responses_retention_days=responses_retention_days)
    except BaseException:
        if client is not None:
            give_back(client, token)
        raise
