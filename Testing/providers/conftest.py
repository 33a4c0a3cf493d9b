"""The fake upstreams (real HTTP servers) for the adapter tests of this directory."""
import pytest

from Testing.fakes.native import (fake_anthropic, fake_gemini, fake_gigachat, fake_ollama,  # noqa: F401
                                  fake_pollinations)
from app.providers.openai_compatible import OpenAICompatibleProvider


@pytest.fixture
def openai_provider(fake_upstream):
    """An `openai`-type provider on the fake OpenAI upstream (its recorded requests reset)."""
    fake_upstream.reset()
    prov = OpenAICompatibleProvider("openai", {"type": "openai", "base_url": fake_upstream.base_url,
                                               "api_key_env": "TEST_UPSTREAM_KEY", "timeout_s": 5}, {})
    yield prov
    prov.close()
