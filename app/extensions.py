"""Shared extension objects, bound to the app in `create_app` (nothing here needs config at import)."""
from __future__ import annotations

from typing import Optional

import redis
from flask_cors import CORS
from flask_sqlalchemy import SQLAlchemy
from sqlalchemy.orm import DeclarativeBase


class Base(DeclarativeBase):
    pass


db = SQLAlchemy(model_class=Base)
cors = CORS()


def make_redis(url: str, max_connections: int) -> Optional[redis.Redis]:
    """A client with a *blocking* pool sized to the worker's concurrency (see docs/traps.md)."""
    if not url:
        return None
    pool = redis.BlockingConnectionPool.from_url(
        url, max_connections=max_connections, timeout=5,
        socket_connect_timeout=2, socket_timeout=5, health_check_interval=30)
    return redis.Redis(connection_pool=pool)
