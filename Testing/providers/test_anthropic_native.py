"""AnthropicProvider's native Messages calls (the passthrough of `POST /v1/messages`) against the
real HTTP fake: the client's body reaches Anthropic untouched (cache_control, thinking), the
answer and the events come back as Anthropic sent them, usage is normalised for billing, and
errors map onto the taxonomy."""
from __future__ import annotations

import json

import pytest

from Testing.fakes.fake_anthropic import CACHE_CREATION, CACHE_READ, DEFAULT_PIECES, SIGNATURE, THINKING, prompt_tokens
from Testing.fakes.native import provider_settings
from app.providers.anthropic import AnthropicProvider
from app.providers.base import ProviderBadRequest, ProviderRateLimited, ProviderUnavailable

pytestmark = pytest.mark.timeout(30)
SYSTEM = [{"type": "text", "text": "be brief", "cache_control": {"type": "ephemeral"}}]
MESSAGES = [{"role": "user", "content": [{"type": "text", "text": "hello there claude",
                                          "cache_control": {"type": "ephemeral", "ttl": "5m"}}]}]
PROMPT = prompt_tokens({"system": SYSTEM, "messages": MESSAGES})


@pytest.fixture
def provider(fake_anthropic):
    fake_anthropic.reset()
    prov = AnthropicProvider("anthropic", provider_settings("anthropic", fake_anthropic), {})
    yield prov
    prov.close()


def body(**extra) -> dict:
    return {"model": "alias-the-client-used", "max_tokens": 1024, "system": SYSTEM, "messages": MESSAGES, **extra}


def sent(fake) -> tuple[dict, dict]:
    [request] = [r for r in fake.requests() if r["path"] == "/v1/messages"]
    return request["body"], request["headers"]


def test_native_call_sends_the_body_untouched_and_returns_anthropics_answer(provider, fake_anthropic):
    """cache_control, thinking and metadata reach the upstream as sent (only model and stream are
    set); the answer is Anthropic's own bytes, thinking block and signature included."""
    thinking = {"type": "enabled", "budget_tokens": 2048}
    result = provider.messages(body(thinking=thinking, metadata={"user_id": "u-1"}), "claude-cache",
                               beta="prompt-caching-2024-07-31")
    upstream, headers = sent(fake_anthropic)
    assert upstream == {**body(thinking=thinking, metadata={"user_id": "u-1"}), "model": "claude-cache",
                        "stream": False}
    assert headers["anthropic-beta"] == "prompt-caching-2024-07-31"
    answer = json.loads(result.json_bytes())
    assert answer["type"] == "message" and answer["id"].startswith("msg_fake")
    assert answer["content"][0] == {"type": "thinking", "thinking": THINKING, "signature": SIGNATURE}
    assert answer["usage"] == {"input_tokens": PROMPT, "cache_creation_input_tokens": CACHE_CREATION,
                               "cache_read_input_tokens": CACHE_READ, "output_tokens": DEFAULT_PIECES}


def test_native_usage_is_normalised_with_cache_reads_and_writes(provider):
    """For billing: prompt = input + cache writes + cache reads; reads are cached_tokens, writes
    cache_creation_input_tokens."""
    usage = provider.messages(body(), "claude-cache").usage
    prompt = PROMPT + CACHE_CREATION + CACHE_READ
    assert usage == {"prompt_tokens": prompt, "completion_tokens": DEFAULT_PIECES,
                     "total_tokens": prompt + DEFAULT_PIECES, "prompt_tokens_details": {"cached_tokens": CACHE_READ},
                     "cache_creation_input_tokens": CACHE_CREATION}


def test_native_stream_passes_every_event_on(provider, fake_anthropic):
    """Every upstream event is one piece (raw JSON, parsed event); message_start and
    message_delta carry the usage so far, the last one the final usage."""
    pieces = list(provider.messages_stream(body(thinking={"type": "enabled", "budget_tokens": 2048}),
                                           "claude-cache"))
    upstream, _ = sent(fake_anthropic)
    assert upstream["stream"] is True and upstream["system"] == SYSTEM
    kinds = [p.chunk["type"] for p in pieces]
    assert kinds[:5] == ["message_start", "content_block_start", "content_block_delta", "content_block_delta",
                         "content_block_stop"]
    assert kinds[-2:] == ["message_delta", "message_stop"] and "ping" in kinds
    assert all(json.loads(p.raw) == p.chunk for p in pieces)
    assert pieces[3].chunk["delta"] == {"type": "signature_delta", "signature": SIGNATURE}
    with_usage = [p.usage for p in pieces if p.usage is not None]
    prompt = PROMPT + CACHE_CREATION + CACHE_READ
    assert with_usage[0]["prompt_tokens"] == prompt and with_usage[0]["completion_tokens"] == 1
    assert with_usage[-1] == {"prompt_tokens": prompt, "completion_tokens": DEFAULT_PIECES,
                              "total_tokens": prompt + DEFAULT_PIECES,
                              "prompt_tokens_details": {"cached_tokens": CACHE_READ},
                              "cache_creation_input_tokens": CACHE_CREATION}


def test_native_stream_error_event_raises_the_mapped_error(provider):
    stream = provider.messages_stream(body(), "claude-stream-error")
    first = next(stream)
    assert first.chunk["type"] == "message_start"
    with pytest.raises(ProviderRateLimited):
        next(stream)


def test_native_stream_cut_short_is_unavailable(provider):
    with pytest.raises(ProviderUnavailable):
        list(provider.messages_stream(body(), "claude-die-mid-stream"))


@pytest.mark.parametrize("model, error", [("claude-fail-400", ProviderBadRequest),
                                          ("claude-fail-429", ProviderRateLimited),
                                          ("claude-malformed-json", ProviderUnavailable)])
def test_native_errors_map_onto_the_taxonomy(provider, model, error):
    with pytest.raises(error):
        provider.messages(body(), model)


def test_count_tokens_is_anthropics_own_count(provider, fake_anthropic):
    """count_tokens sends only the fields Anthropic's endpoint takes and returns its figure."""
    assert provider.count_tokens(body(thinking={"type": "enabled", "budget_tokens": 1024}, metadata={}),
                                 "claude-test") == PROMPT
    [request] = [r for r in fake_anthropic.requests() if r["path"] == "/v1/messages/count_tokens"]
    assert set(request["body"]) == {"model", "system", "messages", "thinking"}
    with pytest.raises(ProviderUnavailable):
        provider.count_tokens(body(), "claude-fail-500")
