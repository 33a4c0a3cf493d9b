"""The usage outbox and the usage store, in-process against the real PostgreSQL and Redis:
rows PostgreSQL cannot take go to the Redis list (or, Redis down too, to an fsync'ed spool
file) and are replayed exactly once; replays are idempotent; the daily rollup plus raw edge
rows equal the raw sums for any period; a bad record does not block its batch."""
from __future__ import annotations

import random
import threading
import uuid
from datetime import datetime, timedelta, timezone
from decimal import Decimal

import pytest
import redis
from sqlalchemy import create_engine, text

from app.extensions import make_redis
from app.services.usage_batcher import (DEAD_LETTER_FILE, WRITER_APPLICATION_NAME, UsageBatcher,
                                        dedicated_engine)
from app.services.usage_outbox import RedisOutbox, SpoolOutbox, outbox_key
from app.services.usage_service import UsageEvent, UsageQuery, UsageWriter, query_usage
from Testing.support import REDIS_URL, free_port, wait_until

pytestmark = pytest.mark.timeout(90)
UTC = timezone.utc


def events(n: int, at: datetime | None = None, key: int = 1, tenant: int = 1, model: str = "m") -> list[UsageEvent]:
    at = at or datetime.now(UTC)
    return [UsageEvent(request_id="req_" + uuid.uuid4().hex, tenant_id=tenant, api_key_id=key, model=model,
                       prompt_tokens=3, completion_tokens=4, cost_usd=Decimal("0.0000021"),
                       created_at=at + timedelta(microseconds=i)) for i in range(n)]


def counts(engine) -> tuple[int, int, int]:
    """(raw rows, distinct request ids, requests summed in the rollup)."""
    with engine.connect() as conn:
        raw, distinct = conn.execute(text("SELECT count(*), count(DISTINCT request_id) FROM usage_records")).one()
        rolled = conn.execute(text("SELECT coalesce(sum(requests), 0) FROM usage_daily")).scalar()
    return raw, distinct, int(rolled)


@pytest.fixture
def name() -> str:
    """An outbox of this test's own (no other gateway of the test run replays it)."""
    return "usage-" + uuid.uuid4().hex[:8]


@pytest.fixture
def rclient(clean_db):
    client = redis.Redis.from_url(REDIS_URL)
    yield client
    client.close()


@pytest.fixture(params=["redis", "cluster"])
def any_redis(request, clean_db):
    """The shared Redis, or a real 3-master Redis Cluster: the outbox's scripts and
    transactions work on both (its keys share the outbox name's hash tag)."""
    client = make_redis(request.getfixturevalue("redis_cluster").url, 8) if request.param == "cluster" \
        else redis.Redis.from_url(REDIS_URL)
    yield client
    client.close()


def test_replaying_the_same_redis_outbox_twice_writes_nothing_the_second_time(clean_db, any_redis, name):
    """Every line of the Redis outbox is written once; the same lines pushed and replayed again
    add no row and nothing to the rollup; the outbox is empty afterwards."""
    lines = [e.to_json() for e in events(40)]
    outbox = RedisOutbox(any_redis, name)
    batcher = UsageBatcher(UsageWriter(clean_db), redis_outbox=outbox)
    outbox.push(lines)
    assert batcher.replay_outbox() == {"records": 40, "new_rows": 40}
    assert counts(clean_db) == (40, 40, 40)
    outbox.push(lines)
    assert batcher.replay_outbox() == {"records": 40, "new_rows": 0}
    assert counts(clean_db) == (40, 40, 40)
    assert any_redis.llen(outbox_key(name)) == 0


def test_replaying_the_same_spool_file_twice_writes_nothing_the_second_time(clean_db, tmp_path):
    """A spool file is replayed and deleted; the same records spooled and replayed again add
    nothing."""
    lines = [e.to_json() for e in events(25)]
    for expected_new in (25, 0):
        dead_worker = SpoolOutbox(tmp_path)
        dead_worker.append(lines[:10])
        dead_worker.append(lines[10:])
        dead_worker.close()
        assert (tmp_path.glob("*.spool").__next__()).read_bytes().count(b"\n") == 25
        batcher = UsageBatcher(UsageWriter(clean_db), spool=SpoolOutbox(tmp_path))
        assert batcher.replay_outbox() == {"records": 25, "new_rows": expected_new}
        assert list(tmp_path.glob("*.spool")) == []
        assert counts(clean_db) == (25, 25, 25)


