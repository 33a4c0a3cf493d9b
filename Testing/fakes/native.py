"""Fixtures starting the fake native providers (import them into a test module to use them)."""
from __future__ import annotations

from typing import Any, Iterator

import pytest

from Testing.fakes.fake_anthropic import FakeAnthropic
from Testing.fakes.fake_gemini import FakeGemini
from Testing.fakes.fake_gigachat import FakeGigaChat
from Testing.fakes.fake_ollama import FakeOllama
from Testing.fakes.fake_pollinations import FakePollinations
from Testing.support import UPSTREAM_KEY

KEY_ENV = "TEST_UPSTREAM_KEY"  # set to UPSTREAM_KEY by Testing/conftest.py


@pytest.fixture(scope="session")
def fake_anthropic() -> Iterator[FakeAnthropic]:
    with FakeAnthropic(UPSTREAM_KEY) as fake:
        yield fake


@pytest.fixture(scope="session")
def fake_gemini() -> Iterator[FakeGemini]:
    with FakeGemini(UPSTREAM_KEY) as fake:
        yield fake


@pytest.fixture(scope="session")
def fake_ollama() -> Iterator[FakeOllama]:
    with FakeOllama() as fake:
        yield fake


@pytest.fixture(scope="session")
def fake_pollinations() -> Iterator[FakePollinations]:
    with FakePollinations() as fake:
        yield fake


@pytest.fixture(scope="session")
def fake_gigachat() -> Iterator[FakeGigaChat]:
    with FakeGigaChat(UPSTREAM_KEY) as fake:
        yield fake


def provider_settings(kind: str, fake: Any) -> dict:
    """The models.json entry of provider type `kind` pointed at `fake`."""
    settings = {"type": kind, "base_url": fake.base_url, "timeout_s": 2, "connect_timeout_s": 2,
                "headers": {"X-Extra": "1"}}
    if kind != "ollama":
        settings["api_key_env"] = KEY_ENV
    if kind == "gigachat":
        settings["auth_url"] = fake.auth_url
    return settings
