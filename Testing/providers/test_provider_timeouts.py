"""Per-provider connect, read and total timeouts (models.json keys), against the real fake
upstream: a hung or trickling upstream never holds a worker longer than configured."""
from __future__ import annotations

import socket
import time

import pytest

from Testing.fakes.fake_openai import FakeOpenAI
from app.providers.base import ProviderTimeout, ProviderUnavailable
from app.providers.catalog import CatalogError, parse_catalog
from app.providers.http_pool import http_timeouts
from app.providers.openai_compatible import OpenAICompatibleProvider

pytestmark = pytest.mark.timeout(30)
MESSAGES = [{"role": "user", "content": "hello"}]


def provider(base_url: str, **settings) -> OpenAICompatibleProvider:
    return OpenAICompatibleProvider("p", {"type": "openai", "base_url": base_url, **settings}, {})


def test_settings_and_defaults():
    """read_timeout_s wins over the older timeout_s; gateway defaults fill what is missing."""
    defaults = {"connect_timeout_s": 7, "read_timeout_s": 70, "total_timeout_s": 700}
    assert http_timeouts({}, defaults) == {"connect_timeout": 7.0, "read_timeout": 70.0, "total_timeout": 700.0}
    assert http_timeouts({"timeout_s": 5, "read_timeout_s": 3, "total_timeout_s": 9, "connect_timeout_s": 1},
                         defaults) == {"connect_timeout": 1.0, "read_timeout": 3.0, "total_timeout": 9.0}
    assert http_timeouts({"timeout_s": 5}, {})["read_timeout"] == 5.0


def test_catalog_rejects_bad_timeouts():
    """A non-positive or non-numeric timeout in models.json names the entry."""
    for bad in (0, -1, "3", True):
        with pytest.raises(CatalogError, match="providers.p.total_timeout_s"):
            parse_catalog({"providers": {"p": {"type": "openai", "base_url": "http://x", "total_timeout_s": bad}},
                           "models": {"m": {"deployments": [{"provider": "p", "model": "m"}]}}})


def test_read_timeout_on_a_hung_upstream(fake_upstream: FakeOpenAI):
    """No byte within the read timeout: ProviderTimeout, not sooner than the read timeout (the
    fake never answers: without the timeout the test's own time limit ends it)."""
    prov = provider(fake_upstream.base_url, read_timeout_s=0.3)
    started = time.monotonic()
    with pytest.raises(ProviderTimeout):
        prov.complete({"model": "fake-hang", "messages": MESSAGES})
    assert time.monotonic() - started > 0.25
    prov.close()


def test_total_timeout_cuts_a_stream_that_keeps_trickling(fake_upstream: FakeOpenAI):
    """A slow stream (an event every 50 ms, never idle long enough for the read timeout) is cut
    by the total timeout with ProviderTimeout, mid-stream."""
    prov = provider(fake_upstream.base_url, read_timeout_s=5, total_timeout_s=0.4)
    pieces = 0
    with pytest.raises(ProviderTimeout):
        for _ in prov.stream({"model": "fake-slow", "messages": MESSAGES}):
            pieces += 1
    assert 1 <= pieces < 23  # cut mid-stream: the fake's slow stream has 23 events over > 1 s
    prov.close()


def test_total_timeout_shorter_than_read_bounds_the_wait_for_headers(fake_upstream: FakeOpenAI):
    """When the total timeout is shorter than the read timeout, it also bounds the wait for
    the answer's headers; the pooled connection keeps its read timeout for the next call."""
    # `fake-hang` never answers and the read timeout (an hour) is far past this file's pytest
    # timeout: only the total timeout can end the wait, with no clock read by the test.
    prov = provider(fake_upstream.base_url, read_timeout_s=3600, total_timeout_s=0.3)
    with pytest.raises(ProviderTimeout):
        prov.complete({"model": "fake-hang", "messages": MESSAGES})
    prov.complete({"model": "gpt-4o-mini", "messages": MESSAGES})
    [conn] = prov.pool._idle
    assert conn.sock.gettimeout() == 3600
    prov.close()


def test_connect_refused_is_unavailable_and_fast():
    """Nothing listening: ProviderUnavailable at once (retryable, so the router moves on)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    prov = provider(f"http://127.0.0.1:{port}/v1", connect_timeout_s=0.5)
    with pytest.raises(ProviderUnavailable) as err:  # a timeout would be ProviderTimeout
        prov.complete({"model": "x", "messages": MESSAGES})
    assert err.value.retryable
