"""models.json parsing: the shipped file loads, every error names the bad entry, prices are
exact decimals; ProviderManager checks provider types and their settings."""
from __future__ import annotations

import copy
import json
from decimal import Decimal

import pytest

from app.config import ROOT_DIR
from app.providers.catalog import (Catalog, CatalogError, Pricing, load_catalog, parse_catalog)
from app.providers.provider_manager import ProviderManager

SHIPPED = ROOT_DIR / "data" / "models.json"

BASE = {
    "providers": {
        "openai": {"type": "openai", "base_url": "http://127.0.0.1:9/v1", "api_key_env": "X_KEY"},
        "sim": {"type": "simulator", "latency_ms": 0},
    },
    "models": {
        "small": {"deployments": [{"provider": "openai", "model": "gpt-4o-mini"}],
                  "pricing": {"input_per_mtok": "0.15", "output_per_mtok": "0.60"},
                  "tokenizer": "o200k_base", "category": "small"},
        "demo": {"deployments": [{"provider": "sim", "model": "demo"}], "fallbacks": ["small"]},
    },
}


def data(**model_changes) -> dict:
    """BASE with the `small` model's fields replaced (None deletes)."""
    d = copy.deepcopy(BASE)
    for k, v in model_changes.items():
        if v is None:
            d["models"]["small"].pop(k, None)
        else:
            d["models"]["small"][k] = v
    return d


def error_of(d) -> str:
    with pytest.raises(CatalogError) as info:
        parse_catalog(d)
    return str(info.value)


# --- valid files ------------------------------------------------------------------------------

def test_shipped_models_file_loads():
    """data/models.json (the shipped file) is valid and every model has a deployment."""
    cat = load_catalog(SHIPPED)
    assert isinstance(cat, Catalog)
    assert "demo" in cat.models and cat.models
    for alias, entry in cat.models.items():
        assert entry.alias == alias and entry.deployments
        assert all(d.provider in cat.providers for d in entry.deployments)
        assert entry.pricing.input_per_mtok >= 0 and isinstance(entry.pricing.input_per_mtok, Decimal)
    assert cat.created > 0


def test_shipped_models_file_builds_a_provider_manager():
    """The shipped file also passes ProviderManager's provider checks."""
    manager = ProviderManager.from_file(str(SHIPPED))
    entry = manager.model("demo")
    assert entry is not None
    provider = manager.provider(entry.deployments[0].provider)
    assert provider.type == manager.provider_type(entry.deployments[0].provider) == "simulator"
    manager.close()


def test_testing_models_file_loads(models_file):
    """Testing's generated models file parses, with its prices and scripted aliases."""
    cat = load_catalog(models_file)
    assert cat.models["gpt-4o-mini"].pricing == Pricing(Decimal("0.15"), Decimal("0.60"))
    assert cat.models["fail-500"].deployments[0].model == "fake-fail-500"
    assert cat.models["fail-500"].tokenizer == "cl100k_base"
    assert cat.models["demo"].tokenizer == "o200k_base"  # the default
    ProviderManager(cat).close()


def test_parse_valid_dict_and_defaults():
    """A minimal valid catalog parses with the documented defaults."""
    cat = parse_catalog(copy.deepcopy(BASE))
    demo = cat.get("demo")
    assert demo.fallbacks == ("small",)
    assert demo.context_window == 8192 and demo.max_output_tokens == 4096
    assert demo.pricing == Pricing(Decimal(0), Decimal(0))
    assert demo.deployments[0].priority == 1 and demo.deployments[0].weight == 1
    assert cat.get("nope") is None


def test_deployments_sorted_by_priority():
    """Deployments come out ordered by priority (lowest number first), whatever the file order."""
    d = data(deployments=[{"provider": "openai", "model": "c", "priority": 3},
                          {"provider": "sim", "model": "a", "priority": 1},
                          {"provider": "openai", "model": "b", "priority": 2}])
    entry = parse_catalog(d).models["small"]
    assert [dep.model for dep in entry.deployments] == ["a", "b", "c"]


def test_unknown_model_fields_are_kept_in_extra():
    """Fields the catalog does not model are kept in `extra`, not dropped or rejected."""
    entry = parse_catalog(data(description="hello")).models["small"]
    assert entry.extra == {"description": "hello"}


# --- errors name the bad entry --------------------------------------------------------------

def test_unknown_provider_in_deployment():
    """A deployment naming an undefined provider is rejected at models.X.deployments[i].provider."""
    msg = error_of(data(deployments=[{"provider": "nope", "model": "m"}]))
    assert "models.small.deployments[0].provider" in msg
    assert "'nope'" in msg


