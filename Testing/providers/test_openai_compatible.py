"""OpenAICompatibleProvider against the real HTTP fake of the OpenAI API: what it sends, what
it returns, and how upstream failures map onto the provider error taxonomy."""
from __future__ import annotations

import json
import threading
import time
from typing import Iterator

import pytest

from Testing.fakes.fake_openai import DEFAULT_CHUNKS, FakeOpenAI, expected_content, prompt_tokens_for
from Testing.support import UPSTREAM_KEY, free_port, wait_until
from app.providers.base import (Completion, ProviderAuthError, ProviderBadRequest,
                                ProviderContextTooLong, ProviderError, ProviderRateLimited,
                                ProviderTimeout, ProviderUnavailable, StreamPiece, redact)
from app.providers.openai_compatible import HTTPStream, OpenAICompatibleProvider

pytestmark = pytest.mark.timeout(30)

MESSAGES = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello there gateway"}]


def make_provider(base_url: str, **overrides) -> OpenAICompatibleProvider:
    settings = {"type": "openai", "base_url": base_url, "api_key_env": "TEST_UPSTREAM_KEY",
                "timeout_s": 2, "headers": {"X-Extra": "1"}, **overrides}
    return OpenAICompatibleProvider("openai", settings, {})


@pytest.fixture
def provider(fake_upstream: FakeOpenAI) -> Iterator[OpenAICompatibleProvider]:
    fake_upstream.reset()
    prov = make_provider(fake_upstream.base_url)
    yield prov
    prov.close()


def request(model: str = "gpt-4o-mini", **extra) -> dict:
    return {"model": model, "messages": [dict(m) for m in MESSAGES], **extra}


def expected_usage(messages=MESSAGES, completion: int = DEFAULT_CHUNKS) -> dict:
    prompt = prompt_tokens_for(messages)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def run(provider: OpenAICompatibleProvider, call: str, body: dict):
    """complete() or a fully consumed stream()."""
    result = getattr(provider, call)(body)
    return list(result) if call == "stream" else result


def subset(usage: dict) -> dict:
    return {k: usage[k] for k in ("prompt_tokens", "completion_tokens", "total_tokens")}


# --- what is sent -----------------------------------------------------------------------------

def test_complete_sends_path_auth_extra_header_and_unmodified_body(provider, fake_upstream):
    """complete() POSTs the client's body unchanged (unknown fields too) with the upstream key and extra headers."""
    body = request(temperature=0.3, some_future_field={"nested": [1, 2]}, user="u-1")
    provider.complete(body)
    [sent] = fake_upstream.chat_requests()
    assert sent["method"] == "POST"
    assert sent["path"] == "/v1/chat/completions"
    assert sent["headers"]["authorization"] == f"Bearer {UPSTREAM_KEY}"
    assert sent["headers"]["x-extra"] == "1"
    assert sent["headers"]["content-type"] == "application/json"
    assert sent["body"] == body
    assert "stream" not in sent["body"]


def test_complete_does_not_mutate_the_request_dict(provider):
    """complete() leaves the caller's request dict as it was."""
    body = request(stream_options={"include_usage": False})
    before = json.loads(json.dumps(body))
    provider.complete(body)
    assert body == before


def test_stream_adds_stream_true_and_include_usage_keeping_other_stream_options(provider, fake_upstream):
    """stream() sends stream:true and stream_options.include_usage:true, keeping the client's other options and fields."""
    body = request(stream_options={"continuous_usage_stats": True, "include_usage": False}, custom_x=7)
    original = json.loads(json.dumps(body))
    list(provider.stream(body))
    [sent] = fake_upstream.chat_requests()
    assert sent["path"] == "/v1/chat/completions"
    assert sent["headers"]["authorization"] == f"Bearer {UPSTREAM_KEY}"
    assert sent["headers"]["x-extra"] == "1"
    assert sent["body"]["stream"] is True
    assert sent["body"]["stream_options"] == {"continuous_usage_stats": True, "include_usage": True}
    assert sent["body"]["custom_x"] == 7
    assert {k: v for k, v in sent["body"].items() if k not in ("stream", "stream_options")} == \
        {k: v for k, v in original.items() if k != "stream_options"}
    assert body == original, "the caller's request dict was modified"


def test_stream_without_client_stream_options(provider, fake_upstream):
    """stream() adds stream_options.include_usage when the client sent no stream_options at all."""
    list(provider.stream(request()))
    [sent] = fake_upstream.chat_requests()
    assert sent["body"]["stream_options"] == {"include_usage": True}


def test_no_authorization_header_without_optional_key(fake_upstream, monkeypatch):
    """A server whose key is optional (key_required: false) is called without an Authorization
    header when the key is unset (never 'Bearer None')."""
    monkeypatch.delenv("TEST_UPSTREAM_KEY_MISSING", raising=False)
    fake_upstream.reset()
    prov = make_provider(fake_upstream.base_url, api_key_env="TEST_UPSTREAM_KEY_MISSING", key_required=False)
    try:
        assert prov.missing_configuration() == []
        prov.complete(request())
    finally:
        prov.close()
    [sent] = fake_upstream.chat_requests()
    assert "authorization" not in sent["headers"]


