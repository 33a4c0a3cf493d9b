"""The per-process objects of one app (provider manager, caches, writers), built in create_app.

Kept on `app.extensions["gateway"]` so that several apps (tests) never share state, and so
that code running after a response (no request context) can hold a plain reference.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import redis
from flask import Flask, current_app
from sqlalchemy.engine import Engine

from app.config import Settings
from app.providers.provider_manager import ProviderManager
from app.services.api_key_service import KeyCache, LastUsedTracker
from app.services.key_events import KeyEvents
from app.services.rate_limit_service import RateLimitService
from app.services.settlement_service import Settlement
from app.services.usage_batcher import UsageBatcher
from app.utils.clock import SYSTEM_CLOCK, Clock


@dataclass
class Runtime:
    settings: Settings
    providers: ProviderManager
    key_cache: KeyCache
    last_used: LastUsedTracker
    usage_batcher: UsageBatcher
    settlement: Settlement
    limiter: RateLimitService
    engine: Engine
    redis: Optional[redis.Redis]
    app: Flask
    key_events: Optional[KeyEvents] = None
    router: Any = None       # app.services.router.Router: candidates, retries, fallback
    health: Any = None       # app.services.provider_health.HealthBoard: breakers, outcomes
    uptime: Any = None       # app.services.uptime_service.UptimeChecker
    clock: Clock = SYSTEM_CLOCK  # every time-dependent decision reads it (tests move it)


def runtime() -> Runtime:
    return current_app.extensions["gateway"]
