"""The response cache's parts on their own: the decision (request > key > model > default, the
temperature/tools rule, Cache-Control), the canonical request digest, the stream assembler and
its replay, and both stores: in process (TTL on the injected clock, LRU bound, clearing) and
Redis, on a plain server and on a real 3-master Redis Cluster (one slot per tenant)."""
from __future__ import annotations

import json
from decimal import Decimal

import pytest
import redis

from app.extensions import make_redis
from app.providers.base import StreamPiece
from app.services.rate_limit_service import KeyLimits, LocalLimiter, RateLimitService, RedisLimiter
from app.services.cache_answers import AnswerBuilder, complete_answer, replay_body, replay_pieces
from app.services.response_cache import (CacheAsk, CacheUse, Entry, HotEntries, LocalResponseCache, RedisResponseCache,
                                         Slot, decide, request_digest)
from Testing.support import REDIS_URL, FakeClock

pytestmark = pytest.mark.timeout(60)
BODY = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
ON, READ_WRITE = CacheAsk(mode="on"), CacheUse(read=True, write=True)


def use(ask: CacheAsk = CacheAsk(), key: bool | None = None, model: bool | None = None, default: bool = False,
        body: dict | None = None, max_temperature: float = 1.0) -> CacheUse | None:
    return decide(ask, key, model, default, body or BODY, max_temperature)


def test_the_first_that_says_decides():
    """The request's header, then the key's setting, then the model's, then the default."""
    assert use() is None and use(default=True) == READ_WRITE
    assert use(model=True) == READ_WRITE and use(model=False, default=True) is None
    assert use(key=True, model=False) == READ_WRITE and use(key=False, model=True) is None
    assert use(ON, key=False) == READ_WRITE and use(CacheAsk(mode="off"), key=True, model=True, default=True) is None


def test_answers_that_vary_are_cached_only_when_the_request_asks():
    """Temperature above the threshold (absent counts as 1.0), tools or functions: only with an
    explicit `on`; logprobs never."""
    hot = {**BODY, "temperature": 1.2}
    assert use(key=True, body=hot) is None and use(ON, body=hot) == READ_WRITE
    assert use(key=True, body={**BODY, "temperature": 1.0}) == READ_WRITE
    assert use(key=True, max_temperature=0.5) is None                        # absent: 1.0 > 0.5
    assert use(key=True, body={**BODY, "temperature": 0}, max_temperature=0.5) == READ_WRITE
    tools = {**BODY, "tools": [{"type": "function", "function": {"name": "f"}}]}
    assert use(key=True, body=tools) is None and use(ON, body=tools) == READ_WRITE
    assert use(key=True, body={**BODY, "functions": [{"name": "f"}]}) is None
    assert use(ON, body={**BODY, "logprobs": True}) is None


def test_cache_control():
    """no-cache: write without reading; no-store: neither (even when asked on)."""
    assert use(CacheAsk(no_cache=True), key=True) == CacheUse(read=False, write=True)
    assert use(CacheAsk(mode="on", no_store=True)) is None


def test_the_digest_is_of_the_canonical_request():
    """Field order does not matter; streaming, user and metadata do not count; every other field
    (model, temperature, messages) does."""
    same = {"messages": [{"content": "hi", "role": "user"}], "model": "m", "stream": True,
            "stream_options": {"include_usage": True}, "user": "u1", "metadata": {"a": "b"}}
    assert request_digest(same) == request_digest(BODY)
    assert request_digest({**BODY, "model": "n"}) != request_digest(BODY)
    assert request_digest({**BODY, "temperature": 0}) != request_digest(BODY)
    assert request_digest({**BODY, "messages": [{"role": "user", "content": "hi "}]}) != request_digest(BODY)


def chunk(delta: dict, finish: str | None = None, index: int = 0, raw: bool = True) -> StreamPiece:
    data = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 7, "model": "up",
            "choices": [{"index": index, "delta": delta, "finish_reason": finish}]}
    return StreamPiece(raw=json.dumps(data).encode()) if raw else StreamPiece(chunk=data)


USAGE = {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}