def test_spool_file_of_a_live_writer_is_left_alone(clean_db, tmp_path):
    """A spool file whose writer is alive (holds its lock) is not replayed by others; once the
    writer seals it (or dies) it is."""
    live = SpoolOutbox(tmp_path)
    live.append([e.to_json() for e in events(5)])
    other = UsageBatcher(UsageWriter(clean_db), spool=SpoolOutbox(tmp_path))
    assert other.replay_outbox()["records"] == 0
    assert counts(clean_db)[0] == 0
    live.seal()
    assert other.replay_outbox() == {"records": 5, "new_rows": 5}


def test_a_row_submitted_after_close_is_stored_before_submit_returns(clean_db):
    """Once the writer is closed nobody takes rows from the queue: a completion settled after
    `close()` (a request the server let finish late) is stored by `submit` itself, not left in
    memory to die with the process."""
    batcher = UsageBatcher(UsageWriter(clean_db))
    batcher.start(flusher=False)
    early, late = events(3), events(2)
    for event in early:
        batcher.submit(event)
    assert batcher.close() is True
    assert counts(clean_db) == (3, 3, 3)
    for event in late:
        batcher.submit(event)
    assert counts(clean_db) == (5, 5, 5) and batcher.depth == 0


class CountingWriter(UsageWriter):
    """The real writer, recording the size of every batch it is given."""

    def __init__(self, engine) -> None:
        super().__init__(engine)
        self.batches: list[int] = []

    def write(self, batch):
        self.batches.append(len(batch))
        return super().write(batch)


def test_rows_arriving_while_the_writer_lingers_share_one_statement(clean_db):
    """Once woken by a row, the writer waits (here up to 60 s, longer than the test) for more
    rows to join the batch; flush() cuts the wait short: five rows submitted one after the
    other are written as one batch of five, stored at once."""
    writer = CountingWriter(clean_db)
    batcher = UsageBatcher(writer, linger_s=60)
    batcher.start(flusher=False)
    try:
        for event in events(5):
            batcher.submit(event)
        assert batcher.flush() is True
        assert writer.batches == [5] and counts(clean_db) == (5, 5, 5)
    finally:
        batcher.close()


class GatedWriter(CountingWriter):
    """Holds its first batch until `release` is set; `first_done` tells when it is stored."""

    def __init__(self, engine) -> None:
        super().__init__(engine)
        self.writing, self.release, self.first_done = threading.Event(), threading.Event(), threading.Event()

    def write(self, batch):
        if not self.batches:
            self.writing.set()
            self.release.wait(30)
            try:
                return super().write(batch)
            finally:
                self.first_done.set()
        return super().write(batch)


def test_rows_arriving_while_a_batch_is_written_wait_for_the_next_linger(clean_db):
    """Rows queued while a batch is being written linger too, before the next batch, instead of
    being written at once: under a steady load the writer made batches of one or two rows (a
    round trip each). Here two rows arrive during the first write and two after it; with a
    60 s linger all four wait and flush() writes them as one batch."""
    writer = GatedWriter(clean_db)
    batcher = UsageBatcher(writer, linger_s=0)   # the first batch (of one row) starts at once
    batcher.start(flusher=False)
    rows = events(5)
    try:
        batcher.submit(rows[0])
        assert writer.writing.wait(30)
        batcher.linger_s = 60
        batcher.submit(rows[1])
        batcher.submit(rows[2])
        writer.release.set()
        assert writer.first_done.wait(30)
        batcher.submit(rows[3])
        batcher.submit(rows[4])
        assert batcher.flush() is True
        assert writer.batches == [1, 4] and counts(clean_db) == (5, 5, 5)
    finally:
        writer.release.set()
        batcher.close()


class Cut(BaseException):
    """What a killed greenlet raises inside a statement (not a database error)."""


def test_writer_drops_its_connection_when_a_write_is_cut_short(clean_db):
    """The writer keeps one connection for its batches. A write cut short by something that is
    not a database error (its greenlet killed mid-statement) leaves that connection in an
    unknown state: the writer drops it, and the next batch is written on a new one."""
    writer = UsageWriter(dedicated_engine(str(clean_db.url.render_as_string(hide_password=False)), 2.0))
    try:
        assert writer.write(events(2)) == 2
        kept = writer._held.driver_connection

        def cut(*_a, **_k):
            raise Cut()
        kept.execute = cut
        with pytest.raises(Cut):
            writer.write(events(1))
        assert kept.closed
        assert writer.write(events(3)) == 3
        assert counts(clean_db) == (5, 5, 5)
    finally:
        writer.close()
        writer.engine.dispose()


