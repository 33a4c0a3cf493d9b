"""The per-worker key cache's lookups (`lookup_key`): when a known key's entry passes its TTL,
one request refreshes it from the database while the others are served the previous snapshot
(stale-while-revalidate with a single flight per hash), for `stale_s` at most; an invalidated
entry is never served stale; a refresh that cannot reach the database keeps the snapshot.

The database is a counting session factory (no PostgreSQL): every lookup is one `scalar` call.
Time comes from FakeClock; "requests arriving during the refresh" run inside that call."""
from __future__ import annotations

import threading
from typing import Callable

import pytest
from sqlalchemy.exc import OperationalError

from app.models import ApiKey, Tenant
from app.services.api_key_service import KeyCache, KeyInfo, hash_key, lookup_key
from Testing.support import FakeClock

pytestmark = pytest.mark.timeout(60)

TOKEN = "sk-test-token"
HASH = hash_key(TOKEN)
TTL_S = 5.0
STALE_S = 5.0


def key_row(rpm_limit: int | None) -> ApiKey:
    """A transient row as the lookup's query would return it (never stored)."""
    tenant = Tenant(id=10, name="t", status="active", budget_usd=None)
    row = ApiKey(id=1, tenant_id=10, name="k", prefix="sk-test-tok", key_hash=HASH, role="member",
                 rpm_limit=rpm_limit, allowed_models=None, cache=None)
    row.tenant = tenant
    return row


class Database:
    """A session factory whose sessions answer `row` and count the lookups. `during` runs
    inside the next lookup (requests that arrive while it is in flight); `down` makes lookups
    fail as an unreachable PostgreSQL does."""

    def __init__(self, row: ApiKey | None) -> None:
        self.row = row
        self.lookups = 0
        self.down = False
        self.during: Callable[[], None] | None = None

    def __call__(self) -> "Database":
        return self

    def scalar(self, _query) -> ApiKey | None:
        self.lookups += 1
        during, self.during = self.during, None
        if during is not None:
            during()
        if self.down:
            raise OperationalError("SELECT", {}, ConnectionRefusedError("connection refused"))
        return self.row

    def close(self) -> None:
        pass


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def cache(clock) -> KeyCache:
    return KeyCache(TTL_S, clock.monotonic, negative_ttl_s=1.0, stale_s=STALE_S)


@pytest.fixture
def db() -> Database:
    return Database(key_row(rpm_limit=None))


def loaded(cache: KeyCache, db: Database) -> KeyInfo:
    """The key looked up once (one lookup), then changed in the database (rpm_limit 60)
    without any event reaching the cache."""
    info = lookup_key(db, cache, HASH)
    assert db.lookups == 1 and info.rpm_limit is None
    db.row = key_row(rpm_limit=60)
    return info


def requests_during_refresh(db: Database, cache: KeyCache, n: int) -> list[KeyInfo | None]:
    """Arrange for `n` lookups of the key to run while the next database lookup is in flight."""
    answers: list[KeyInfo | None] = []
    db.during = lambda: answers.extend(lookup_key(db, cache, HASH) for _ in range(n))
    return answers


def test_expired_known_key_is_served_stale_while_one_lookup_refreshes_it(cache, db, clock):
    """Past the TTL, the first request refreshes the entry; the 5 requests arriving meanwhile
    get the previous snapshot without querying (1 lookup, not 6). Stale serves count as hits."""
    old = loaded(cache, db)
    clock.advance(6)  # past the TTL (5 s), within the stale window (5 s more)
    during = requests_during_refresh(db, cache, 5)
    fresh = lookup_key(db, cache, HASH)
    assert db.lookups == 2
    assert during == [old] * 5
    assert fresh.rpm_limit == 60
    assert lookup_key(db, cache, HASH).rpm_limit == 60  # fresh again: no lookup
    assert db.lookups == 2
    assert (cache.hits, cache.misses) == (6, 2)


def test_concurrent_requests_during_a_refresh_do_not_query(cache, db, clock):
    """Threads (run.py's server) asking for the key while another thread's refresh waits on the
    database all return the previous snapshot at once; only the refresh queries."""
    old = loaded(cache, db)
    clock.advance(6)
    entered, release = threading.Event(), threading.Event()

    def slow_database() -> None:
        entered.set()
        release.wait()

    db.during = slow_database
    refreshed: list[KeyInfo | None] = []
    refresher = threading.Thread(target=lambda: refreshed.append(lookup_key(db, cache, HASH)))
    refresher.start()
    entered.wait()
    answers: list[KeyInfo | None] = []
    others = [threading.Thread(target=lambda: answers.append(lookup_key(db, cache, HASH))) for _ in range(8)]
    for t in others:
        t.start()
    for t in others:
        t.join()  # they would hang here (until the test's timeout) if they waited for the refresh
    release.set()
    refresher.join()
    assert answers == [old] * 8
    assert [info.rpm_limit for info in refreshed] == [60]
    assert db.lookups == 2