def test_a_stream_is_assembled_into_its_final_answer_and_replayed():
    """Text, tool calls and two choices are put together from raw and parsed chunks; the
    replay gives the same text as chunks, then the usage chunk."""
    builder = AnswerBuilder(10_000)
    for piece in (chunk({"role": "assistant", "content": ""}), chunk({"content": "Hel"}, raw=False),
                  chunk({"content": "lo"}), chunk({"content": "B"}, index=1),
                  chunk({"tool_calls": [{"index": 0, "id": "call_1", "type": "function",
                                         "function": {"name": "f", "arguments": "{\"a\""}}]}, index=1),
                  chunk({"tool_calls": [{"index": 0, "function": {"arguments": ": 1}"}}]}, index=1),
                  chunk({}, "stop"), chunk({}, "tool_calls", index=1)):
        builder.feed(piece)
    body = builder.answer(USAGE)
    assert body["choices"] == [
        {"index": 0, "message": {"role": "assistant", "content": "Hello"}, "logprobs": None, "finish_reason": "stop"},
        {"index": 1, "message": {"role": "assistant", "content": "B", "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{\"a\": 1}"}}]},
         "logprobs": None, "finish_reason": "tool_calls"}]
    assert body["usage"] == USAGE and body["object"] == "chat.completion" and complete_answer(body)
    replayed = replay_body(Entry(body, Decimal("0.1"), "m"), 100)
    assert replayed["created"] == 100 and replayed["id"] != body["id"]
    pieces = list(replay_pieces(replayed))
    texts = [p.chunk["choices"][0]["delta"].get("content") for p in pieces if p.chunk["choices"]]
    assert texts == ["Hello", None, "B", None]
    assert pieces[-1].usage_only and pieces[-1].usage == USAGE and pieces[-1].flush
    assert [p.chunk["choices"][0]["finish_reason"] for p in pieces[:-1]] == [None, "stop", None, "tool_calls"]


def test_unfinished_too_large_or_unreadable_streams_give_no_answer():
    """No finish_reason (cut short), past the byte bound, or a chunk that is not JSON: None."""
    cut = AnswerBuilder(10_000)
    cut.feed(chunk({"content": "Hel"}))
    assert cut.answer(USAGE) is None
    big = AnswerBuilder(100)
    for piece in (chunk({"content": "x" * 80}), chunk({}, "stop")):
        big.feed(piece)
    assert big.answer(USAGE) is None
    bad = AnswerBuilder(10_000)
    for piece in (StreamPiece(raw=b"not json"), chunk({}, "stop")):
        bad.feed(piece)
    assert bad.answer(USAGE) is None
    assert not complete_answer({"choices": [{"message": {"content": "x"}, "finish_reason": None}]})