def test_unset_required_key_is_not_configured(fake_upstream, monkeypatch):
    """With its key variable unset the provider makes no call and names the variable (503)."""
    from app.errors import from_provider_error
    from app.providers.base import ProviderNotConfigured
    monkeypatch.delenv("TEST_UPSTREAM_KEY_MISSING", raising=False)
    fake_upstream.reset()
    prov = make_provider(fake_upstream.base_url, api_key_env="TEST_UPSTREAM_KEY_MISSING")
    try:
        for call in ("complete", "stream"):
            with pytest.raises(ProviderNotConfigured) as info:
                run(prov, call, request())
            assert "TEST_UPSTREAM_KEY_MISSING" in info.value.message
            assert from_provider_error(info.value).status == 503
    finally:
        prov.close()
    assert fake_upstream.chat_requests() == []


def test_base_url_from_environment(fake_upstream, monkeypatch):
    """`${VAR}` in base_url is read from the environment (a local server's address, Cloudflare's
    account id); unset, the provider is not configured and names the variable."""
    from app.providers.base import ProviderNotConfigured
    monkeypatch.setenv("TEST_FAKE_HOST_PORT", f"127.0.0.1:{fake_upstream.port}")
    monkeypatch.delenv("TEST_FAKE_UNSET_ACCOUNT", raising=False)
    fake_upstream.reset()
    prov = make_provider("http://${TEST_FAKE_HOST_PORT}/v1")
    try:
        prov.complete(request())
    finally:
        prov.close()
    assert len(fake_upstream.chat_requests()) == 1
    prov = make_provider("http://127.0.0.1:1/accounts/${TEST_FAKE_UNSET_ACCOUNT}/v1")
    try:
        assert prov.missing_configuration() == ["TEST_FAKE_UNSET_ACCOUNT"]
        with pytest.raises(ProviderNotConfigured):
            prov.complete(request())
    finally:
        prov.close()


# --- what is returned -------------------------------------------------------------------------

def test_complete_returns_completion_with_fake_usage(provider):
    """complete() returns a Completion whose usage and body are the upstream's."""
    result = provider.complete(request())
    assert isinstance(result, Completion)
    assert subset(result.usage) == expected_usage()
    body = json.loads(result.json_bytes())
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"]["content"] == expected_content(MESSAGES)
    assert body["usage"] == result.usage


def test_complete_honours_max_tokens(provider):
    """max_tokens reaches the upstream: the usage reports the capped completion."""
    result = provider.complete(request(max_tokens=4))
    assert subset(result.usage) == expected_usage(completion=4)
    assert result.body["choices"][0]["finish_reason"] == "length"


def test_stream_yields_valid_chunks_then_usage_only_piece(provider):
    """stream() yields StreamPiece objects of valid chunk JSON, the last one usage_only with the usage."""
    pieces = list(provider.stream(request()))
    assert all(isinstance(p, StreamPiece) for p in pieces)
    chunks = [json.loads(p.data()) for p in pieces]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    last = pieces[-1]
    assert last.usage_only is True
    assert subset(last.usage) == expected_usage()
    assert chunks[-1]["choices"] == []
    assert not any(p.usage_only for p in pieces[:-1])
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks[:-1])
    assert text == expected_content(MESSAGES)
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
    # role chunk + 20 content + finish + usage; [DONE] is not a piece
    assert len(pieces) == DEFAULT_CHUNKS + 3


def test_stream_returns_abortable_http_stream(provider):
    """stream() returns an HTTPStream (iterator with abort())."""
    stream = provider.stream(request(model="fake-chunks-3"))
    assert isinstance(stream, HTTPStream)
    assert len(list(stream)) == 3 + 3


# --- errors -----------------------------------------------------------------------------------

@pytest.mark.parametrize("call", ["complete", "stream"])
def test_fail_500_is_unavailable_and_retryable(provider, call):
    """An upstream 500 becomes ProviderUnavailable, retryable."""
    with pytest.raises(ProviderUnavailable) as info:
        run(provider, call, request("fake-fail-500"))
    assert info.value.retryable is True
    assert info.value.upstream_status == 500


@pytest.mark.parametrize("call", ["complete", "stream"])
def test_fail_429_is_rate_limited_with_retry_after(provider, call):
    """An upstream 429 becomes ProviderRateLimited carrying Retry-After (1 s)."""
    with pytest.raises(ProviderRateLimited) as info:
        run(provider, call, request("fake-fail-429"))
    assert info.value.retry_after == 1
    assert info.value.retryable is True
    assert info.value.upstream_status == 429


def test_fail_401_is_auth_error_not_retryable(provider):
    """An upstream 401 becomes ProviderAuthError, not retryable, with the key-looking text redacted."""
    with pytest.raises(ProviderAuthError) as info:
        provider.complete(request("fake-fail-401"))
    assert info.value.retryable is False
    assert "sk-fake" not in str(info.value) and "sk-fake" not in info.value.message
    assert UPSTREAM_KEY not in str(info.value)


