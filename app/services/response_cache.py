"""The exact response cache: a chat answer stored under its tenant and its canonical request,
served again to the same tenant for the same request without calling a provider.

- **Key**: the tenant, and a SHA-256 of the request as canonical JSON (sorted keys) without the
  fields that do not change the answer (`IGNORED_FIELDS`: streaming, the end user's id,
  metadata). The model alias is part of the request, so it is part of the key.
- **Where**: Redis (`gw:{t:<tenant>}:cache:...`, the tenant's hash tag, so Redis Cluster keeps a
  tenant's entries and its generations in one slot), else (embedded mode) a bounded in-process
  LRU. An entry lives `RESPONSE_CACHE_TTL_S` seconds.
- **Clearing** is O(1): each entry's key holds the tenant's generation and the model's
  generation (a Redis hash per tenant, fields "*" and each alias); clearing increments one of
  them, so every older entry becomes unreachable at once and expires by its TTL.
- **Hot copies**: with Redis, each worker also keeps the entries it recently served or stored
  (`HotEntries`, at most `RESPONSE_CACHE_HOT_ENTRIES`, each for at most `RESPONSE_CACHE_HOT_TTL_S`
  and never past the entry's own expiry), so a repeated request of a key without a
  requests/min limit is answered without a Redis round trip. A clear drops them in the worker
  that cleared at once and in every other worker when the `cache-cleared` event of the key-event
  channel arrives (app/services/key_events.py, milliseconds); they are used only while that
  listener is subscribed, and every (re)subscription drops them all. A key with a requests/min
  limit still goes to Redis on every hit (its count must be exact across workers).
- **What is stored**: a successful, complete answer (every choice has a finish_reason), as the
  final `chat.completion` object (a stream is assembled: app/services/cache_answers.py), with
  what it cost; at most `RESPONSE_CACHE_MAX_ENTRY_BYTES`. It is replayed as that object or as
  chunks (same module).

The decision whether a request uses the cache (`decide`) and the run's use of it live in
app/services/completion.py; the request headers are read by the controllers (app/api/cache_controller.py).
"""
from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Callable

import redis

from app.services.rate_limit_service import hit_admission_limits
from app.utils.cooperative import pass_turn


log = logging.getLogger("gateway.cache")

# Request fields that do not change the answer: not part of the key.
IGNORED_FIELDS = frozenset({"stream", "stream_options", "user", "metadata", "store", "safety_identifier",
                            "prompt_cache_key", "service_tier"})
ALL_MODELS = "*"   # the generation field that clears a whole tenant


@dataclass(frozen=True)
class CacheAsk:
    """What the request asked of the cache: `mode` "on" / "off" / None (X-Gateway-Cache), and
    `Cache-Control` no-cache (do not read, do store) / no-store (neither)."""
    mode: str | None = None
    no_cache: bool = False
    no_store: bool = False


@dataclass(frozen=True)
class CacheUse:
    """What the run does with the cache: read it (a hit answers), write the answer (a miss)."""
    read: bool
    write: bool


def decide(ask: CacheAsk, key_setting: bool | None, model_setting: bool | None, default: bool,
           body: dict[str, Any], max_temperature: float) -> CacheUse | None:
    """Whether and how a request uses the cache (None: not at all). The first that says wins:
    the request (`X-Gateway-Cache: on|off`), the key (`cache` of the key), the model (`cache` in
    data/models.json), the default (RESPONSE_CACHE_DEFAULT). Without an explicit `on` from the
    request, answers that vary by design are not cached: `temperature` above `max_temperature`
    (absent: 1.0, the providers' default) and requests with tools or functions. Requests asking
    for logprobs are never cached (a stream is stored without them)."""
    if ask.mode == "off" or ask.no_store:
        return None
    explicit = ask.mode == "on"
    if explicit:
        enabled = True
    elif key_setting is not None:
        enabled = key_setting
    elif model_setting is not None:
        enabled = model_setting
    else:
        enabled = default
    if not enabled or body.get("logprobs") or body.get("top_logprobs"):
        return None
    if not explicit and (_temperature(body) > max_temperature or body.get("tools") or body.get("functions")):
        return None
    return CacheUse(read=not ask.no_cache, write=True)