def test_database_down_rows_go_to_redis_and_are_replayed_exactly_once(pg_url, clean_db, rclient, pg_proxy, name):
    """PostgreSQL unreachable: submitted rows land in the Redis outbox (none held in memory),
    the batcher stops trying PostgreSQL until a probe answers, then replays them all once."""
    engine = dedicated_engine(pg_proxy.url, 2.0)
    batcher = UsageBatcher(UsageWriter(engine), redis_outbox=RedisOutbox(rclient, name), poll_s=0.1)
    batcher.start()  # the writer and the outbox flusher
    try:
        for e in events(5):
            batcher.submit(e)
        assert batcher.flush(10)
        wait_until(lambda: counts(clean_db)[0] == 5, message="rows written while up")
        pg_proxy.cut()
        outage = events(30)
        for e in outage:
            batcher.submit(e)
        assert batcher.flush(15)
        assert batcher.database_down
        assert rclient.llen(outbox_key(name)) == 30
        assert batcher.outbox_depth()["redis"] == 30
        assert counts(clean_db)[0] == 5
        pg_proxy.restore()
        wait_until(lambda: counts(clean_db) == (35, 35, 35), timeout=15, message="the outbox replayed")
        wait_until(lambda: batcher.replayed == 30 and rclient.llen(outbox_key(name)) == 0, message="replay acked")
        assert not batcher.database_down and counts(clean_db) == (35, 35, 35)
    finally:
        batcher.close(5)
        engine.dispose()


def test_writer_connections_killed_rows_replayed_exactly_once(pg_url, clean_db, rclient, name):
    """The writer's PostgreSQL connections terminated (pg_terminate_backend, this test
    database's writer connections only): the write that finds its connection dead is tried
    once more on a new one, so nothing goes to the outbox; every row once, and the writer does
    not consider the database down."""
    engine = dedicated_engine(pg_url, 2.0)
    batcher = UsageBatcher(UsageWriter(engine), redis_outbox=RedisOutbox(rclient, name), poll_s=0.1)
    batcher.start()  # the writer and the outbox flusher
    try:
        for e in events(5):
            batcher.submit(e)
        assert batcher.flush(10)
        with clean_db.connect() as conn:
            killed = conn.execute(text(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE datname = current_database() "
                "AND application_name = :a"), {"a": WRITER_APPLICATION_NAME}).scalar()
        assert killed >= 1
        for e in events(20):
            batcher.submit(e)
        assert batcher.flush(10)
        wait_until(lambda: counts(clean_db) == (25, 25, 25) and rclient.llen(outbox_key(name)) == 0,
                   timeout=15, message="all rows once")
        assert not batcher.database_down
        assert (batcher.failures, batcher.diverted) == (0, 0)
    finally:
        batcher.close(5)
        engine.dispose()


def test_database_and_redis_down_rows_go_to_the_fsynced_spool(pg_url, clean_db, tmp_path, pg_proxy):
    """PostgreSQL and Redis both unreachable: the rows are appended to the local spool file;
    with PostgreSQL back they are replayed once and the file is deleted."""
    engine = dedicated_engine(pg_proxy.url, 2.0)
    dead_redis = redis.Redis(port=free_port(), socket_connect_timeout=0.5)
    batcher = UsageBatcher(UsageWriter(engine), redis_outbox=RedisOutbox(dead_redis, "usage-dead"),
                           spool=SpoolOutbox(tmp_path), poll_s=0.1)
    batcher.start()  # the writer and the outbox flusher
    try:
        pg_proxy.cut()
        batch = events(12)
        for e in batch:
            batcher.submit(e)
        assert batcher.flush(15)
        spooled = b"".join(p.read_bytes() for p in tmp_path.glob("*.spool"))
        assert sorted(UsageEvent.from_json(line).request_id for line in spooled.splitlines()) == \
            sorted(e.request_id for e in batch)
        assert batcher.outbox_depth()["redis"] is None and batcher.outbox_depth()["spool_files"] == 1
        pg_proxy.restore()
        wait_until(lambda: counts(clean_db) == (12, 12, 12), timeout=15, message="the spool replayed")
        wait_until(lambda: list(tmp_path.glob("*.spool")) == [], message="the spool file deleted")
    finally:
        batcher.close(5)
        engine.dispose()


def test_claim_of_a_dead_replayer_returns_to_the_outbox_after_its_lease(clean_db, any_redis, name):
    """Lines claimed by a replayer that died before committing are claimed again by another
    once the lease expired, so they are not lost."""
    lines = [e.to_json() for e in events(7)]
    dead = RedisOutbox(any_redis, name, consumer="dead", lease_ms=100)
    dead.push(lines)
    assert len(dead.claim(100)) == 7
    assert any_redis.llen(outbox_key(name)) == 0
    alive = RedisOutbox(any_redis, name, consumer="alive")
    assert alive.claim(100) == []  # lease still running
    wait_until(lambda: len(alive.claim(100)) == 7, timeout=3, message="the expired claim taken over")
    batcher = UsageBatcher(UsageWriter(clean_db), redis_outbox=alive)
    assert batcher.replay_outbox()["new_rows"] == 7