def test_fail_400_is_bad_request(provider):
    """An upstream 400 becomes ProviderBadRequest (not the context-length subclass), keeping the message."""
    with pytest.raises(ProviderBadRequest) as info:
        provider.complete(request("fake-fail-400"))
    assert type(info.value) is ProviderBadRequest
    assert info.value.retryable is False
    assert "fail-400" in info.value.message


@pytest.mark.parametrize("call", ["complete", "stream"])
def test_context_too_long(provider, call):
    """context_length_exceeded becomes ProviderContextTooLong."""
    with pytest.raises(ProviderContextTooLong) as info:
        run(provider, call, request("fake-context-too-long"))
    assert info.value.code == "context_length_exceeded"


def test_hang_times_out_after_read_timeout(provider):
    """An upstream that never answers raises ProviderTimeout after timeout_s (2 s), not sooner
    (the fake never answers: without the timeout the test's own time limit ends it)."""
    started = time.monotonic()
    with pytest.raises(ProviderTimeout):
        provider.complete(request("fake-hang"))
    assert time.monotonic() - started >= 1.8


def test_closed_port_is_unavailable():
    """A refused connection (nothing listening) is ProviderUnavailable, not a timeout."""
    prov = make_provider(f"http://127.0.0.1:{free_port()}/v1")
    try:
        with pytest.raises(ProviderError) as info:
            prov.complete(request())
        assert type(info.value) is ProviderUnavailable, f"{type(info.value).__name__}: {info.value}"
    finally:
        prov.close()


def test_die_mid_stream_raises_unavailable_after_some_pieces(provider):
    """A stream cut without [DONE] yields the pieces received, then raises ProviderUnavailable."""
    got = []
    with pytest.raises(ProviderUnavailable):
        for piece in provider.stream(request("fake-die-mid-stream")):
            got.append(piece)
    assert 1 <= len(got) <= 5
    for piece in got:
        json.loads(piece.data())


def test_die_mid_stream_non_streaming_is_unavailable(provider):
    """A connection closed without any answer (non-streaming) is ProviderUnavailable."""
    with pytest.raises(ProviderUnavailable):
        provider.complete(request("fake-die-mid-stream"))


def test_error_messages_never_contain_the_upstream_key(provider, monkeypatch):
    """No provider error message carries the upstream key, whatever the failure."""
    for model in ("fake-fail-500", "fake-fail-429", "fake-fail-401", "fake-fail-400",
                  "fake-context-too-long"):
        with pytest.raises(ProviderError) as info:
            provider.complete(request(model))
        assert UPSTREAM_KEY not in str(info.value) and UPSTREAM_KEY not in repr(info.value.args)


@pytest.mark.parametrize("text,secret", [
    ("Incorrect API key provided: sk-abc123456", "sk-abc"),
    ("Incorrect API key provided: sk-proj-AbC_dEf-123456789. See docs.", "sk-proj"),
    ("header was Authorization: Bearer abcdef.ghijk", "abcdef"),
    ("GET https://x/y?key=AIzaSyA1234567890abcdef&alt=sse", "AIzaSy"),
])
def test_redact_removes_keys(text, secret):
    """redact() removes anything that looks like a credential from an upstream message."""
    out = redact(text)
    assert secret not in out
    assert "[redacted]" in out


def test_redact_removes_the_real_upstream_key():
    """redact() removes the test suite's upstream key when an upstream echoes it."""
    out = redact(f"Incorrect API key provided: {UPSTREAM_KEY}.")
    assert UPSTREAM_KEY not in out and "sk-upstream" not in out


# --- abort ------------------------------------------------------------------------------------

def test_abort_from_another_thread_unblocks_the_reader(provider):
    """HTTPStream.abort() from another thread ends a consumer blocked reading a slow stream."""
    stream = provider.stream(request("fake-slow"))  # 23 events, 50 ms apart (> 1 s in total)
    first = next(stream)
    json.loads(first.data())
    outcome: dict = {}

    def consume() -> None:
        count = 0
        try:
            for _ in stream:
                count += 1
                outcome["reading"] = True  # blocked in the next read from here on
        except ProviderError as exc:
            outcome["error"] = exc
        except Exception as exc:  # noqa: BLE001 - anything else is a failure of the test
            outcome["unexpected"] = exc
        outcome["count"] = count
        outcome["ended"] = True

    reader = threading.Thread(target=consume, daemon=True)
    reader.start()
    wait_until(lambda: outcome.get("reading"), message="the reader to read a piece")
    stream.abort()
    reader.join(timeout=30)
    assert not reader.is_alive(), "the reader was not unblocked by abort()"
    assert "unexpected" not in outcome, repr(outcome.get("unexpected"))
    assert outcome["count"] < DEFAULT_CHUNKS + 2  # the stream did not run to its end: abort() ended it
