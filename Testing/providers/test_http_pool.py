"""The upstream connection pool (app/providers/http_pool.py): UPSTREAM_POOL_MAXSIZE bounds the
idle connections kept for reuse, never the calls in flight, so thousands of long streams per
worker each get their own upstream connection (bench/long_streams.py, docs/benchmark.md)."""
from __future__ import annotations

import json

from app.config import Settings
from app.providers.http_pool import HTTPPool
from app.runtime import build_runtime

BODY = json.dumps({"model": "gpt-4o-mini", "stream": True,
                   "messages": [{"role": "user", "content": "one two three"}]}).encode()
HEADERS = {"Content-Type": "application/json", "Authorization": "Bearer sk-test"}


def test_calls_in_flight_are_not_capped_by_the_pool_size(fake_upstream):
    """Ten streams open at once through a pool of size 2: ten connections, all answered 200;
    once the streams are read to their end, two connections stay idle for reuse and the other
    eight are closed."""
    pool = HTTPPool(fake_upstream.base_url, connect_timeout=5, read_timeout=5, maxsize=2)
    try:
        answers = [pool.post("/chat/completions", BODY, HEADERS) for _ in range(10)]
        assert [a.status for a in answers] == [200] * 10
        assert len({id(a._conn) for a in answers}) == 10
        for answer in answers:
            answer.drain()
        assert len(pool._idle) == 2
    finally:
        pool.close()


def test_the_pool_size_setting_reaches_every_http_provider():
    """UPSTREAM_POOL_MAXSIZE=3 is the size of the pool of every provider that talks HTTP."""
    settings = Settings.from_env({"UPSTREAM_POOL_MAXSIZE": "3",
                                  "DATABASE_URL": "postgresql://postgres@127.0.0.1:5432/postgres"})
    rt = build_runtime(settings)
    try:
        sizes = {name: rt.providers.provider(name).pool.maxsize
                 for name in ("openai", "groq", "anthropic", "gemini", "ollama", "gigachat")}
        assert sizes == {"openai": 3, "groq": 3, "anthropic": 3, "gemini": 3, "ollama": 3, "gigachat": 3}
    finally:
        rt.close()