def _temperature(body: dict[str, Any]) -> float:
    value = body.get("temperature")
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else 1.0


def request_digest(body: dict[str, Any]) -> str:
    """SHA-256 of the canonical request: every field that may change the answer, as JSON with
    sorted keys (so field order and whitespace never matter)."""
    canonical = {k: v for k, v in body.items() if k not in IGNORED_FIELDS}
    text = json.dumps(canonical, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


@dataclass
class Entry:
    """A cached answer: the final chat.completion object, what it cost when it was made, and
    the model alias that answered it."""
    body: dict[str, Any]
    cost: Decimal
    model: str

    def encode(self) -> bytes:
        return json.dumps({"v": 1, "body": self.body, "cost": str(self.cost), "model": self.model},
                          separators=(",", ":")).encode()

    @classmethod
    def decode(cls, raw: bytes) -> "Entry":
        data = json.loads(raw)
        return cls(body=data["body"], cost=Decimal(data["cost"]), model=data["model"])


@dataclass(frozen=True)
class Slot:
    """Where one request's answer lives (its generations are read once, at lookup, so an answer
    made before a clear is stored where nobody looks any more). `hot_epoch`: the worker's clear
    count at lookup (`HotEntries.epoch`), so that an answer looked up before a clear is never
    kept as a hot copy after it."""
    tenant_id: int
    model: str
    digest: str
    generations: tuple[str, str]
    hot_epoch: int = -1


CACHE_CLEARED = "cache-cleared"   # the key-event channel's event of a clear (HotEntries.on_event)


class HotEntries:
    """A worker's copies of Redis entries it recently served or stored: (tenant, model, digest)
    -> (slot, encoded entry, expiry on `monotonic`), least recently used dropped past
    `max_entries`. `live()` says whether clears of other workers reach this one (the key-event
    listener is subscribed): when not, nothing is served from here. Every clear seen here (its
    own, or another worker's event) increments `epoch` and drops the tenant's copies."""

    def __init__(self, max_entries: int, max_age_s: float, monotonic: Callable[[], float],
                 live: Callable[[], bool]) -> None:
        self.max_entries = max_entries
        self.max_age_s = max_age_s
        self.monotonic = monotonic
        self.live = live
        self.epoch = 0
        self._entries: OrderedDict[tuple[int, str, str], tuple[Slot, bytes, float]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, tenant_id: int, model: str, digest: str) -> tuple[Slot, bytes] | None:
        if not self._entries or not self.live():
            return None
        key = (tenant_id, model, digest)
        with self._lock:
            found = self._entries.get(key)
            if found is None:
                return None
            if found[2] <= self.monotonic():
                del self._entries[key]
                return None
            self._entries.move_to_end(key)
        return found[0], found[1]

    def put(self, slot: Slot, raw: bytes, ttl_s: float) -> None:
        """Keep a copy for min(`ttl_s`, max age), unless a clear came since `slot` was looked up."""
        if self.max_entries <= 0 or ttl_s <= 0:
            return
        key = (slot.tenant_id, slot.model, slot.digest)
        with self._lock:
            if slot.hot_epoch != self.epoch:
                return
            self._entries[key] = (slot, raw, self.monotonic() + min(ttl_s, self.max_age_s))
            self._entries.move_to_end(key)
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)

    def drop(self, tenant_ids: list[int] | None = None, model: str | None = None) -> None:
        """Forget the copies of these tenants (None: all), of one model alias or all."""
        with self._lock:
            self.epoch += 1
            if tenant_ids is None and model is None:
                self._entries.clear()
                return
            wanted = None if tenant_ids is None else set(tenant_ids)
            for key in [k for k in self._entries
                        if (wanted is None or k[0] in wanted) and (model is None or k[1] == model)]:
                del self._entries[key]

    def on_event(self, event: dict[str, Any]) -> None:
        """Another worker's clear (`{"event": "cache-cleared", "tenants": [...] | null, "model": ...}`);
        anything unreadable drops every copy."""
        try:
            tenants = event.get("tenants")
            model = event.get("model")
            self.drop(None if tenants is None else [int(t) for t in tenants],
                      model if isinstance(model, str) else None)
        except (TypeError, ValueError, AttributeError):
            self.drop()


