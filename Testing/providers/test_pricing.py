"""Prices of cached input and cache writes: billed at their own price when models.json gives
one, at the plain input price otherwise; validated like every price."""
from __future__ import annotations

from decimal import Decimal

import pytest

from app.providers.catalog import CatalogError, Pricing, parse_catalog
from app.services.settlement_service import usage_details


def catalog_with(pricing: dict):
    return parse_catalog({"providers": {"p": {"type": "openai", "base_url": "http://x"}},
                          "models": {"m": {"deployments": [{"provider": "p", "model": "m"}], "pricing": pricing}}})


def test_anthropic_cache_reads_and_writes_at_their_prices():
    """claude-sonnet-4's prices: 1000 fresh input at $3, 2000 cache reads at $0.30, 500 cache
    writes at $3.75, 100 output at $15 (per million)."""
    pricing = catalog_with({"input_per_mtok": "3.00", "output_per_mtok": "15.00", "cached_input_per_mtok": "0.30",
                            "cache_write_per_mtok": "3.75"}).models["m"].pricing
    cost = pricing.cost(3500, 100, cached_tokens=2000, cache_write_tokens=500)
    assert cost == Decimal("0.006975")  # 0.003 + 0.0006 + 0.001875 + 0.0015


def test_openai_cached_input_at_its_price():
    pricing = Pricing(Decimal("0.15"), Decimal("0.60"), cached_input_per_mtok=Decimal("0.075"))
    assert pricing.cost(1000, 10, cached_tokens=600) == Decimal("0.000111")  # 400*.15 + 600*.075 + 10*.6


def test_without_cache_prices_every_input_token_is_plain_input():
    pricing = catalog_with({"input_per_mtok": "1", "output_per_mtok": "2"}).models["m"].pricing
    assert pricing.cached_input_per_mtok is None and pricing.cache_write_per_mtok is None
    assert pricing.cost(1000, 10, cached_tokens=600, cache_write_tokens=100) == Decimal("0.00102")
    assert pricing.cost(1000, 10) == Decimal("0.00102")


def test_bad_cache_price_names_the_entry():
    with pytest.raises(CatalogError, match=r"models.m.pricing.cache_write_per_mtok"):
        catalog_with({"input_per_mtok": "1", "cache_write_per_mtok": "cheap"})


def test_usage_details_read_openai_and_anthropic_cache_tokens():
    """(cached, written, reasoning) from OpenAI's details and the normalised Anthropic usage."""
    assert usage_details({"prompt_tokens": 10, "prompt_tokens_details": {"cached_tokens": 4},
                          "cache_creation_input_tokens": 3}) == (4, 3, None)
