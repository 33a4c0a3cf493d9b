"""A key's own view of its limits and how much of each is left (`GET /v1/key`).

Read only: the limiter's counters are read (`RateLimitService.headroom`), never reserved, so
looking at a key costs it nothing. The day and month figures are the limiter's counters when it
holds them (what admission compares against; they include reservations of requests still
running), otherwise the usage store's totals (a key without that limit, a new period, or a
Redis that lost its data).
"""
from __future__ import annotations

from datetime import datetime, timedelta, timezone
from decimal import Decimal
from typing import Any, Callable

from app.services.api_key_service import KeyInfo, iso
from app.services.rate_limit_service import NANO, Headroom, RateLimitService, day_and_month, key_limits
from app.utils.money import format_money

# (key id, tenant id, day, month) -> {"day": tokens, "key_spend": nano, "tenant_spend": nano}
PeriodTotals = Callable[[int, int, int, str], dict[str, int]]


def _usd(nano: int) -> str:
    return format_money(Decimal(nano) / NANO)


def _period_bounds(day: int) -> tuple[datetime, datetime]:
    """The next UTC midnight and the first instant of next month, after UTC day `day`."""
    today = datetime(1970, 1, 1, tzinfo=timezone.utc) + timedelta(days=day)
    month_start = today.replace(day=1)
    return today + timedelta(days=1), (month_start + timedelta(days=32)).replace(day=1)


def _rate(limit: int | None, left: int | None, reset_ms: int | None) -> dict[str, Any]:
    if not limit:
        return {"limit": None, "remaining": None, "reset_ms": None}
    return {"limit": limit, "remaining": left, "reset_ms": reset_ms}


def _budget(limit: Decimal | None, used_nano: int, resets_at: datetime) -> dict[str, Any]:
    used = Decimal(used_nano) / NANO
    return {"limit_usd": format_money(limit) if limit is not None else None, "used_usd": _usd(used_nano),
            "remaining_usd": format_money(max(Decimal(0), limit - used)) if limit is not None else None,
            "resets_at": iso(resets_at)}


def headroom(key: KeyInfo, limiter: RateLimitService, period_totals: PeriodTotals, now: datetime) -> dict[str, Any]:
    """The `headroom` object of `GET /v1/key` (see docs/console.md for each field). `now` names
    the day and month when the limiter cannot (it is down); otherwise the limiter's clock does."""
    limits = key_limits(key)
    room: Headroom | None = limiter.headroom(limits)
    day, month = (room.day, room.month) if room is not None else day_and_month(int(now.timestamp() * 1_000_000))
    counters = {"day": room.day_tokens if room else None,
                "key_spend": room.key_spend_nano if room else None,
                "tenant_spend": room.tenant_spend_nano if room else None}
    if any(value is None for value in counters.values()):
        stored = period_totals(key.id, key.tenant_id, day, month)
        counters = {name: stored[name] if value is None else value for name, value in counters.items()}
    tomorrow, next_month = _period_bounds(day)
    daily, concurrency = key.daily_token_limit, key.max_concurrent
    # Leases are kept only for a key with a concurrency limit: without one nothing counts them.
    in_flight = room.in_flight if room is not None and concurrency else None
    return {
        "limiter_available": room is not None,
        "requests_this_minute": _rate(key.rpm_limit, room and room.rpm_left, room and room.rpm_reset_ms),
        "tokens_this_minute": _rate(key.tpm_limit, room and room.tpm_left, room and room.tpm_reset_ms),
        "tokens_today": {"limit": daily, "used": counters["day"],
                         "remaining": max(0, daily - counters["day"]) if daily else None,
                         "resets_at": iso(tomorrow)},
        "concurrent_requests": {"limit": concurrency, "in_use": in_flight,
                                "remaining": max(0, concurrency - in_flight) if in_flight is not None else None},
        "budget_this_month": _budget(key.budget_usd, counters["key_spend"], next_month),
        "tenant_budget_this_month": _budget(key.tenant_budget_usd, counters["tenant_spend"], next_month),
    }
