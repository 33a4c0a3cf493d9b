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
  final `chat.completion` object (a stream is assembled: `AnswerBuilder`), with what it cost; at
  most `RESPONSE_CACHE_MAX_ENTRY_BYTES`. It is replayed as that object or as chunks.

The decision whether a request uses the cache (`decide`) and the run's use of it live in
app/services/completion.py; the request headers are read by the controllers (app/api/cache_controller.py).
"""
from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Callable, Iterator, Optional

import redis

from app.providers.base import StreamPiece

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


# -- answers ---------------------------------------------------------------------------------------

def complete_answer(body: Any) -> bool:
    """A chat.completion worth storing: choices, each one finished (never a cut answer)."""
    if not isinstance(body, dict):
        return False
    choices = body.get("choices")
    return (isinstance(choices, list) and bool(choices)
            and all(isinstance(c, dict) and c.get("finish_reason") and isinstance(c.get("message"), dict)
                    for c in choices))


class AnswerBuilder:
    """The final chat.completion object of a stream, built from its chunks as they pass (text,
    refusals and tool calls per choice). Gives up (`too_big`) past `max_bytes` of chunks."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.size = 0
        self.too_big = False
        self.head: dict[str, Any] = {}
        self.choices: dict[int, dict[str, Any]] = {}
        self.usage: dict[str, Any] | None = None

    def feed(self, piece: StreamPiece) -> None:
        """Add one chunk. Never raises: a chunk it cannot read makes the answer unusable."""
        if self.too_big:
            return
        raw = piece.raw
        self.size += len(raw) if raw is not None else 256
        try:
            chunk = piece.chunk if piece.chunk is not None else json.loads(raw or b"{}")
        except ValueError:
            chunk = None
        if self.size > self.max_bytes or not isinstance(chunk, dict):
            self.too_big = True
            self.choices.clear()
            return
        try:
            self._chunk(chunk)
        except (AttributeError, TypeError, ValueError):
            self.too_big = True
            self.choices.clear()

    def _chunk(self, chunk: dict[str, Any]) -> None:
        if not self.head:
            self.head = {k: chunk[k] for k in ("id", "created", "model", "system_fingerprint") if k in chunk}
        if isinstance(chunk.get("usage"), dict):
            self.usage = chunk["usage"]
        for choice in chunk.get("choices") or ():
            if isinstance(choice, dict):
                self._choice(choice)

    def _choice(self, choice: dict[str, Any]) -> None:
        index = choice.get("index", 0)
        acc = self.choices.setdefault(index, {"role": "assistant", "content": [], "refusal": [],
                                              "tools": {}, "finish_reason": None})
        delta = choice.get("delta") or {}
        if isinstance(delta.get("role"), str):
            acc["role"] = delta["role"]
        if isinstance(delta.get("content"), str):
            acc["content"].append(delta["content"])
        if isinstance(delta.get("refusal"), str):
            acc["refusal"].append(delta["refusal"])
        for call in delta.get("tool_calls") or ():
            slot = acc["tools"].setdefault(call.get("index", 0), {"id": None, "type": "function",
                                                                 "name": [], "arguments": []})
            if call.get("id"):
                slot["id"] = call["id"]
            function = call.get("function") or {}
            if isinstance(function.get("name"), str):
                slot["name"].append(function["name"])
            if isinstance(function.get("arguments"), str):
                slot["arguments"].append(function["arguments"])
        if choice.get("finish_reason"):
            acc["finish_reason"] = choice["finish_reason"]

    def answer(self, usage: dict[str, Any] | None) -> dict[str, Any] | None:
        """The chat.completion object, or None when it is not a complete answer."""
        if self.too_big or not self.choices:
            return None
        choices = []
        for index in sorted(self.choices):
            acc = self.choices[index]
            message: dict[str, Any] = {"role": acc["role"], "content": "".join(acc["content"]) or None}
            if acc["refusal"]:
                message["refusal"] = "".join(acc["refusal"])
            if acc["tools"]:
                message["tool_calls"] = [
                    {"id": t["id"], "type": t["type"],
                     "function": {"name": "".join(t["name"]), "arguments": "".join(t["arguments"])}}
                    for _, t in sorted(acc["tools"].items())]
            choices.append({"index": index, "message": message, "logprobs": None,
                            "finish_reason": acc["finish_reason"]})
        body = {"id": self.head.get("id"), "object": "chat.completion", "created": self.head.get("created"),
                "model": self.head.get("model"), "choices": choices, "usage": self.usage or usage}
        if self.head.get("system_fingerprint"):
            body["system_fingerprint"] = self.head["system_fingerprint"]
        return body if complete_answer(body) else None


def replay_body(entry: Entry, created: int) -> dict[str, Any]:
    """The stored answer as a new chat.completion (its own id and time)."""
    return {**entry.body, "id": "chatcmpl-" + uuid.uuid4().hex, "created": created}


def replay_pieces(body: dict[str, Any]) -> Iterator[Optional[StreamPiece]]:
    """The answer as the chunks of a stream: per choice its role and whole text (and tool
    calls), then its finish_reason; then a usage chunk (sent only to clients that asked)."""
    head = {"id": body["id"], "object": "chat.completion.chunk", "created": body["created"],
            "model": body.get("model")}
    if body.get("system_fingerprint"):
        head["system_fingerprint"] = body["system_fingerprint"]
    for choice in body["choices"]:
        message = choice.get("message") or {}
        delta: dict[str, Any] = {"role": message.get("role", "assistant"), "content": message.get("content") or ""}
        if message.get("refusal"):
            delta["refusal"] = message["refusal"]
        if message.get("tool_calls"):
            delta["tool_calls"] = [{"index": i, **call} for i, call in enumerate(message["tool_calls"])]
        index = choice.get("index", 0)
        yield StreamPiece(chunk={**head, "choices": [{"index": index, "delta": delta, "finish_reason": None}]},
                          flush=False)
        yield StreamPiece(chunk={**head, "choices": [{"index": index, "delta": {},
                                                      "finish_reason": choice["finish_reason"]}]}, flush=False)
    usage = body.get("usage")
    yield StreamPiece(chunk={**head, "choices": [], "usage": usage}, usage=usage, usage_only=True)