def test_past_the_stale_limit_every_request_waits_for_a_lookup(cache, db, clock):
    """More than TTL + stale_s (10 s) after the lookup, the snapshot is not served: a request
    waits for its own lookup, and one arriving meanwhile does too (as without the stale window)."""
    loaded(cache, db)
    clock.advance(10.5)
    assert cache.servable(HASH) is False
    during = requests_during_refresh(db, cache, 1)
    assert lookup_key(db, cache, HASH).rpm_limit == 60
    assert [info.rpm_limit for info in during] == [60]
    assert db.lookups == 3


def test_the_stale_window_ends_stale_s_after_the_ttl(cache, db, clock):
    """At exactly TTL + stale_s the snapshot is still served during a refresh (1 lookup)."""
    old = loaded(cache, db)
    clock.advance(10)
    during = requests_during_refresh(db, cache, 1)
    assert lookup_key(db, cache, HASH).rpm_limit == 60
    assert during == [old]
    assert db.lookups == 2


def invalidate_key(cache: KeyCache) -> None:
    cache.invalidate_key_id(1)


def invalidate_tenant(cache: KeyCache) -> None:
    cache.invalidate_tenant_id(10)


def expire_all(cache: KeyCache) -> None:
    cache.expire_all()


@pytest.mark.parametrize("invalidate", [invalidate_key, invalidate_tenant, expire_all])
def test_an_invalidated_entry_is_never_served_stale(cache, db, clock, invalidate):
    """After a key event, a tenant event or `expire_all` (the listener resubscribed), the entry
    is looked up before use even within the stale window, and a request arriving meanwhile
    also waits for its own lookup instead of getting the old snapshot."""
    loaded(cache, db)
    clock.advance(6)
    invalidate(cache)
    assert cache.servable(HASH) is False
    during = requests_during_refresh(db, cache, 1)
    assert lookup_key(db, cache, HASH).rpm_limit == 60
    assert [info.rpm_limit for info in during] == [60]
    assert db.lookups == 3


def test_a_lookup_that_overlapped_an_invalidation_is_never_served_stale(cache, db, clock):
    """A refresh that read the database before a key event landed stores what it read as
    invalidated: the next request looks the key up again and waits, even within the window."""
    loaded(cache, db)
    clock.advance(6)
    db.during = lambda: cache.invalidate_key_id(1)  # the event arrives while the refresh reads
    lookup_key(db, cache, HASH)
    assert cache.servable(HASH) is False
    db.row = key_row(rpm_limit=120)
    during = requests_during_refresh(db, cache, 1)
    assert lookup_key(db, cache, HASH).rpm_limit == 120
    assert [info.rpm_limit for info in during] == [120]
    assert db.lookups == 4


def test_a_failed_refresh_keeps_the_stale_snapshot(cache, db, clock):
    """Database unreachable when the entry is refreshed: the refresh answers the previous
    snapshot and keeps it for another TTL (no lookup meanwhile); requests arriving during the
    failed refresh got it too."""
    old = loaded(cache, db)
    clock.advance(6)
    db.down = True
    during = requests_during_refresh(db, cache, 3)
    assert lookup_key(db, cache, HASH) == old
    assert during == [old] * 3
    assert db.lookups == 2
    clock.advance(4)
    assert lookup_key(db, cache, HASH) == old
    assert db.lookups == 2


def test_unknown_keys_are_not_served_stale(cache, clock):
    """An unknown hash is remembered for negative_ttl_s only; afterwards every request asking
    for it queries, also while another request's lookup of it is in flight."""
    db = Database(None)
    assert lookup_key(db, cache, HASH) is None
    assert lookup_key(db, cache, HASH) is None
    assert db.lookups == 1
    clock.advance(1.5)
    during = requests_during_refresh(db, cache, 1)
    assert lookup_key(db, cache, HASH) is None
    assert during == [None]
    assert db.lookups == 3


def test_without_a_stale_window_an_expired_entry_waits_for_a_lookup(clock, db):
    """stale_s = 0 (AUTH_CACHE_STALE_S=0): every request past the TTL queries, as before."""
    cache = KeyCache(TTL_S, clock.monotonic, stale_s=0)
    loaded(cache, db)
    clock.advance(6)
    during = requests_during_refresh(db, cache, 1)
    assert lookup_key(db, cache, HASH).rpm_limit == 60
    assert [info.rpm_limit for info in during] == [60]
    assert db.lookups == 3