ANSWER = {"id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "m", "usage": USAGE,
          "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}]}


def exercise(cache) -> None:
    """What both stores must do: a miss, then a hit; tenants apart; a model's clear leaves the
    other models; a tenant's clear all of them; an answer stored with the generations read
    before a clear is not found after it."""
    raw = Entry(ANSWER, Decimal("0.00123"), "m").encode()
    slot, found = cache.lookup(1, "m", "d1", True)
    assert found is None
    cache.store(slot, raw)
    cache.store(cache.lookup(1, "n", "d2", True)[0], raw)
    assert cache.lookup(1, "m", "d1", True)[1] == Entry(ANSWER, Decimal("0.00123"), "m")
    assert cache.lookup(1, "m", "d1", False)[1] is None            # not read when told not to
    assert cache.lookup(2, "m", "d1", True)[1] is None             # another tenant
    cache.clear(1, "m")
    assert cache.lookup(1, "m", "d1", True)[1] is None and cache.lookup(1, "n", "d2", True)[1] is not None
    stale, _ = cache.lookup(1, "n", "d3", True)
    cache.clear(1)
    cache.store(stale, raw)                                         # made before the clear
    assert cache.lookup(1, "n", "d2", True)[1] is None and cache.lookup(1, "n", "d3", True)[1] is None
    cache.store(cache.lookup(1, "n", "d2", True)[0], raw)
    assert cache.lookup(1, "n", "d2", True)[1] is not None


def test_the_in_process_store():
    """Embedded mode: the behaviour of both stores, entries expiring on the injected clock,
    and the least recently used dropped past the bound."""
    clock = FakeClock()
    cache = LocalResponseCache(ttl_s=60, max_entries=2, monotonic=clock.monotonic)
    exercise(cache)
    raw = Entry(ANSWER, Decimal(0), "m").encode()
    cache.store(cache.lookup(5, "m", "a", True)[0], raw)
    clock.advance(59)
    assert cache.lookup(5, "m", "a", True)[1] is not None
    clock.advance(1)
    assert cache.lookup(5, "m", "a", True)[1] is None
    for digest in ("a", "b"):
        cache.store(cache.lookup(5, "m", digest, True)[0], raw)
    cache.lookup(5, "m", "a", True)                                 # a is now the most recent
    cache.store(cache.lookup(5, "m", "c", True)[0], raw)
    assert [cache.lookup(5, "m", d, True)[1] is not None for d in "abc"] == [True, False, True]


@pytest.fixture
def plain_redis():
    client = make_redis(REDIS_URL, 4)
    client.flushdb()
    yield client
    client.close()


def test_the_redis_store(plain_redis):
    """Redis: the same behaviour; entries carry the TTL; a lookup is one script call."""
    exercise(RedisResponseCache(plain_redis, ttl_s=30))
    names = [n.decode() for n in plain_redis.keys("gw:{t:1}:cache:e:*")]
    assert names and all(0 < plain_redis.pttl(n) <= 30_000 for n in names)
    assert plain_redis.hgetall("gw:{t:1}:cache:gen") == {b"m": b"1", b"*": b"1"}


def counted_lookups(cache: RedisResponseCache) -> list[int]:
    """Script calls (Redis round trips) of the cache's lookups from now on."""
    calls = [0]
    script = cache._lookup

    def counted(**kw):
        calls[0] += 1
        return script(**kw)
    cache._lookup = counted
    return calls


def test_hot_copies_answer_repeats_without_redis(plain_redis):
    """With hot copies a worker answers an entry it stored or served without asking Redis,
    until the copy's age limit or the entry's own expiry (whichever is first); never while its
    clear listener is down; a clear drops its copies here and is published for the others."""
    clock, live, published = FakeClock(), [True], []
    hot = HotEntries(max_entries=10, max_age_s=5, monotonic=clock.monotonic, live=lambda: live[0])
    cache = RedisResponseCache(plain_redis, ttl_s=30, hot=hot,
                               publish=lambda event, **fields: published.append((event, fields)))
    exercise(cache)                                                  # the same behaviour as without
    calls = counted_lookups(cache)
    raw = Entry(ANSWER, Decimal("0.5"), "m").encode()
    cache.store(cache.lookup(3, "m", "q", True)[0], raw)
    assert calls == [1]
    assert cache.lookup(3, "m", "q", True)[1] == Entry(ANSWER, Decimal("0.5"), "m") and calls == [1]
    clock.advance(4.9)
    assert cache.lookup(3, "m", "q", True)[1] is not None and calls == [1]
    clock.advance(0.1)                                               # the copy is 5 s old: Redis again
    assert cache.lookup(3, "m", "q", True)[1] is not None and calls == [2]
    assert cache.lookup(3, "m", "q", True)[1] is not None and calls == [2]  # copied again by that read
    live[0] = False
    assert cache.lookup(3, "m", "q", True)[1] is not None and calls == [3]
    live[0] = True
    # an entry with 2 s left in Redis is copied for those 2 s, not for the 5 s age limit
    [name] = plain_redis.keys("gw:{t:3}:cache:e:*")
    plain_redis.pexpire(name, 2000)
    hot.drop()
    assert cache.lookup(3, "m", "q", True)[1] is not None and calls == [4]
    clock.advance(2)
    assert cache.lookup(3, "m", "q", True)[1] is not None and calls == [5]
    # a clear: the copies of that tenant and model go at once, and the other workers are told
    cache.clear_tenants([3], "m")
    assert cache.lookup(3, "m", "q", True)[1] is None and calls == [6]
    cache.clear_tenants([1, 2, 3], every_tenant=True)
    assert published == [("cache-cleared", {"tenants": [3], "model": "m"}),
                         ("cache-cleared", {"tenants": None, "model": None})]


def test_hot_copies_on_their_own():
    """The copies: least recently used dropped past the bound; a clear (here, or another
    worker's event) drops exactly the tenants and model it names, anything unreadable all; a
    slot looked up before a clear is never copied after it."""
    clock = FakeClock()
    hot = HotEntries(max_entries=2, max_age_s=60, monotonic=clock.monotonic, live=lambda: True)

    def slot(tenant: int, model: str, digest: str) -> Slot:
        return Slot(tenant, model, digest, ("0", "0"), hot.epoch)

    for s in (slot(1, "m", "a"), slot(1, "m", "b")):
        hot.put(s, b"x", 60)
    assert hot.get(1, "m", "a") is not None                          # a is now the most recent
    hot.put(slot(1, "n", "c"), b"x", 60)
    assert [hot.get(1, m, d) is not None for m, d in (("m", "a"), ("m", "b"), ("n", "c"))] == [True, False, True]
    hot.on_event({"event": "cache-cleared", "tenants": [1], "model": "n"})
    assert [hot.get(1, m, d) is not None for m, d in (("m", "a"), ("n", "c"))] == [True, False]
    hot.put(slot(2, "m", "z"), b"x", 60)
    hot.on_event({"event": "cache-cleared", "tenants": [2], "model": None})
    assert [hot.get(1, "m", "a") is not None, hot.get(2, "m", "z") is not None] == [True, False]
    hot.on_event({"event": "cache-cleared", "tenants": "garbage"})
    assert hot.get(1, "m", "a") is None
    before = slot(1, "m", "a")
    hot.drop([9])                                                    # any clear in between
    hot.put(before, b"x", 60)
    assert hot.get(1, "m", "a") is None


def test_the_redis_store_on_a_cluster(redis_cluster):
    """A tenant's generations and entries share its hash tag: lookups (a script reading both),
    stores and clears run on a 3-master Redis Cluster, for tenants on different masters."""
    client = make_redis(redis_cluster.url, 4)
    try:
        cache = RedisResponseCache(client, ttl_s=30)
        exercise(cache)
        raw = Entry(ANSWER, Decimal(0), "m").encode()
        for tenant in range(1, 40):
            cache.store(cache.lookup(tenant, "m", "x", True)[0], raw)
        assert all(cache.lookup(tenant, "m", "x", True)[1] is not None for tenant in range(1, 40))
        assert sum(redis_cluster.node(p).dbsize() > 0 for p in redis_cluster.ports) == 3
    finally:
        client.close()


def test_redis_errors_reach_the_caller():
    """An unreachable Redis raises a redis error (the run then goes on without the cache)."""
    client = redis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.5)
    with pytest.raises(redis.RedisError):
        RedisResponseCache(client, ttl_s=30).lookup(1, "m", "d", True)


