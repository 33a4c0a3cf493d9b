"""Read-only queries on a PostgreSQL streaming replica (`DATABASE_READ_URL`).

Usage reports and their CSV exports read many rows and never write: they go to the replica
when one is configured (`of(app, runtime).query(fn)`; any other read-only listing can do the
same), so that the primary keeps its capacity for the usage writes of the request path. Writes never go there: the replica's engine opens every transaction read-only
(a standby refuses writes anyway). A replica that does not answer is skipped for a few seconds
and the primary serves the reads meanwhile (logged), so reports never fail because of it.

A streaming replica is behind by the time it takes to ship and replay the WAL (milliseconds on
a LAN when it keeps up): a usage row written a moment ago may not be in a report yet. `/health`
shows the lag (`read_replica.lag_s`, `lag_bytes`).
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Any, Callable, TypeVar

from sqlalchemy import create_engine, text
from sqlalchemy.engine import Engine
from sqlalchemy.exc import SQLAlchemyError

from app.config import normalize_database_url

log = logging.getLogger("gateway.read_replica")
T = TypeVar("T")

# On the replica: seconds behind (0 when everything received is replayed; else the age of the
# last replayed transaction) and its replay position.
_REPLICA_LAG_SQL = text("""
SELECT pg_is_in_recovery() AS standby,
       CASE WHEN pg_last_wal_receive_lsn() = pg_last_wal_replay_lsn() THEN 0
            ELSE EXTRACT(EPOCH FROM now() - pg_last_xact_replay_timestamp()) END AS lag_s,
       pg_last_wal_replay_lsn()::text AS replay_lsn
""")
_BYTES_BEHIND_SQL = text("SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), CAST(:lsn AS pg_lsn))")


class ReadReplica:
    SKIP_S = 5.0   # a replica that failed is not tried again for this long

    def __init__(self, primary: Engine, url: str, pool_size: int = 5) -> None:
        self.primary = primary
        self.engine: Engine | None = None
        if url:
            self.engine = create_engine(
                normalize_database_url(url), pool_size=pool_size, max_overflow=pool_size,
                pool_timeout=10, pool_recycle=1800, pool_pre_ping=False,
                connect_args={"connect_timeout": 3, "options": "-c default_transaction_read_only=on"})
        self._skip_until = 0.0
        self.fallbacks = 0   # reads the primary served because the replica did not answer

    @property
    def configured(self) -> bool:
        return self.engine is not None

    def engine_for_reads(self) -> Engine:
        if self.engine is None or time.monotonic() < self._skip_until:
            return self.primary
        return self.engine

    def query(self, fn: Callable[[Engine], T]) -> T:
        """`fn(engine)` on the replica; on the primary when there is none or it fails."""
        engine = self.engine_for_reads()
        if engine is self.primary:
            return fn(engine)
        try:
            return fn(engine)
        except SQLAlchemyError as exc:
            self._skip_until = time.monotonic() + self.SKIP_S
            self.fallbacks += 1
            log.warning("read replica unavailable (%s): the primary serves reads for %gs",
                        type(exc).__name__, self.SKIP_S)
            return fn(self.primary)

    def status(self) -> dict[str, Any]:
        """For /health: reachable, seconds and bytes behind the primary."""
        if self.engine is None:
            return {"status": "not configured"}
        try:
            with self.engine.connect() as conn:
                row = conn.execute(_REPLICA_LAG_SQL).one()
        except SQLAlchemyError as exc:
            return {"status": "unavailable", "error": type(exc).__name__}
        report: dict[str, Any] = {"status": "ok" if row.standby else "not a standby",
                                  "lag_s": round(float(row.lag_s or 0), 3)}
        try:
            with self.primary.connect() as conn:
                report["lag_bytes"] = int(conn.execute(_BYTES_BEHIND_SQL, {"lsn": row.replay_lsn}).scalar_one())
        except SQLAlchemyError:
            report["lag_bytes"] = None
        return report

    def close(self) -> None:
        if self.engine is not None:
            self.engine.dispose()


_CREATE_LOCK = threading.Lock()


def of(app: Any, rt: Any) -> ReadReplica:
    """The read replica of one app (made on first use, kept on the Flask app with its runtime's
    primary engine)."""
    replica = app.extensions.get("read_replica")
    if replica is None:
        with _CREATE_LOCK:
            replica = app.extensions.get("read_replica")
            if replica is None:
                url = "" if rt.settings.embedded_database else rt.settings.DATABASE_READ_URL
                replica = ReadReplica(rt.engine, url)
                app.extensions["read_replica"] = replica
    return replica
