"""OpenAICompatibleProvider speaking the Responses API natively ("responses": true) against the
fake upstream: the response object with its usage normalised to chat usage, the event stream
with the usage on its terminal event, and failures mapped onto the taxonomy."""
from __future__ import annotations

from typing import Iterator

import pytest

from Testing.fakes.fake_openai import FakeOpenAI
from app.providers.base import ProviderBadRequest, ProviderUnavailable
from app.providers.openai_compatible import OpenAICompatibleProvider

pytestmark = pytest.mark.timeout(30)


@pytest.fixture
def provider(fake_upstream: FakeOpenAI) -> Iterator[OpenAICompatibleProvider]:
    p = OpenAICompatibleProvider("native", {"base_url": fake_upstream.base_url, "api_key_env": "TEST_UPSTREAM_KEY",
                                            "responses": True}, {})
    yield p
    p.close()


def test_declared_in_models_json_as_a_boolean():
    assert OpenAICompatibleProvider("p", {"base_url": "http://x", "responses": True}, {}).speaks_responses
    assert not OpenAICompatibleProvider("p", {"base_url": "http://x"}, {}).speaks_responses
    with pytest.raises(ValueError, match="providers.p.responses"):
        OpenAICompatibleProvider.validate_settings("p", {"base_url": "http://x", "responses": "yes"})


def test_responses_call_normalises_usage(provider, fake_upstream):
    done = provider.responses({"model": "fake-chunks-3-cached-4-reasoning-2", "input": "hello there",
                               "store": False})
    assert done.body["output"][0]["content"][0]["text"] == "Echo: hello there"
    assert done.usage == {"prompt_tokens": 9, "completion_tokens": 5, "total_tokens": 14,
                          "prompt_tokens_details": {"cached_tokens": 4},
                          "completion_tokens_details": {"reasoning_tokens": 2}}
    sent = fake_upstream.responses_requests()[-1]
    assert sent["path"] == "/v1/responses" and sent["body"]["stream"] is False


def test_responses_stream_ends_with_the_usage_on_the_terminal_event(provider):
    pieces = list(provider.responses_stream({"model": "fake-chunks-2", "input": "hi"}))
    kinds = [p.chunk["type"] for p in pieces]
    assert kinds[0] == "response.created" and kinds[-1] == "response.completed"
    assert [p.usage for p in pieces[:-1]] == [None] * (len(pieces) - 1)
    assert pieces[-1].usage["prompt_tokens"] == 8 and pieces[-1].usage["completion_tokens"] == 2


def test_failures(provider):
    with pytest.raises(ProviderUnavailable):
        provider.responses({"model": "fake-fail-500", "input": "x"})
    with pytest.raises(ProviderBadRequest):
        provider.responses({"model": "fake-fail-400", "input": "x"})
    with pytest.raises(ProviderUnavailable):  # cut mid-stream
        list(provider.responses_stream({"model": "fake-die-mid-stream", "input": "x"}))
