"""The shipped data/models.json: every preset validates, and which models are offered depends
only on which provider variables are set (nothing is offered that cannot be called)."""
from __future__ import annotations

import json
import re

import pytest

from app.config import ROOT_DIR
from app.providers.base import redact
from app.providers.provider_manager import ProviderManager

MODELS_FILE = ROOT_DIR / "data" / "models.json"
RAW = json.loads(MODELS_FILE.read_text())


def variables() -> set[str]:
    """Every variable the shipped providers read (keys and ${VAR} in base URLs)."""
    names = set()
    for settings in RAW["providers"].values():
        if settings.get("api_key_env"):
            names.add(settings["api_key_env"])
        names.update(re.findall(r"\$\{(\w+)\}", str(settings.get("base_url", ""))))
    return names


@pytest.fixture
def no_provider_env(monkeypatch):
    for name in variables():
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_every_seed_provider_has_a_preset():
    """The providers the product names all have a preset of the right type."""
    types = {name: s["type"] for name, s in RAW["providers"].items()}
    for name in ("openai", "groq", "openrouter", "deepseek", "together", "mistral", "cloudflare",
                 "pollinations", "gpt4all", "g4f", "vllm", "lmstudio"):
        assert types[name] == "openai", name
    for name in ("anthropic", "gemini", "ollama", "gigachat"):
        assert types[name] == name
    assert RAW["providers"]["openrouter"]["headers"].keys() == {"HTTP-Referer", "X-Title"}
    assert "${CLOUDFLARE_ACCOUNT_ID}" in RAW["providers"]["cloudflare"]["base_url"]
    used = {d["provider"] for m in RAW["models"].values() for d in m["deployments"]}
    assert used == set(RAW["providers"]), "every preset provider is used by at least one alias"


def test_without_variables_only_the_simulator_is_offered(no_provider_env):
    """With no provider variable set (a fresh machine) the file loads and only the simulator's
    `demo`, `demo-embed` and `demo-image` are usable; every other alias names the variables it
    is missing (the Pollinations image API too, although it has an anonymous tier)."""
    manager = ProviderManager.from_file(str(MODELS_FILE))
    try:
        offered = [a for a, e in manager.catalog.models.items() if not manager.missing_configuration(e)]
        assert offered == ["demo", "demo-embed", "demo-image"]
        assert manager.missing_configuration(manager.catalog.models["pollinations-flux"]) == ["POLLINATIONS_API_KEY"]
        entry = manager.catalog.models["cf-llama-3.1-8b"]
        assert manager.missing_configuration(entry) == ["CLOUDFLARE_ACCOUNT_ID", "CLOUDFLARE_API_TOKEN"]
        assert manager.missing_configuration(manager.catalog.models["ollama-llama3.2"]) == ["OLLAMA_BASE_URL"]
    finally:
        manager.close()


def test_setting_a_key_offers_that_providers_models(no_provider_env):
    """Setting GEMINI_API_KEY offers the Gemini aliases; a partly configured alias keeps only its
    configured deployments (llama-3.3-70b served by OpenRouter when only its key is set)."""
    no_provider_env.setenv("GEMINI_API_KEY", "AIza-test")
    no_provider_env.setenv("OPENROUTER_API_KEY", "sk-or-test")
    manager = ProviderManager.from_file(str(MODELS_FILE))
    try:
        offered = {a for a, e in manager.catalog.models.items() if not manager.missing_configuration(e)}
        assert {"gemini-2.5-flash", "gemini-2.5-pro", "gemini-embedding-001", "llama-3.3-70b", "demo", "demo-embed",
                "demo-image"} == offered
        assert [d.provider for d in manager.model("llama-3.3-70b").deployments] == ["openrouter"]
        assert [d.provider for d in manager.model("llama-3.1-8b").deployments] == ["groq"]
    finally:
        manager.close()


def test_redact_covers_basic_credentials():
    """A GigaChat-style Basic authorization key in an upstream message is removed."""
    assert "ZXhhbXBsZQ==" not in redact("header Authorization: Basic ZXhhbXBsZQ== was refused")