def counting(limiter: RedisLimiter) -> list[int]:
    """Round trips the limiter makes from now on (one per `_execute`: one write, one read)."""
    calls = [0]
    execute = limiter._execute

    def counted(commands):
        calls[0] += 1
        return execute(commands)
    limiter._execute = counted
    return calls


def zero_seed(*_) -> dict[str, int]:
    """Nothing used this day or month yet (the usage store a miss's admission seeds from)."""
    return {"day": 0, "key_spend": 0, "tenant_spend": 0}


HIT_LIMITS = KeyLimits(key_id=7, tenant_id=1, rpm=3, tpm=1000, daily_tokens=5000, max_concurrent=1,
                       key_budget_nano=10**9)


def test_with_redis_a_hit_is_looked_up_and_admitted_in_one_round_trip(plain_redis):
    """A hit of a key with a requests/min limit: the lookup and the hit's admission are one
    script call; the admission is on requests/min only (no lease, no tokens, no money); a miss
    counts nothing; requests/min stays exact when hits of one worker and misses admitted by
    another share it (two limiters on one Redis): the fourth request in the minute is refused,
    hit or not."""
    worker_a, worker_b = RedisLimiter(plain_redis, 30_000), RedisLimiter(plain_redis, 30_000)
    service_a, service_b = RateLimitService(worker_a, zero_seed), RateLimitService(worker_b, zero_seed)
    cache = RedisResponseCache(plain_redis, ttl_s=30)
    raw = Entry(ANSWER, Decimal("0.5"), "m").encode()
    cache.store(cache.lookup(1, "m", "hot", True)[0], raw)
    trips = counting(worker_a)
    slot, found, adm = cache.lookup_admitted(1, "m", "cold", True, HIT_LIMITS, service_a, "r0")
    assert (found, adm, trips[0]) == (None, None, 1) and slot.generations == ("0", "0")
    assert plain_redis.exists("gw:{t:1}:k:7:rpm") == 0                      # a miss counted nothing
    _, found, adm = cache.lookup_admitted(1, "m", "hot", True, HIT_LIMITS, service_a, "r1")
    assert found == Entry(ANSWER, Decimal("0.5"), "m") and trips[0] == 2
    assert adm.admitted and adm.limits == KeyLimits(key_id=7, tenant_id=1, rpm=3)
    assert (adm.tokens, adm.cost_nano) == (0, 0) and adm.headers["x-ratelimit-remaining-requests"] == "2"
    assert plain_redis.exists("gw:{t:1}:k:7:lease") == 0                    # no concurrency slot
    assert service_b.admit(HIT_LIMITS, "r2", 10, 0).admitted                # a miss on the other worker
    _, found, adm = cache.lookup_admitted(1, "m", "hot", True, HIT_LIMITS, service_a, "r3")
    assert found is not None and adm.admitted and adm.headers["x-ratelimit-remaining-requests"] == "0"
    _, found, adm = cache.lookup_admitted(1, "m", "hot", True, HIT_LIMITS, service_a, "r4")
    assert found is not None and not adm.admitted and adm.reason == "rpm" and adm.retry_after_ms > 0
    assert not service_b.admit(HIT_LIMITS, "r5", 10, 0).admitted            # a miss is refused too
    _, found, adm = cache.lookup_admitted(1, "m", "hot", False, HIT_LIMITS, service_a, "r6")
    assert (found, adm) == (None, None)                                      # no-cache: not read