def test_second_deployment_is_named_by_its_index():
    """The index in the error is the bad deployment's own index."""
    msg = error_of(data(deployments=[{"provider": "openai", "model": "m"},
                                     {"provider": "ghost", "model": "m"}]))
    assert "models.small.deployments[1].provider" in msg


@pytest.mark.parametrize("price", ["abc", -1, "-0.5", True, None, [], "NaN", "Infinity", {}])
def test_bad_price_is_named(price):
    """A price that is not a non-negative finite decimal is rejected at models.X.pricing.input_per_mtok."""
    msg = error_of(data(pricing={"input_per_mtok": price, "output_per_mtok": "1"}))
    assert msg.startswith("models.small.pricing.input_per_mtok")


def test_bad_output_price_is_named():
    """The output price is checked and named too."""
    msg = error_of(data(pricing={"input_per_mtok": "1", "output_per_mtok": "x"}))
    assert "models.small.pricing.output_per_mtok" in msg


@pytest.mark.parametrize("price,expected", [("0.15", Decimal("0.15")), (2, Decimal(2)),
                                            (0.1, Decimal("0.1")), ("0", Decimal(0))])
def test_valid_prices_are_exact_decimals(price, expected):
    """Valid prices (strings, ints, floats) become exact Decimals (0.1 stays 0.1, not a float artefact)."""
    entry = parse_catalog(data(pricing={"input_per_mtok": price})).models["small"]
    assert entry.pricing.input_per_mtok == expected


@pytest.mark.parametrize("deps", [[], None, "openai", {}])
def test_empty_or_missing_deployments(deps):
    """Empty or missing deployments are rejected at models.X.deployments."""
    msg = error_of(data(deployments=deps) if deps is not None else data(deployments=None))
    assert msg.startswith("models.small.deployments")


def test_deployment_without_model():
    """A deployment with no upstream model id is rejected at ...deployments[0].model."""
    msg = error_of(data(deployments=[{"provider": "openai"}]))
    assert "models.small.deployments[0].model" in msg


@pytest.mark.parametrize("field,value", [("priority", 0), ("weight", -2), ("rpm", "10"), ("tpm", True)])
def test_bad_deployment_numbers(field, value):
    """Deployment priority/weight/limits must be positive integers, named in the error."""
    msg = error_of(data(deployments=[{"provider": "openai", "model": "m", field: value}]))
    assert f"models.small.deployments[0].{field}" in msg


def test_unknown_tokenizer():
    """A tokenizer that is not shipped is rejected at models.X.tokenizer, listing the shipped ones."""
    msg = error_of(data(tokenizer="p50k_base"))
    assert "models.small.tokenizer" in msg
    assert "o200k_base" in msg and "cl100k_base" in msg


@pytest.mark.parametrize("category", ["medium", "", 1])
def test_bad_category(category):
    """A category other than small/big is rejected at models.X.category."""
    assert "models.small.category" in error_of(data(category=category))


def test_unknown_fallback_alias():
    """A fallback naming an alias that does not exist is rejected at models.X.fallbacks."""
    d = copy.deepcopy(BASE)
    d["models"]["demo"]["fallbacks"] = ["small", "ghost"]
    msg = error_of(d)
    assert "models.demo.fallbacks" in msg and "'ghost'" in msg


@pytest.mark.parametrize("field,value", [("context_window", 0), ("max_output_tokens", "4096"),
                                         ("context_window", 1.5)])
def test_bad_token_limits(field, value):
    """context_window / max_output_tokens must be positive integers, named in the error."""
    assert f"models.small.{field}" in error_of(data(**{field: value}))


@pytest.mark.parametrize("doc,where", [
    ([], "top level"), ({"models": BASE["models"]}, "providers"),
    ({"providers": BASE["providers"], "models": {}}, "models"),
    ({"providers": {"x": {"base_url": "http://a"}}, "models": BASE["models"]}, "providers.x"),
])
def test_structural_errors(doc, where):
    """A wrong top-level shape is rejected, naming the part."""
    assert error_of(copy.deepcopy(doc)).startswith(where)


def test_invalid_json_file_reports_line_and_column(tmp_path):
    """An invalid JSON file is rejected with its path, line and column."""
    path = tmp_path / "models.json"
    path.write_text('{\n  "providers": {},\n  "models": {,}\n}\n')
    with pytest.raises(CatalogError) as info:
        load_catalog(path)
    msg = str(info.value)
    assert str(path) in msg
    assert "line 3" in msg and "column 14" in msg


def test_missing_file(tmp_path):
    """A missing file is a CatalogError naming the path (not a raw OSError)."""
    path = tmp_path / "absent.json"
    with pytest.raises(CatalogError) as info:
        load_catalog(path)
    assert str(path) in str(info.value)