def test_a_record_the_database_rejects_does_not_block_its_batch(clean_db, tmp_path):
    """A record PostgreSQL refuses for good (a model name too long for its column) is set aside
    in the dead-letter file; the other rows of its batch are written."""
    good = events(4)
    bad = events(1, model="x" * 300)[0]
    batcher = UsageBatcher(UsageWriter(clean_db), spool=SpoolOutbox(tmp_path))
    for e in good[:2] + [bad] + good[2:]:
        batcher.submit(e)
    assert batcher.flush(10)
    assert counts(clean_db) == (4, 4, 4)
    assert batcher.dead_letters == 1
    assert UsageEvent.from_json((tmp_path / DEAD_LETTER_FILE).read_bytes().strip()).request_id == bad.request_id
    batcher.close(2)


# --- rollup + edges -----------------------------------------------------------------------------

FIELDS = ("requests", "prompt_tokens", "completion_tokens", "total_tokens", "cost_usd")


def raw_sums(engine, start: datetime, end: datetime, group: str | None, **where) -> dict:
    expr = {"model": "model", "day": "to_char(created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD')",
            "key": "api_key_id", "tenant": "tenant_id", None: "NULL"}[group]
    cond = " ".join(f"AND {c} = :{c}" for c in where)
    with engine.connect() as conn:
        rows = conn.execute(text(
            f"SELECT {expr} AS g, count(*), sum(prompt_tokens), sum(completion_tokens), sum(total_tokens), "
            f"sum(cost_usd) FROM usage_records WHERE created_at >= :s AND created_at < :e {cond} GROUP BY 1"),
            {"s": start, "e": end, **where}).all()
    return {r[0]: (int(r[1]), int(r[2]), int(r[3]), int(r[4]), Decimal(r[5])) for r in rows}


GROUP_FIELD = {"model": "model", "day": "day", "key": "api_key_id", "tenant": "tenant_id"}


def api_sums(body: dict, group: str | None) -> dict:
    groups = body["data"] if group else ([body] if body["requests"] else [])
    return {(g[GROUP_FIELD[group]] if group else None): tuple(Decimal(g[f]) if f == "cost_usd" else g[f] for f in FIELDS)
            for g in groups}


def test_rollup_plus_edges_equal_raw_sums_across_partition_boundaries(clean_db):
    """For random periods (whole days, partial edges, month and year boundaries, instants given
    in other time zones), totals and every grouping read from the rollup + raw edges equal the
    sums of the raw rows, with exact money."""
    rnd = random.Random(7)
    writer = UsageWriter(clean_db)
    boundaries = [datetime(2025, 12, 31, 23, 59, 59, 999999, tzinfo=UTC), datetime(2026, 1, 1, tzinfo=UTC),
                  datetime(2026, 1, 31, 23, 59, 59, tzinfo=UTC), datetime(2026, 2, 1, tzinfo=UTC),
                  datetime(2026, 3, 1, 0, 0, 0, 1, tzinfo=UTC)]
    base = datetime(2025, 12, 20, tzinfo=UTC)
    evs = []
    for i in range(600):
        at = boundaries[i % 5] if i < 50 else base + timedelta(seconds=rnd.randrange(80 * 86400))
        evs.append(UsageEvent(request_id=f"req_{i}", tenant_id=1 + i % 3, api_key_id=1 + i % 7,
                              model=rnd.choice(["a", "b", "c"]), prompt_tokens=rnd.randrange(1000),
                              completion_tokens=rnd.randrange(500),
                              cost_usd=Decimal(rnd.randrange(10**6)) / 10**10, created_at=at))
    for i in range(0, len(evs), 97):
        writer.write(evs[i:i + 97])
    writer.write(evs[:200])  # a replay: changes nothing
    zones = [UTC, timezone(timedelta(hours=14)), timezone(timedelta(hours=-9, minutes=-30))]
    periods = [(datetime(2025, 12, 1, tzinfo=UTC), datetime(2026, 4, 1, tzinfo=UTC)),
               (datetime(2026, 1, 1, tzinfo=UTC), datetime(2026, 2, 1, tzinfo=UTC)),
               (boundaries[0], boundaries[3]), (boundaries[1], boundaries[1] + timedelta(microseconds=1))]
    for _ in range(25):
        s = base + timedelta(seconds=rnd.randrange(80 * 86400))
        periods.append((s.astimezone(rnd.choice(zones)), (s + timedelta(seconds=rnd.randrange(1, 40 * 86400)))
                        .astimezone(rnd.choice(zones))))
    for start, end in periods:
        for group in (None, "model", "day", "key", "tenant"):
            for where in ({}, {"api_key_id": 3}, {"tenant_id": 2}):
                q = UsageQuery(start=start, end=end, group_by=group, **where)
                got = api_sums(query_usage(clean_db, q), group)
                want = raw_sums(clean_db, start, end, group, **where)
                assert got == want, (start, end, group, where)


