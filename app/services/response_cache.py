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
    made before a clear is stored where nobody looks any more)."""
    tenant_id: int
    model: str
    digest: str
    generations: tuple[str, str]


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


# KEYS[1]: the tenant's generations (hash), KEYS[2]: the prefix of its entries (same hash tag).
# ARGV: 1 model alias, 2 digest, 3 "1" to read the entry. Returns {tenant gen, model gen, entry}.
_LOOKUP = """
local g = redis.call('HMGET', KEYS[1], '*', ARGV[1])
local tg, mg = g[1] or '0', g[2] or '0'
if ARGV[3] ~= '1' then return {tg, mg, false} end
return {tg, mg, redis.call('GET', KEYS[2] .. ':' .. tg .. ':' .. mg .. ':' .. ARGV[2])}
"""


class RedisResponseCache(ResponseCache):
    """Entries in Redis, shared by every worker and replica. Errors are the caller's (the run
    treats a Redis failure as a miss that stores nothing)."""

    def __init__(self, client: Any, ttl_s: float) -> None:
        self.client = client
        self.ttl_ms = max(1, int(ttl_s * 1000))
        self._lookup = client.register_script(_LOOKUP)

    @staticmethod
    def _names(tenant_id: int) -> tuple[str, str]:
        base = f"gw:{{t:{tenant_id}}}:cache"
        return f"{base}:gen", f"{base}:e"

    def lookup(self, tenant_id: int, model: str, digest: str, read: bool) -> tuple[Slot, Entry | None]:
        gen_key, prefix = self._names(tenant_id)
        tg, mg, raw = self._lookup(keys=[gen_key, prefix], args=[model, digest, "1" if read else "0"])
        slot = Slot(tenant_id, model, digest, (_text(tg), _text(mg)))
        return slot, Entry.decode(raw) if raw else None

    def lookup_admitted(self, tenant_id: int, model: str, digest: str, read: bool, limits: Any,
                        limiter: Any, request_id: str) -> tuple[Slot, Entry | None, Any]:
        """One round trip for the lookup and a hit's requests/min admission when the limiter
        is this Redis (its script's `cache` op: the cache's keys and the key's counters share
        the tenant's hash tag). LimiterUnavailable and Redis errors are the caller's."""
        fused = limiter.cache_admit if limits.rpm else None
        if fused is None:
            return super().lookup_admitted(tenant_id, model, digest, read, limits, limiter, request_id)
        tg, mg, raw, adm = fused(limits, list(self._names(tenant_id)), model, digest, read, request_id)
        return Slot(tenant_id, model, digest, (tg, mg)), Entry.decode(raw) if raw else None, adm

    def store(self, slot: Slot, raw: bytes) -> None:
        _, prefix = self._names(slot.tenant_id)
        tg, mg = slot.generations
        self.client.set(f"{prefix}:{tg}:{mg}:{slot.digest}", raw, px=self.ttl_ms)

    def clear(self, tenant_id: int, model: str | None = None) -> None:
        self.client.hincrby(self._names(tenant_id)[0], model or ALL_MODELS, 1)


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


def build_cache(redis_client: Any, ttl_s: float, max_entries: int,
                monotonic: Callable[[], float]) -> ResponseCache:
    return (RedisResponseCache(redis_client, ttl_s) if redis_client is not None
            else LocalResponseCache(ttl_s, max_entries, monotonic))


CACHE_ERRORS = (redis.RedisError, OSError, ValueError, KeyError, TypeError)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
