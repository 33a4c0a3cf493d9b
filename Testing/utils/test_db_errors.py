"""Database errors are told apart by SQLSTATE, from errors the real PostgreSQL raises (and a
connection to a port where nothing listens): the outage classes are "unreachable", bad data is
"permanent", a row without a partition and a concurrent CREATE are recognised; the messages
play no part (they are replaced here to prove it)."""
from __future__ import annotations

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.exc import DBAPIError, SQLAlchemyError

from app.utils import db_errors
from Testing.support import free_port


def raised(engine, sql: str) -> DBAPIError:
    with pytest.raises(DBAPIError) as info:
        with engine.begin() as conn:
            conn.execute(text(sql))
    exc = info.value
    exc.orig.args = ("a message that says nothing",)  # classification must not read it
    return exc


@pytest.fixture(scope="module")
def engine(pg_url):
    eng = create_engine(pg_url)
    yield eng
    eng.dispose()


def test_bad_data_is_permanent_not_unreachable(engine):
    exc = raised(engine, "SELECT 1/0")
    assert db_errors.sqlstate(exc) == "22012"
    assert db_errors.is_permanent(exc) and not db_errors.is_unreachable(exc)


def test_a_terminated_backend_is_unreachable(engine):
    exc = raised(engine, "SELECT pg_terminate_backend(pg_backend_pid())")
    assert db_errors.sqlstate(exc) == "57P01"
    assert db_errors.is_unreachable(exc) and not db_errors.is_permanent(exc)


def test_a_refused_connection_is_unreachable():
    eng = create_engine(f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/x",
                        connect_args={"connect_timeout": 2})
    try:
        with pytest.raises(SQLAlchemyError) as info:
            eng.connect()
    finally:
        eng.dispose()
    assert db_errors.sqlstate(info.value) is None
    assert db_errors.is_unreachable(info.value) and not db_errors.is_permanent(info.value)


def test_a_row_without_partition_and_an_existing_table_are_recognised(engine, clean_db):
    exc = raised(engine, "INSERT INTO usage_records (request_id, tenant_id, api_key_id, model, status, "
                         "created_at) VALUES ('x', 1, 1, 'm', 'ok', '1999-01-01T00:00:00Z')")
    assert db_errors.is_no_partition(exc) and not db_errors.is_permanent(exc)
    exc = raised(engine, "CREATE TABLE usage_daily (x int)")
    assert db_errors.is_already_exists(exc) and not db_errors.is_unreachable(exc)