class ResponseCache:
    """The interface of both stores."""

    def lookup(self, tenant_id: int, model: str, digest: str, read: bool) -> tuple[Slot, Entry | None]:
        raise NotImplementedError

    def store(self, slot: Slot, raw: bytes) -> None:
        """Keep an encoded Entry (`Entry.encode`) where `slot` says."""
        raise NotImplementedError

    def lookup_admitted(self, tenant_id: int, model: str, digest: str, read: bool, limits: Any,
                        limiter: Any, request_id: str) -> tuple[Slot, Entry | None, Any]:
        """`lookup`, and on a hit the hit's admission (`limits`: a KeyLimits; requests/min
        only, app/services/rate_limit_service.py `hit_admission_limits`), or None when there is
        no hit or the key has no requests/min limit. Here: two steps; Redis: one round trip."""
        slot, found = self.lookup(tenant_id, model, digest, read)
        if found is None or not limits.rpm:
            return slot, found, None
        return slot, found, limiter.admit(hit_admission_limits(limits), request_id, 0, 0)

    def clear(self, tenant_id: int, model: str | None = None) -> None:
        raise NotImplementedError

    def clear_tenants(self, tenant_ids: list[int], model: str | None = None, every_tenant: bool = False) -> None:
        """Clear these tenants (of one model alias, or all): what POST /api/clear-cache does.
        `every_tenant`: the list is every tenant there is (other workers then drop all copies)."""
        for tenant_id in tenant_ids:
            self.clear(tenant_id, model)


# KEYS[1]: the tenant's generations (hash), KEYS[2]: the prefix of its entries (same hash tag).
# ARGV: 1 model alias, 2 digest, 3 "1" to read the entry. Returns {tenant gen, model gen, entry,
# the entry's remaining lifetime in ms (for a hot copy)}.
_LOOKUP = """
local g = redis.call('HMGET', KEYS[1], '*', ARGV[1])
local tg, mg = g[1] or '0', g[2] or '0'
if ARGV[3] ~= '1' then return {tg, mg, false, 0} end
local name = KEYS[2] .. ':' .. tg .. ':' .. mg .. ':' .. ARGV[2]
local raw = redis.call('GET', name)
if not raw then return {tg, mg, false, 0} end
return {tg, mg, raw, redis.call('PTTL', name)}
"""


class RedisResponseCache(ResponseCache):
    """Entries in Redis, shared by every worker and replica. Errors are the caller's (the run
    treats a Redis failure as a miss that stores nothing)."""

    def __init__(self, client: Any, ttl_s: float, hot: HotEntries | None = None,
                 publish: Callable[..., Any] | None = None) -> None:
        self.client = client
        self.ttl_ms = max(1, int(ttl_s * 1000))
        self._lookup = client.register_script(_LOOKUP)
        self.hot = hot            # this worker's copies (None: every hit asks Redis)
        self.publish = publish    # tells the other workers of a clear (KeyEvents.publish)

    @staticmethod
    def _names(tenant_id: int) -> tuple[str, str]:
        base = f"gw:{{t:{tenant_id}}}:cache"
        return f"{base}:gen", f"{base}:e"

    def lookup(self, tenant_id: int, model: str, digest: str, read: bool) -> tuple[Slot, Entry | None]:
        hot = self.hot
        if hot is not None and read:
            copy = hot.get(tenant_id, model, digest)
            if copy is not None:
                pass_turn()  # no I/O on this path: let the worker's other connections go first
                return copy[0], Entry.decode(copy[1])
        epoch = hot.epoch if hot is not None else -1
        gen_key, prefix = self._names(tenant_id)
        tg, mg, raw, pttl = self._lookup(keys=[gen_key, prefix], args=[model, digest, "1" if read else "0"])
        slot = Slot(tenant_id, model, digest, (_text(tg), _text(mg)), epoch)
        if not raw:
            return slot, None
        if hot is not None:
            hot.put(slot, raw, int(pttl) / 1000)
        return slot, Entry.decode(raw)

    def lookup_admitted(self, tenant_id: int, model: str, digest: str, read: bool, limits: Any,
                        limiter: Any, request_id: str) -> tuple[Slot, Entry | None, Any]:
        """One round trip for the lookup and a hit's requests/min admission when the limiter
        is this Redis (its script's `cache` op: the cache's keys and the key's counters share
        the tenant's hash tag). LimiterUnavailable and Redis errors are the caller's."""
        fused = limiter.cache_admit if limits.rpm else None
        if fused is None:
            return super().lookup_admitted(tenant_id, model, digest, read, limits, limiter, request_id)
        epoch = self.hot.epoch if self.hot is not None else -1
        tg, mg, raw, adm = fused(limits, list(self._names(tenant_id)), model, digest, read, request_id)
        return Slot(tenant_id, model, digest, (tg, mg), epoch), Entry.decode(raw) if raw else None, adm

    def store(self, slot: Slot, raw: bytes) -> None:
        _, prefix = self._names(slot.tenant_id)
        tg, mg = slot.generations
        self.client.set(f"{prefix}:{tg}:{mg}:{slot.digest}", raw, px=self.ttl_ms)
        if self.hot is not None:
            self.hot.put(slot, raw, self.ttl_ms / 1000)

    def clear(self, tenant_id: int, model: str | None = None) -> None:
        self.client.hincrby(self._names(tenant_id)[0], model or ALL_MODELS, 1)
        if self.hot is not None:
            self.hot.drop([tenant_id], model)

    def clear_tenants(self, tenant_ids: list[int], model: str | None = None, every_tenant: bool = False) -> None:
        super().clear_tenants(tenant_ids, model, every_tenant)
        if self.publish is not None:
            self.publish(CACHE_CLEARED, tenants=None if every_tenant else list(tenant_ids), model=model)


