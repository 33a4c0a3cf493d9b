"""The way usage rows reach PostgreSQL: background group commit, with a durable outbox.

`submit` (called after the response has gone out) only appends to an in-memory queue. One
writer thread (a greenlet under gevent) drains it, inserting everything queued so far in one
statement ("group commit": no timer, batches grow by themselves under load). Once `close()`
has begun, `submit` stores the row itself before returning (no writer is left to take it).

When a batch cannot be written for a passing reason (PostgreSQL down or restarting, a
connection or statement timeout, a deadlock), it goes to the outbox at once: the Redis list
when Redis answers, else this machine's spool file (fsync'ed). Until PostgreSQL answers a
probe again, later batches go straight to the outbox without waiting for another timeout.
A flusher thread in every worker probes, and replays the outbox (everyone's: other workers',
dead workers', other replicas') once PostgreSQL is back. Writes are idempotent on
(request_id, created_at), so a record replayed twice is stored once.

A record PostgreSQL rejects for good (bad data) is isolated from its batch and set aside in a
dead-letter file with an error in the log, instead of blocking the queue forever.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, event as sa_event, text
from sqlalchemy.engine import Engine

from app.services import usage_partitions
from app.services.usage_outbox import RedisOutbox, SpoolOutbox
from app.services.usage_service import UsageEvent, UsageWriter
from app.utils import db_errors

log = logging.getLogger("gateway.usage")

DEAD_LETTER_FILE = "dead-letter.jsonl"
WRITER_APPLICATION_NAME = "gateway-usage-writer"  # how the writer's connections show in pg_stat_activity


def dedicated_engine(url: str, timeout_s: float) -> Engine:
    """The writer's own small pool: request handlers exhausting the app's pool cannot starve
    the usage writer, and every connect and statement is bounded by `timeout_s`, so a
    database that hangs sends the rows to the outbox instead of holding them in memory."""
    engine = create_engine(url, pool_size=2, max_overflow=2, pool_timeout=timeout_s, pool_recycle=1800,
                           # no ping before each batch (a round trip): a dead connection is
                           # replaced when a write finds it dead (UsageWriter._write_pg)
                           pool_pre_ping=False,
                           connect_args={"connect_timeout": max(1, int(round(timeout_s))),
                                         "application_name": WRITER_APPLICATION_NAME})
    statement_ms = max(1, int(timeout_s * 1000))

    @sa_event.listens_for(engine, "connect")
    def _bounded_statements(dbapi_conn: Any, _record: Any) -> None:
        with dbapi_conn.cursor() as cur:
            cur.execute(f"SET statement_timeout = {statement_ms}")
        dbapi_conn.commit()
    return engine


def is_permanent(exc: BaseException) -> bool:
    """A failure that retrying cannot fix (the record itself is bad): by SQLSTATE for the
    database's errors (a missing partition is not one of them), by type for ours."""
    return isinstance(exc, (ValueError, TypeError, KeyError)) or db_errors.is_permanent(exc)


class _Transient(Exception):
    """A replay stopped because the database failed for a passing reason."""


