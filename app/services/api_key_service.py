"""API keys: minting, listing, revoking, and authenticating a Bearer key.

A key is `sk-` + 32 bytes of URL-safe randomness. Only its SHA-256 and a short display prefix
are stored. Authentication looks the hash up once per worker every `AUTH_CACHE_TTL_S`
seconds at most; when that expires, one request refreshes the entry while the others are served
the previous snapshot (for `AUTH_CACHE_STALE_S` at most, never after an invalidation). The cache
holds plain snapshots (`KeyInfo`), never ORM objects.
"""
from __future__ import annotations

import hashlib
import secrets
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from typing import Any, Callable

from sqlalchemy import or_, select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from app.models import ApiKey, Tenant
from app.models.types import as_utc, utcnow
from app.utils.money import format_money

KEY_PREFIX = "sk-"
DISPLAY_PREFIX_LEN = 11  # "sk-" + 8 characters: enough to tell keys apart, useless to guess
LIMIT_FIELDS = ("rpm_limit", "tpm_limit", "daily_token_limit", "max_concurrent")


def generate_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def hash_key(plaintext: str) -> str:
    return hashlib.sha256(plaintext.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class KeyInfo:
    """What the request path needs to know about a key, detached from any DB session."""
    id: int
    tenant_id: int
    tenant_name: str
    tenant_status: str
    name: str
    prefix: str
    role: str
    rpm_limit: int | None
    tpm_limit: int | None
    daily_token_limit: int | None
    max_concurrent: int | None
    budget_usd: Decimal | None
    tenant_budget_usd: Decimal | None
    allowed_models: frozenset[str] | None
    expires_at: datetime | None
    revoked_at: datetime | None
    # Set when the secret presented is the previous one of a rotated key: its grace period end.
    secret_expires_at: datetime | None = None
    cache: bool | None = None  # the response cache for this key (None: the model or the default decides)

    def usable(self, now: datetime | None = None) -> tuple[bool, str]:
        """(True, "") or (False, the reason a 401 gives)."""
        if self.revoked_at is not None:
            return False, "This API key has been revoked."
        if self.expires_at is not None and self.expires_at <= (now or utcnow()):
            return False, "This API key has expired."
        if self.secret_expires_at is not None and self.secret_expires_at <= (now or utcnow()):
            return False, "This API key has been rotated; use its new secret."
        if self.tenant_status != "active":
            return False, "The tenant of this API key is suspended."
        return True, ""

    def may_use(self, alias: str) -> bool:
        return self.allowed_models is None or alias in self.allowed_models


def key_info(key: ApiKey, secret_expires_at: datetime | None = None) -> KeyInfo:
    return KeyInfo(
        id=key.id, tenant_id=key.tenant_id, tenant_name=key.tenant.name,
        tenant_status=key.tenant.status, name=key.name, prefix=key.prefix, role=key.role,
        rpm_limit=key.rpm_limit, tpm_limit=key.tpm_limit, daily_token_limit=key.daily_token_limit,
        max_concurrent=key.max_concurrent, budget_usd=key.budget_usd,
        tenant_budget_usd=key.tenant.budget_usd,
        allowed_models=frozenset(key.allowed_models) if key.allowed_models is not None else None,
        expires_at=as_utc(key.expires_at), revoked_at=as_utc(key.revoked_at),
        secret_expires_at=as_utc(secret_expires_at), cache=key.cache)


def key_to_dict(key: ApiKey, now: datetime | None = None) -> dict[str, Any]:
    """The public description of a key: never its secret or its hash. `now` decides whether
    a rotation's grace period is still running."""
    return {
        "id": key.id, "object": "api_key", "name": key.name, "prefix": key.prefix,
        "tenant": key.tenant.name, "tenant_id": key.tenant_id, "role": key.role,
        **{f: getattr(key, f) for f in LIMIT_FIELDS},
        "budget_usd": format_money(key.budget_usd) if key.budget_usd is not None else None,
        "allowed_models": key.allowed_models, "cache": key.cache,
        "expires_at": _iso(key.expires_at), "revoked_at": _iso(key.revoked_at),
        "created_at": _iso(key.created_at), "last_used_at": _iso(key.last_used_at),
        "rotated_at": _iso(key.rotated_at),
        "previous_key_expires_at": _iso(_live_grace(key.previous_key_expires_at, now or utcnow())),
    }


def _live_grace(value: datetime | None, now: datetime) -> datetime | None:
    value = as_utc(value)
    return value if value is not None and value > now else None


def iso(value: datetime | None) -> str | None:
    """ISO 8601 in UTC with a Z, as every admin answer shows times."""
    return _iso(value)


def _iso(value: datetime | None) -> str | None:
    value = as_utc(value)
    return value.isoformat().replace("+00:00", "Z") if value else None


def new_key(session: Session, *, name: str, tenant: Tenant, role: str = "member",
            rpm_limit: int | None = None, tpm_limit: int | None = None,
            daily_token_limit: int | None = None, max_concurrent: int | None = None,
            budget_usd: Decimal | None = None, allowed_models: list[str] | None = None,
            expires_at: datetime | None = None, created_at: datetime | None = None,
            cache: bool | None = None) -> tuple[ApiKey, str]:
    """Add a key to the session (flushed, not committed: `admin_service.Admin.mint_key` is the
    use case) and return it with its plaintext, which exists only in this return value."""
    plaintext = generate_key()
    key = ApiKey(tenant_id=tenant.id, name=name, prefix=plaintext[:DISPLAY_PREFIX_LEN],
                 key_hash=hash_key(plaintext), role=role, rpm_limit=rpm_limit, tpm_limit=tpm_limit,
                 daily_token_limit=daily_token_limit, max_concurrent=max_concurrent,
                 budget_usd=budget_usd, allowed_models=allowed_models, expires_at=expires_at, cache=cache,
                 created_at=created_at or utcnow())
    key.tenant = tenant
    session.add(key)
    session.flush()
    return key, plaintext


def list_keys(session: Session, tenant_id: int | None = None) -> list[ApiKey]:
    query = select(ApiKey).order_by(ApiKey.id)
    if tenant_id is not None:
        query = query.where(ApiKey.tenant_id == tenant_id)
    return list(session.scalars(query))


def revoke_key(key: ApiKey, now: datetime) -> bool:
    """Mark the key revoked at `now`; False when it already was. This also ends a rotation's
    grace period (`KeyInfo.usable` checks revocation first)."""
    if key.revoked_at is not None:
        return False
    key.revoked_at = now
    return True


UPDATABLE_FIELDS = ("name", *LIMIT_FIELDS, "budget_usd", "allowed_models", "expires_at", "cache")


def update_key(key: ApiKey, changes: dict[str, Any]) -> dict[str, Any]:
    """Apply the changes (fields of UPDATABLE_FIELDS) and return {field: [old, new]} of those
    that really changed, as JSON-friendly values for the audit log."""
    changed: dict[str, Any] = {}
    for name, new in changes.items():
        if name not in UPDATABLE_FIELDS:
            raise ValueError(f"not an updatable field: {name}")
        old = getattr(key, name)
        if name == "expires_at":
            old = as_utc(old)
        if old != new:
            setattr(key, name, new)
            changed[name] = [_plain(old), _plain(new)]
    return changed


def rotate_key(key: ApiKey, grace_s: float, now: datetime) -> str:
    """Give the key a new secret and return it. The old secret keeps working for `grace_s`
    seconds after `now` (0: it stops now); a secret still in an earlier grace period stops now."""
    plaintext = generate_key()
    if grace_s > 0:
        key.previous_key_hash = key.key_hash
        key.previous_key_expires_at = now + timedelta(seconds=grace_s)
    else:
        key.previous_key_hash, key.previous_key_expires_at = None, None
    key.key_hash = hash_key(plaintext)
    key.prefix = plaintext[:DISPLAY_PREFIX_LEN]
    key.rotated_at = now
    return plaintext


def _plain(value: Any) -> Any:
    if isinstance(value, Decimal):
        return format_money(value)
    if isinstance(value, datetime):
        return _iso(value)
    return value


_INVALIDATED = float("-inf")  # an entry's fresh/stale bounds after an invalidation: never served


class KeyCache:
    """Per-worker cache of hash -> KeyInfo, with a TTL backstop, and of unknown hashes (None)
    for `negative_ttl_s`. Unknown hashes are kept apart and bounded, so that a flood of random
    keys can neither grow the cache without end nor push the known keys out of it.

    Stale-while-revalidate: a known key's entry past its TTL, but less than `stale_s` past it
    and not invalidated, is still served while exactly one request of this process (the first
    to see it expired) looks the key up again; the others do not query (`begin_refresh`). Past
    `stale_s` a request waits for its own lookup, as for a miss. An invalidated entry (a key or
    tenant event, `expire_all`, or a lookup that overlapped one) is never served this way.

    The lock guards only dictionary updates, never I/O: it cannot block a gevent worker's hub
    (monkey-patched or not) and is a plain mutex under run.py's threaded server.
    """

    MAX_NEGATIVE = 10_000

    def __init__(self, ttl_s: float, clock: Callable[[], float] = time.monotonic,
                 negative_ttl_s: float = 1.0, stale_s: float = 0.0) -> None:
        self.ttl_s = ttl_s
        self.negative_ttl_s = negative_ttl_s
        self.stale_s = max(0.0, stale_s)
        self.clock = clock
        # hash -> (snapshot, fresh until, served stale until); both bounds _INVALIDATED once invalidated.
        self._entries: dict[str, tuple[KeyInfo, float, float]] = {}
        self._unknown: dict[str, float] = {}   # hash -> expiry
        self._refreshing: set[str] = set()     # hashes one request is looking up again right now
        self._lock = threading.Lock()
        # Bumped by every invalidation: a lookup that read the database before an invalidation
        # must not cache what it read (it may predate the change).
        self.generation = 0
        # Called on a cache miss (never on a hit): starts the pub/sub listener of this process.
        self.on_miss: Callable[[], None] | None = None
        # Lookups answered here (fresh entries, unknown hashes, stale snapshots served while
        # another request refreshes them) / by the database (read by the metrics ticker).
        self.hits = 0
        self.misses = 0

    def get(self, key_hash: str) -> tuple[bool, KeyInfo | None]:
        """(True, snapshot) for a fresh entry, (True, None) for a hash known to be unknown,
        else (False, None). A stale entry is a miss here: see `begin_refresh`."""
        entry = self._entries.get(key_hash)
        if entry is not None and entry[1] >= self.clock():
            return True, entry[0]
        expiry = self._unknown.get(key_hash)
        if expiry is not None and expiry >= self.clock():
            return True, None
        return False, None

    def servable(self, key_hash: str) -> bool:
        """A known key answered without waiting for the database: its entry is fresh, or stale
        within `stale_s` and not invalidated."""
        entry = self._entries.get(key_hash)
        return entry is not None and entry[2] >= self.clock()

    def begin_refresh(self, key_hash: str) -> tuple[KeyInfo | None, bool]:
        """After a miss in `get`: what to do about a stale entry.

        (snapshot, False): another request is refreshing it; serve the snapshot, do not query.
        (None, True): this request is now the one refreshing it; it looks the key up and must
        call `end_refresh`. (None, False): no servable entry (none, invalidated, or past
        `stale_s`): look the key up and wait, as for any miss.
        """
        with self._lock:
            entry = self._entries.get(key_hash)
            if entry is None or entry[2] < self.clock():
                return None, False
            if key_hash in self._refreshing:
                return entry[0], False
            self._refreshing.add(key_hash)
            return None, True

    def end_refresh(self, key_hash: str) -> None:
        with self._lock:
            self._refreshing.discard(key_hash)

    def get_stale(self, key_hash: str) -> KeyInfo | None:
        """The last known snapshot of a key even past its TTL or invalidated by `expire_all`
        (None for unknown keys): what authentication falls back to while the database is
        unreachable."""
        entry = self._entries.get(key_hash)
        return entry[0] if entry is not None else None

    def put(self, key_hash: str, info: KeyInfo | None, generation: int | None = None) -> None:
        with self._lock:
            # A lookup that overlapped an invalidation may have read the old row: kept only as
            # invalidated (the next request looks it up again and waits for it; `get_stale` may
            # still use it while the database is unreachable).
            fresh = generation is None or generation == self.generation
            if info is None:
                if len(self._unknown) >= self.MAX_NEGATIVE:
                    self._unknown.clear()
                if fresh and self.negative_ttl_s > 0:
                    self._unknown[key_hash] = self.clock() + self.negative_ttl_s
                self._entries.pop(key_hash, None)
                return
            if len(self._entries) > 100_000:
                self._entries.clear()
            self._unknown.pop(key_hash, None)
            if fresh:
                until = self.clock() + self.ttl_s
                self._entries[key_hash] = (info, until, until + self.stale_s)
            else:
                self._entries[key_hash] = (info, _INVALIDATED, _INVALIDATED)

    def invalidate_key_id(self, key_id: int) -> None:
        with self._lock:
            self.generation += 1
            for h, (info, _, _) in list(self._entries.items()):
                if info.id == key_id:
                    del self._entries[h]

    def invalidate_tenant_id(self, tenant_id: int) -> None:
        with self._lock:
            self.generation += 1
            for h, (info, _, _) in list(self._entries.items()):
                if info.tenant_id == tenant_id:
                    del self._entries[h]

    def clear(self) -> None:
        with self._lock:
            self.generation += 1
            self._entries.clear()
            self._unknown.clear()

    def expire_all(self) -> None:
        """Every entry must be looked up again (and waited for: never served stale), but stays
        known to `get_stale`: changes may have been missed (the listener was reconnecting), yet
        a database outage at the same time should not lock out the keys this worker was serving."""
        with self._lock:
            self.generation += 1
            self._entries = {h: (info, _INVALIDATED, _INVALIDATED) for h, (info, _, _) in self._entries.items()}


def lookup_key(session_factory: Callable[[], Session], cache: KeyCache, key_hash: str) -> KeyInfo | None:
    """The snapshot of the key whose `hash_key` is `key_hash`, None when unknown: a fresh entry
    or a stale one being refreshed by another request is answered here (a hit); otherwise the
    database is read (a miss), by the one request refreshing a stale entry or by each request of
    an unknown, invalidated or too stale one."""
    hit, info = cache.get(key_hash)
    if hit:
        cache.hits += 1
        return info
    stale, refreshing = cache.begin_refresh(key_hash)
    if stale is not None:
        cache.hits += 1
        return stale
    try:
        cache.misses += 1
        if cache.on_miss is not None:
            cache.on_miss()
        return _read_key(session_factory, cache, key_hash)
    finally:
        if refreshing:
            cache.end_refresh(key_hash)


def _read_key(session_factory: Callable[[], Session], cache: KeyCache, key_hash: str) -> KeyInfo | None:
    """Look the hash up in the database and cache the answer."""
    generation = cache.generation
    session = session_factory()
    try:
        row = session.scalar(select(ApiKey).where(
            or_(ApiKey.key_hash == key_hash, ApiKey.previous_key_hash == key_hash)))
        if row is None:
            info = None
        elif row.key_hash == key_hash:
            info = key_info(row)
        else:  # the previous secret of a rotated key, inside (or past) its grace period
            info = key_info(row, secret_expires_at=row.previous_key_expires_at
                            or datetime(1970, 1, 1, tzinfo=timezone.utc))
    except SQLAlchemyError:
        # Database unreachable: a key this worker has seen keeps working on its last known
        # state (an outage must not stop paying traffic); an unknown key cannot be checked.
        stale = cache.get_stale(key_hash)
        if stale is not None:
            cache.put(key_hash, stale, generation)  # and do not wait for the database again for one TTL
            return stale
        raise
    finally:
        session.close()
    cache.put(key_hash, info, generation)
    return info


class LastUsedTracker:
    """Writes `last_used_at` at most once per interval per key, off the request path."""

    def __init__(self, interval_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.interval_s = interval_s
        self.clock = clock
        self._written: dict[int, float] = {}

    def due(self, key_id: int) -> bool:
        now = self.clock()
        last = self._written.get(key_id)
        if last is not None and now - last < self.interval_s:
            return False
        self._written[key_id] = now
        return True