class LocalResponseCache(ResponseCache):
    """Embedded mode: entries in this process, least recently used dropped past `max_entries`,
    expired after `ttl_s` on `monotonic` (the runtime's clock)."""

    def __init__(self, ttl_s: float, max_entries: int, monotonic: Callable[[], float] = time.monotonic) -> None:
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        self.monotonic = monotonic
        self._entries: OrderedDict[tuple, tuple[float, bytes]] = OrderedDict()
        self._generations: dict[tuple[int, str], int] = {}
        self._lock = threading.Lock()

    def lookup(self, tenant_id: int, model: str, digest: str, read: bool) -> tuple[Slot, Entry | None]:
        with self._lock:
            gens = (str(self._generations.get((tenant_id, ALL_MODELS), 0)),
                    str(self._generations.get((tenant_id, model), 0)))
            slot = Slot(tenant_id, model, digest, gens)
            if not read:
                return slot, None
            found = self._entries.get(self._key(slot))
            if found is None:
                return slot, None
            expires, raw = found
            if expires <= self.monotonic():
                del self._entries[self._key(slot)]
                return slot, None
            self._entries.move_to_end(self._key(slot))
        return slot, Entry.decode(raw)

    def store(self, slot: Slot, raw: bytes) -> None:
        if self.max_entries <= 0:
            return
        with self._lock:
            self._entries[self._key(slot)] = (self.monotonic() + self.ttl_s, raw)
            self._entries.move_to_end(self._key(slot))
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)

    def clear(self, tenant_id: int, model: str | None = None) -> None:
        with self._lock:
            name = (tenant_id, model or ALL_MODELS)
            self._generations[name] = self._generations.get(name, 0) + 1
            for key in [k for k in self._entries if k[0] == tenant_id and (model is None or k[1] == model)]:
                del self._entries[key]  # memory back at once (the generation alone would do)

    @staticmethod
    def _key(slot: Slot) -> tuple:
        return (slot.tenant_id, slot.model, slot.generations, slot.digest)


def build_cache(redis_client: Any, ttl_s: float, max_entries: int, monotonic: Callable[[], float],
                hot: HotEntries | None = None, publish: Callable[..., Any] | None = None) -> ResponseCache:
    """Redis (with this worker's hot copies, when given) or, without Redis, this process."""
    return (RedisResponseCache(redis_client, ttl_s, hot, publish) if redis_client is not None
            else LocalResponseCache(ttl_s, max_entries, monotonic))


CACHE_ERRORS = (redis.RedisError, OSError, ValueError, KeyError, TypeError)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