class UsageBatcher:
    MAX_BATCH = 500
    MAX_QUEUED = 200_000
    LOG_EVERY_S = 10.0
    REDIS_RETRY_S = 5.0

    def __init__(self, writer: UsageWriter, redis_outbox: RedisOutbox | None = None,
                 spool: SpoolOutbox | None = None, poll_s: float = 1.0, partitions_ahead: int = 2,
                 owns_engine: bool = False, linger_s: float = 0.0) -> None:
        self.writer = writer
        # How long the writer waits, once woken by a row, for more rows to join the batch
        # (cut short by flush() and close(), and when MAX_BATCH rows are queued).
        self.linger_s = linger_s
        self.redis_outbox = redis_outbox
        self.spool = spool
        self.poll_s = poll_s
        self.partitions_ahead = partitions_ahead
        self.owns_engine = owns_engine
        self._queue: deque[UsageEvent] = deque()
        self._wake = threading.Event()
        self._urgent = threading.Event()   # flush()/close(): no lingering
        self._idle = threading.Event()
        self._idle.set()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._flusher: threading.Thread | None = None
        self._lock = threading.Lock()
        self._dead_lock = threading.Lock()
        self._last_log = 0.0
        self._redis_down_until = 0.0  # Redis failed: skip it for a while (its client retries slowly)
        self.database_down = False
        self.failures = 0        # batches PostgreSQL did not take
        self.diverted = 0        # records sent to the outbox by this worker
        self.replayed = 0        # outbox records this worker replayed (its own or anyone's)
        self.dead_letters = 0
        self._waiting_since: float | None = None  # monotonic: since when rows wait (None: none)

    @property
    def depth(self) -> int:
        return len(self._queue)

    @property
    def write_lag_s(self) -> float:
        """About how long the oldest row not yet stored has waited (0: none waits): from when
        the queue stopped being empty, or from when the writer took its last batch."""
        since = self._waiting_since
        return max(0.0, time.monotonic() - since) if since is not None and self._queue else 0.0

    # --- the normal path -------------------------------------------------------------------

    def submit(self, event: UsageEvent) -> None:
        """Queue the row for the writer. After `close()` nobody would take it from the queue:
        it is stored at once, on the caller's thread (PostgreSQL, else the outbox)."""
        if self._stop.is_set():
            log.warning("usage row %s submitted after the writer closed: storing it synchronously",
                        event.request_id)
            self._store([event])
            return
        if len(self._queue) >= self.MAX_QUEUED:
            log.error("usage queue full (%d rows): storing %s synchronously", self.MAX_QUEUED, event.request_id)
            self._store([event])
            return
        if not self._queue:
            self._waiting_since = time.monotonic()
        self._queue.append(event)
        self._idle.clear()
        self._wake.set()
        if len(self._queue) >= self.MAX_BATCH:
            self._urgent.set()   # a full batch: no reason to wait for more

    def start(self, flusher: bool = True) -> None:
        """Start the writer, and the outbox flusher unless `flusher=False` (once; later calls
        do nothing). Called by the app's Runtime.start() in the process, and under the gevent
        hub, that serves requests. Not started, rows wait in the queue for `flush()`."""
        with self._lock:
            if self._stop.is_set():
                return
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="usage-writer", daemon=True)
                self._thread.start()
            if flusher and (self._flusher is None or not self._flusher.is_alive()):
                self._flusher = threading.Thread(target=self._flush_outbox_forever, name="usage-outbox",
                                                 daemon=True)
                self._flusher.start()

    def _run(self) -> None:
        while True:
            self._wake.wait()
            self._wake.clear()
            while self._queue:
                # Before every batch, not only the first after a wake-up: rows keep arriving
                # while a batch is written, and writing them at once made batches of one or
                # two rows under a steady load (a round trip each).
                if self.linger_s > 0 and not self._urgent.is_set() and len(self._queue) < self.MAX_BATCH:
                    self._urgent.wait(self.linger_s)   # let the rows of the next few ms join this batch
                taken = time.monotonic()
                batch = [self._queue.popleft() for _ in range(min(len(self._queue), self.MAX_BATCH))]
                try:
                    self._store(batch)
                except Exception:  # never lose the thread; the rows go back to the queue
                    log.exception("usage batch of %d rows could not be stored; retrying", len(batch))
                    self._queue.extendleft(reversed(batch))
                    time.sleep(1.0)
                if self._queue:
                    self._waiting_since = taken
            if not self._queue:
                self._urgent.clear()   # flush() and close() are answered: linger again
                self._idle.set()
                if self._stop.is_set():
                    return  # closed: everything queued is stored

    def _store(self, batch: list[UsageEvent]) -> None:
        if not self.database_down:
            try:
                self.writer.write(batch)
                return
            except Exception as exc:
                self.failures += 1
                if is_permanent(exc):
                    self._isolate(batch)
                    return
                self._mark_down(exc)
        self._divert(batch)

    def _isolate(self, batch: list[UsageEvent]) -> None:
        """One bad record must not take its batch with it: write them one by one."""
        for i, event in enumerate(batch):
            try:
                self.writer.write([event])
            except Exception as exc:
                if is_permanent(exc):
                    self._dead_letter(event.to_json(), exc)
                    continue
                self._mark_down(exc)
                self._divert(batch[i:])
                return

    def _mark_down(self, exc: BaseException) -> None:
        if not self.database_down:
            log.error("usage: PostgreSQL unavailable (%s); rows go to the outbox until it answers again",
                      type(exc).__name__)
        self.database_down = True

    def _divert(self, batch: list[UsageEvent]) -> None:
        """Into the outbox: Redis if it answers, else the local spool; in memory only when
        neither can take them (retried)."""
        lines = [e.to_json() for e in batch]
        if self._redis_usable():
            try:
                depth = self.redis_outbox.push(lines)
                self.diverted += len(lines)
                self._log_divert(len(lines), f"the Redis outbox (depth {depth})")
                return
            except Exception as exc:
                self._redis_failed()
                self._log_divert(0, f"nowhere in Redis ({type(exc).__name__}): trying the local spool")
        if self.spool is not None:
            try:
                self.spool.append(lines)
                self.diverted += len(lines)
                self._log_divert(len(lines), f"the local spool ({self.spool.dir})")
                return
            except OSError as exc:
                log.error("usage spool not writable (%s): %d rows kept in memory", exc, len(lines))
        self._queue.extendleft(reversed(batch))
        time.sleep(1.0)

    def _redis_usable(self) -> bool:
        return self.redis_outbox is not None and time.monotonic() >= self._redis_down_until

    def _redis_failed(self) -> None:
        self._redis_down_until = time.monotonic() + self.REDIS_RETRY_S

    def _log_divert(self, n: int, where: str) -> None:
        now = time.monotonic()
        if now - self._last_log >= self.LOG_EVERY_S:
            self._last_log = now
            log.warning("usage: %d rows to %s; this worker has diverted %d rows so far", n, where, self.diverted)

    def _dead_letter(self, line: bytes, exc: BaseException) -> None:
        self.dead_letters += 1
        reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        log.error("usage record rejected by the database for good (%s: %s): kept in %s",
                  type(exc).__name__, reason, DEAD_LETTER_FILE)
        directory = self.spool.dir if self.spool is not None else Path(".")
        with self._dead_lock:
            directory.mkdir(parents=True, exist_ok=True)
            fd = os.open(directory / DEAD_LETTER_FILE, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            try:
                os.write(fd, line + b"\n")
                os.fsync(fd)
            finally:
                os.close(fd)

    # --- the outbox ------------------------------------------------------------------------

    def _flush_outbox_forever(self) -> None:
        try:
            usage_partitions.ensure_ahead(self.writer.engine, self.partitions_ahead)
        except Exception as exc:
            log.warning("usage partitions not checked at start-up (%s); the writer creates them on demand",
                        type(exc).__name__)
        last_depth_log = 0.0
        while not self._stop.wait(self.poll_s):
            try:
                result = self.replay_outbox()
                if result["records"]:
                    log.info("usage outbox: replayed %d records (%d new rows)", result["records"],
                             result["new_rows"])
                if self.database_down and time.monotonic() - last_depth_log > 30:
                    last_depth_log = time.monotonic()
                    log.warning("usage outbox waiting for PostgreSQL: %s", self.outbox_depth())
            except Exception:
                log.exception("usage outbox replay failed")

    def probe(self) -> bool:
        try:
            with self.writer.engine.connect() as conn:
                conn.execute(text("SELECT 1"))
            return True
        except Exception:
            return False

    def replay_outbox(self) -> dict[str, int]:
        """Replay what the outbox holds (Redis list, then replayable spool files) once
        PostgreSQL answers. Returns {"records": lines replayed, "new_rows": rows inserted}."""
        result = {"records": 0, "new_rows": 0}
        if self.database_down:
            if not self.probe():
                return result
            self.database_down = False
            log.warning("usage: PostgreSQL answers again; replaying the outbox")
        try:
            if self._redis_usable():
                self._replay_redis(result)
            if self.spool is not None:
                self.spool.replay(lambda lines: self._replay_lines(lines, result), self.MAX_BATCH)
        except _Transient as exc:
            self._mark_down(exc.__cause__ or exc)
        return result

    def _replay_redis(self, result: dict[str, int]) -> None:
        while True:
            try:
                lines = self.redis_outbox.claim(self.MAX_BATCH)
            except Exception:
                self._redis_failed()
                return  # Redis unavailable: nothing to replay from there now
            if not lines:
                return
            try:
                self._replay_lines(lines, result)
            except _Transient:
                try:
                    self.redis_outbox.release()
                except Exception:
                    pass  # the lease expires and the next claimer puts them back
                raise
            self.redis_outbox.ack()

    def _replay_lines(self, lines: list[bytes], result: dict[str, int]) -> None:
        events = []
        for line in lines:
            try:
                events.append(UsageEvent.from_json(line))
            except (ValueError, KeyError, TypeError) as exc:
                self._dead_letter(line, exc)
        try:
            result["new_rows"] += self.writer.write(events)
        except Exception as exc:
            if not is_permanent(exc):
                raise _Transient() from exc
            for event in events:
                try:
                    result["new_rows"] += self.writer.write([event])
                except Exception as one:
                    if not is_permanent(one):
                        raise _Transient() from one
                    self._dead_letter(event.to_json(), one)
        result["records"] += len(lines)
        self.replayed += len(lines)

    def outbox_depth(self) -> dict[str, Any]:
        """What waits in the outbox (Redis: the shared list; spool: this machine's files)."""
        depth: dict[str, Any] = {}
        if self.redis_outbox is not None:
            try:
                depth["redis"] = self.redis_outbox.depth() if self._redis_usable() else None
            except Exception:
                self._redis_failed()
                depth["redis"] = None  # unavailable
        if self.spool is not None:
            spool = self.spool.depth()
            depth["spool_files"], depth["spool_bytes"] = spool["files"], spool["bytes"]
        return depth

    def stats(self) -> dict[str, Any]:
        return {"usage_rows_queued": self.depth, "usage_write_failures": self.failures,
                "usage_database_down": self.database_down, "usage_rows_diverted": self.diverted,
                "usage_rows_replayed": self.replayed, "usage_dead_letters": self.dead_letters}

    # --- shutdown --------------------------------------------------------------------------

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until everything queued is stored (written or in the outbox). True when empty."""
        if self._thread is None or not self._thread.is_alive():
            # Never started (or already gone): the caller stores what is queued itself.
            deadline = time.monotonic() + timeout
            while self._queue and time.monotonic() < deadline:
                self._store([self._queue.popleft() for _ in range(min(len(self._queue), self.MAX_BATCH))])
            if not self._queue:
                self._idle.set()
            return not self._queue
        self._urgent.set()
        self._wake.set()
        return self._idle.wait(timeout) and not self._queue

    def close(self, timeout: float = 10.0) -> bool:
        """Stop the flusher, store what is queued (into the outbox if PostgreSQL does not take
        it in time), release the spool file. True when nothing was left in memory."""
        self._stop.set()
        done = self.flush(timeout)
        if not done and self._queue:
            self.database_down = True  # PostgreSQL too slow: the outbox takes the rest
            done = self.flush(min(timeout, 5.0))
        if self.spool is not None:
            self.spool.close()
        self.writer.close()
        if self.owns_engine:
            self.writer.engine.dispose()
        return done
