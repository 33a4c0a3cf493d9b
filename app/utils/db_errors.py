"""Database errors told apart by their SQLSTATE code, never by their message text (messages
change between PostgreSQL versions and locales; codes do not).

psycopg 3 puts the server's code on the DBAPI exception as `sqlstate` (psycopg2: `pgcode`);
SQLAlchemy wraps that exception and keeps it as `.orig`. An error raised before the server
said anything (connection refused, reset, timed out) has no code: psycopg raises it as
`OperationalError` / `InterfaceError`, which count as "unreachable" too.
"""
from __future__ import annotations

from sqlalchemy.exc import DataError, DBAPIError, IntegrityError, SQLAlchemyError
from sqlalchemy.exc import TimeoutError as PoolTimeout

# SQLSTATE codes (PostgreSQL manual, appendix A "PostgreSQL Error Codes").
CHECK_VIOLATION = "23514"      # also: a row of a partitioned table that fits no partition
DUPLICATE_TABLE = "42P07"
UNIQUE_VIOLATION = "23505"
SERIALIZATION_FAILURE = "40001"
DEADLOCK_DETECTED = "40P01"
_TRANSIENT_CODES = frozenset({
    SERIALIZATION_FAILURE, DEADLOCK_DETECTED,
    "57P01",  # admin_shutdown (server stopping, backend terminated)
    "57P02",  # crash_shutdown
    "57P03",  # cannot_connect_now (starting up, recovering)
    "57014",  # query_canceled (statement_timeout)
    "55P03",  # lock_not_available (lock_timeout)
    "53300",  # too_many_connections
    "53000",  # insufficient_resources
})
_TRANSIENT_CLASSES = ("08",)     # connection exceptions
_PERMANENT_CLASSES = ("22", "23")  # data exceptions, integrity constraint violations


def sqlstate(exc: BaseException) -> str | None:
    """The SQLSTATE of a database error (SQLAlchemy-wrapped or raw DBAPI), None if it has none."""
    orig = exc.orig if isinstance(exc, DBAPIError) else exc
    code = getattr(orig, "sqlstate", None) or getattr(orig, "pgcode", None)
    return code if isinstance(code, str) else None


def is_unreachable(exc: BaseException) -> bool:
    """The database cannot serve now (down, restarting, overloaded, connection lost, a
    serialization conflict): the same statement may succeed later."""
    if not isinstance(exc, SQLAlchemyError):
        return False
    code = sqlstate(exc)
    if code is None:
        # No answer from the server: a connection that failed or was cut, or SQLAlchemy's pool
        # timing out. Programming errors of ours (ArgumentError, ...) are not DBAPI errors.
        if isinstance(exc, DBAPIError):
            return exc.connection_invalidated or type(exc.orig).__name__ in ("OperationalError",
                                                                             "InterfaceError")
        return isinstance(exc, PoolTimeout)
    return code in _TRANSIENT_CODES or code.startswith(_TRANSIENT_CLASSES)


def is_no_partition(exc: BaseException) -> bool:
    """An insert into a partitioned table whose row has no partition (PostgreSQL reports it as
    check_violation; the usage table has no CHECK constraint of its own)."""
    return sqlstate(exc) == CHECK_VIOLATION


def is_permanent(exc: BaseException) -> bool:
    """A statement that fails the same way however often it is retried (the data is bad).
    SQLite (embedded mode) has no SQLSTATE: there the exception's class says it."""
    code = sqlstate(exc)
    if code is None:
        return isinstance(exc, (IntegrityError, DataError))
    return code.startswith(_PERMANENT_CLASSES) and code != CHECK_VIOLATION


def is_already_exists(exc: BaseException) -> bool:
    """CREATE of an object that exists (or that a concurrent CREATE just made: the catalogue's
    unique index reports that race as unique_violation)."""
    return sqlstate(exc) in (DUPLICATE_TABLE, UNIQUE_VIOLATION)
