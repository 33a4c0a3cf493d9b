"""models.json `kind` (chat, embedding, image) and per-image prices: validated with the bad
entry named, fallbacks of one kind only, provider types that cannot serve a kind refused at
start-up, category aliases made of chat models only."""
from __future__ import annotations

import copy
from decimal import Decimal

import pytest

from app.providers.catalog import CatalogError, parse_catalog
from app.providers.provider_manager import ProviderManager
from app.services.circuit_breaker import BreakerConfig
from app.services.provider_health import HealthBoard
from app.services.retry_policy import RetryPolicy
from app.services.router import Router

BASE = {
    "providers": {
        "openai": {"type": "openai", "base_url": "http://127.0.0.1:9/v1", "api_key_env": "X_KEY"},
        "claude": {"type": "anthropic", "api_key_env": "X_KEY"},
        "sim": {"type": "simulator", "latency_ms": 0},
    },
    "models": {
        "chat": {"deployments": [{"provider": "openai", "model": "gpt-4o-mini"}], "category": "small"},
        "embed": {"deployments": [{"provider": "openai", "model": "text-embedding-3-small"}], "kind": "embedding",
                  "pricing": {"input_per_mtok": "0.02"}},
        "image": {"deployments": [{"provider": "sim", "model": "img"}], "kind": "image",
                  "pricing": {"per_image": "0.04", "per_image_by_size": {"1792x1024": "0.08"}}},
    },
}


def changed(alias: str, **fields) -> dict:
    d = copy.deepcopy(BASE)
    d["models"][alias].update(fields)
    return d


def error_of(d: dict) -> str:
    with pytest.raises(CatalogError) as info:
        ProviderManager(parse_catalog(d))
    return str(info.value)


def test_kinds_default_to_chat_and_image_prices_are_exact():
    catalog = parse_catalog(BASE)
    assert [catalog.models[a].kind for a in ("chat", "embed", "image")] == ["chat", "embedding", "image"]
    pricing = catalog.models["image"].pricing
    assert pricing.image_price("1024x1024") == Decimal("0.04")
    assert pricing.image_price("1792x1024") == Decimal("0.08")
    assert pricing.image_price(None) == Decimal("0.04")
    assert catalog.models["chat"].pricing.image_price("1024x1024") == Decimal(0)


@pytest.mark.parametrize("kind", ["completion", "Embedding", 3])
def test_unknown_kind_is_named(kind):
    assert error_of(changed("embed", kind=kind)).startswith("models.embed.kind: must be one of chat, embedding, image")


@pytest.mark.parametrize("pricing,where", [
    ({"per_image": "-1"}, "models.image.pricing.per_image"),
    ({"per_image": "abc"}, "models.image.pricing.per_image"),
    ({"per_image_by_size": ["1024x1024"]}, "models.image.pricing.per_image_by_size"),
    ({"per_image_by_size": {"1024x1024": True}}, "models.image.pricing.per_image_by_size.1024x1024"),
])
def test_bad_image_prices_are_named(pricing, where):
    assert error_of(changed("image", pricing=pricing)).startswith(where + ":")


def test_fallbacks_must_be_of_the_same_kind():
    assert error_of(changed("embed", fallbacks=["chat"])) == (
        "models.embed.fallbacks: 'chat' is a chat model, 'embed' a embedding model")


def test_only_chat_models_have_a_category():
    assert error_of(changed("embed", category="small")).startswith("models.embed.category: only chat models")


def test_a_provider_type_that_cannot_serve_the_kind_is_refused_at_start_up():
    """An embedding model on an Anthropic provider would fail on every call: refused when the
    file is loaded, naming the model, the provider and what its type serves."""
    message = error_of(changed("embed", deployments=[{"provider": "claude", "model": "claude-x"}]))
    assert message == ("models.embed.deployments: provider 'claude' (type 'anthropic') serves no embedding "
                       "models, only chat")


def test_category_aliases_pick_chat_models_only():
    router = Router(parse_catalog(BASE), HealthBoard(BreakerConfig(failure_threshold=3, cooldown_s=10)),
                    RetryPolicy(base_s=0.1, max_backoff_s=1, deadline_s=30))
    assert [m.alias for m in router.category_models("auto")] == ["chat"]