def test_load_catalog_prefixes_errors_with_the_path(tmp_path):
    """Errors of a loaded file carry its path and the entry."""
    path = tmp_path / "models.json"
    path.write_text(json.dumps(data(tokenizer="nope")))
    with pytest.raises(CatalogError) as info:
        load_catalog(path)
    assert str(info.value).startswith(f"{path}: models.small.tokenizer")


def test_catalog_error_is_a_value_error():
    """CatalogError is a ValueError (callers catching ValueError still see it)."""
    assert issubclass(CatalogError, ValueError)


# --- money ------------------------------------------------------------------------------------

def test_pricing_cost_exact():
    """Pricing.cost is exact Decimal arithmetic, no float anywhere."""
    p = Pricing(Decimal("0.15"), Decimal("0.60"))
    assert p.cost(1_000_000, 0) == Decimal("0.15")
    assert p.cost(0, 1_000_000) == Decimal("0.60")
    assert p.cost(1, 1) == Decimal("0.00000075")
    assert isinstance(p.cost(3, 7), Decimal)
    assert Pricing(Decimal("0.0375"), Decimal(0)).cost(1, 0) == Decimal("0.0000000375")
    assert sum((p.cost(1, 0) for _ in range(3)), Decimal(0)) == Decimal("0.00000045")
    assert Pricing().cost(123, 456) == 0


def test_pricing_from_catalog_is_exact():
    """A price parsed from JSON costs exactly (0.1 per Mtok * 3 tokens = 3e-7)."""
    entry = parse_catalog(data(pricing={"input_per_mtok": "0.1", "output_per_mtok": 0.2})).models["small"]
    assert entry.pricing.cost(3, 3) == Decimal("0.0000009")


# --- ProviderManager --------------------------------------------------------------------------

def test_provider_manager_rejects_unknown_type():
    """An unknown provider type is rejected, naming the provider and listing the known types."""
    d = copy.deepcopy(BASE)
    d["providers"]["weird"] = {"type": "bogus"}
    with pytest.raises(CatalogError) as info:
        ProviderManager(parse_catalog(d))
    msg = str(info.value)
    assert "providers.weird.type" in msg and "'bogus'" in msg
    assert "openai" in msg and "simulator" in msg


@pytest.mark.parametrize("base_url", ["ftp://example.com/v1", "api.openai.com/v1", "", None, 42])
def test_provider_manager_rejects_bad_base_url(base_url):
    """An openai provider without an http(s) base_url is rejected at providers.X.base_url."""
    d = copy.deepcopy(BASE)
    if base_url is None:
        del d["providers"]["openai"]["base_url"]
    else:
        d["providers"]["openai"]["base_url"] = base_url
    with pytest.raises(CatalogError) as info:
        ProviderManager(parse_catalog(d))
    assert "providers.openai.base_url" in str(info.value)


def test_provider_manager_rejects_bad_headers():
    """An openai provider whose headers are not an object is rejected at providers.X.headers."""
    d = copy.deepcopy(BASE)
    d["providers"]["openai"]["headers"] = ["X-A: 1"]
    with pytest.raises(CatalogError) as info:
        ProviderManager(parse_catalog(d))
    assert "providers.openai.headers" in str(info.value)


def test_provider_manager_reuses_provider_instances():
    """provider(name) returns one instance per provider (its connection pool is shared)."""
    manager = ProviderManager(parse_catalog(copy.deepcopy(BASE)))
    try:
        assert manager.provider("openai") is manager.provider("openai")
        assert manager.provider("sim") is not manager.provider("openai")
    finally:
        manager.close()


def test_queue_timeout_of_a_deployment_and_its_models_default():
    """`queue_timeout_s` on the model is the default of its deployments; a deployment's own
    value (0 too) wins; absent everywhere: 0 (refuse at once)."""
    deps = [{"provider": "openai", "model": "a", "rpm": 5}, {"provider": "openai", "model": "b", "queue_timeout_s": 0},
            {"provider": "openai", "model": "c", "queue_timeout_s": 2.5}]
    entry = parse_catalog(data(deployments=deps, queue_timeout_s=10)).models["small"]
    assert [entry.queue_timeout_for(d) for d in entry.deployments] == [10.0, 0.0, 2.5]
    assert "queue_timeout_s" not in entry.extra
    plain = parse_catalog(data()).models["small"]
    assert plain.queue_timeout_for(plain.deployments[0]) == 0.0


@pytest.mark.parametrize("value", [-1, "5", True])
def test_bad_queue_timeout_is_named(value):
    deps = [{"provider": "openai", "model": "a", "queue_timeout_s": value}]
    with pytest.raises(CatalogError, match=r"models\.small\.deployments\[0\]\.queue_timeout_s"):
        parse_catalog(data(deployments=deps))