def test_sqlite_store_keeps_the_rollup_too(tmp_path):
    """Embedded mode: the plain SQLite table, the same idempotent writes and rollup reads."""
    import db_manager
    url = f"sqlite:///{tmp_path}/u.db"
    db_manager.upgrade(url)
    engine = create_engine(url)
    try:
        writer = UsageWriter(engine)
        batch = events(10, at=datetime(2026, 1, 31, 20, tzinfo=UTC)) + \
            events(5, at=datetime(2026, 2, 1, 1, tzinfo=UTC))
        assert writer.write(batch) == 15 and writer.write(batch) == 0
        body = query_usage(engine, UsageQuery(datetime(2026, 1, 1, tzinfo=UTC), datetime(2026, 3, 1, tzinfo=UTC),
                                              api_key_id=1, group_by="day"))
        assert [(g["day"], g["requests"]) for g in body["data"]] == [("2026-01-31", 10), ("2026-02-01", 5)]
        edge = query_usage(engine, UsageQuery(datetime(2026, 1, 31, 21, tzinfo=UTC),
                                              datetime(2026, 2, 2, tzinfo=UTC), api_key_id=1))
        assert edge["requests"] == 5
    finally:
        engine.dispose()


def test_spool_with_a_torn_last_line_replays_the_complete_lines(clean_db, tmp_path):
    """A spool file whose writer died in the middle of a write: its complete lines are replayed
    (in batches), the torn tail is skipped, the file is deleted."""
    lines = [e.to_json() for e in events(7)]
    (tmp_path / "usage-dead-worker.spool").write_bytes(b"".join(line + b"\n" for line in lines) + lines[0][:20])
    batcher = UsageBatcher(UsageWriter(clean_db), spool=SpoolOutbox(tmp_path))
    batcher.MAX_BATCH = 3
    assert batcher.replay_outbox() == {"records": 7, "new_rows": 7}
    assert list(tmp_path.glob("*.spool")) == [] and counts(clean_db) == (7, 7, 7)


def test_outbox_lines_written_before_the_endpoint_column_still_replay(clean_db, rclient, name):
    """A version-1 line (spooled by a gateway older than migration 0005_usage_endpoint: no endpoint, no token
    details) replays as a chat completion without details; a version-2 line keeps its own; the
    rollup counts them under their endpoints."""
    at = datetime.now(UTC).isoformat(timespec="microseconds")
    v1 = (b'{"v":1,"request_id":"req_old","tenant_id":1,"api_key_id":1,"model":"m","provider":"p",'
          b'"upstream_model":"u","prompt_tokens":3,"completion_tokens":4,"cost_usd":"0.0000021",'
          b'"status":"ok","error_type":null,"streamed":false,"cached":false,"latency_ms":5,'
          b'"ttft_ms":null,"created_at":"' + at.encode() + b'"}')
    [new] = events(1)
    new.endpoint, new.cached_tokens, new.cache_write_tokens, new.reasoning_tokens = "messages", 2, 1, 0
    outbox = RedisOutbox(rclient, name)
    outbox.push([v1, new.to_json()])
    assert UsageBatcher(UsageWriter(clean_db), redis_outbox=outbox).replay_outbox() == {"records": 2, "new_rows": 2}
    with clean_db.connect() as conn:
        rows = conn.execute(text("SELECT request_id, endpoint, cached_tokens, cache_write_tokens, reasoning_tokens "
                                 "FROM usage_records ORDER BY endpoint")).all()
        rollup = conn.execute(text("SELECT endpoint, requests FROM usage_daily ORDER BY endpoint")).all()
    assert [tuple(r) for r in rows] == [("req_old", "chat.completions", None, None, None),
                                        (new.request_id, "messages", 2, 1, 0)]
    assert [tuple(r) for r in rollup] == [("chat.completions", 1), ("messages", 1)]
