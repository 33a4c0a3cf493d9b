"""Start-up check of the database DATABASE_URL names: a server that answers but does not have
that database is a configuration error worth one clear log line (and clear 503s), not an outage.

psycopg reports a connection refused for a missing database without a SQLSTATE, so the check
asks the server's catalogue (through its `postgres` maintenance database) instead of reading
the error's text."""
from __future__ import annotations

from sqlalchemy import create_engine, text
from sqlalchemy.engine import Engine
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.pool import NullPool


def missing_database(engine: Engine) -> str | None:
    """The name of the database `engine` points at when the server answers without it; None
    when it exists, when the server cannot be asked, or for SQLite."""
    if engine.dialect.name != "postgresql":
        return None
    try:
        with engine.connect():
            return None
    except SQLAlchemyError:
        pass
    name = engine.url.database
    if not name or name == "postgres":
        return None
    maintenance = create_engine(engine.url.set(database="postgres"), poolclass=NullPool,
                                connect_args={"connect_timeout": 5})
    try:
        with maintenance.connect() as conn:
            found = conn.execute(text("SELECT 1 FROM pg_database WHERE datname = :name"), {"name": name}).first()
    except SQLAlchemyError:
        return None  # the server itself is unreachable (or has no maintenance database): an outage
    finally:
        maintenance.dispose()
    return None if found else name