def test_in_process_a_hit_is_admitted_on_requests_per_minute_only():
    """Embedded mode (no Redis): the same rules in two steps: a hit is admitted on requests/min
    only, a key without a requests/min limit admits a hit without the limiter."""
    clock = FakeClock()
    service = RateLimitService(LocalLimiter(30_000, clock=lambda: clock.now().timestamp()), zero_seed)
    cache = LocalResponseCache(ttl_s=30, max_entries=10, monotonic=clock.monotonic)
    cache.store(cache.lookup(1, "m", "hot", True)[0], Entry(ANSWER, Decimal(0), "m").encode())
    admitted = [cache.lookup_admitted(1, "m", "hot", True, HIT_LIMITS, service, f"r{i}")[2].admitted
                for i in range(4)]
    assert admitted == [True, True, True, False]
    unlimited = KeyLimits(key_id=8, tenant_id=1, max_concurrent=1)
    _, found, adm = cache.lookup_admitted(1, "m", "hot", True, unlimited, service, "r9")
    assert found is not None and adm is None


def test_the_fused_lookup_on_a_cluster(redis_cluster):
    """On a 3-master Redis Cluster the lookup and the hit's admission are still one script call
    (the cache's keys and the key's counters share the tenant's hash tag), for tenants on
    different masters."""
    client = make_redis(redis_cluster.url, 4)
    try:
        service = RateLimitService(RedisLimiter(client, 30_000), zero_seed)
        cache = RedisResponseCache(client, ttl_s=30)
        raw = Entry(ANSWER, Decimal(0), "m").encode()
        for tenant in range(1, 20):
            cache.store(cache.lookup(tenant, "m", "x", True)[0], raw)
            limits = KeyLimits(key_id=tenant, tenant_id=tenant, rpm=1, max_concurrent=1)
            results = [cache.lookup_admitted(tenant, "m", "x", True, limits, service, f"r{i}") for i in range(2)]
            assert [r[1] is not None for r in results] == [True, True]
            assert [r[2].admitted for r in results] == [True, False]
    finally:
        client.close()
