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
from app.services.cache_answers import AnswerBuilder, complete_answer, replay_body, replay_pieces
from app.services.response_cache import (CacheAsk, CacheUse, Entry, LocalResponseCache, RedisResponseCache, decide,
                                         request_digest)
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
