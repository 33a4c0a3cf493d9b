"""`data/models.json`: model aliases -> deployments, prices, context window; validated at start-up.

Any error names the bad entry (`models.gpt-4o.pricing.input_per_mtok: ...`) so an operator can
fix the file without reading code.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

from app.utils.token_counter import SHA256 as KNOWN_TOKENIZERS

MTOK = Decimal(1_000_000)


class CatalogError(ValueError):
    """models.json is unreadable or invalid; the message names the entry."""


# What a model does, and so which endpoint may call it (`kind` in models.json, default chat).
MODEL_KINDS = ("chat", "embedding", "image")


@dataclass(frozen=True)
class Pricing:
    input_per_mtok: Decimal = Decimal(0)
    output_per_mtok: Decimal = Decimal(0)
    # Optional prices of input tokens read from the provider's prompt cache (OpenAI's cached
    # input, Anthropic's cache reads) and written to it (Anthropic's cache creation); unset:
    # the plain input price.
    cached_input_per_mtok: Decimal | None = None
    cache_write_per_mtok: Decimal | None = None
    per_image: Decimal = Decimal(0)                             # USD per generated image
    per_image_by_size: tuple[tuple[str, Decimal], ...] = ()     # ("1024x1024", price) overrides

    def cost(self, prompt_tokens: int, completion_tokens: int, *, cached_tokens: int = 0,
             cache_write_tokens: int = 0) -> Decimal:
        """Exact cost in USD of a request (no float anywhere). `prompt_tokens` counts every input
        token, the cached and cache-written ones included (OpenAI's convention)."""
        cached_price = self.input_per_mtok if self.cached_input_per_mtok is None else self.cached_input_per_mtok
        write_price = self.input_per_mtok if self.cache_write_per_mtok is None else self.cache_write_per_mtok
        fresh = max(prompt_tokens - cached_tokens - cache_write_tokens, 0)
        return (self.input_per_mtok * fresh + cached_price * cached_tokens + write_price * cache_write_tokens
                + self.output_per_mtok * completion_tokens) / MTOK

    def image_price(self, size: str | None) -> Decimal:
        """The price of one image of `size` ("1024x1024"): its own price if the model lists
        one, else `per_image`."""
        for listed, price in self.per_image_by_size:
            if listed == size:
                return price
        return self.per_image


@dataclass(frozen=True)
class Deployment:
    provider: str
    model: str
    priority: int = 1
    weight: int = 1
    rpm: int | None = None
    tpm: int | None = None
    rpd: int | None = None
    # At its quota, a request waits this long (seconds) for a slot, in arrival order, instead
    # of being refused (None: the model's default; 0: refuse at once).
    queue_timeout_s: float | None = None


@dataclass(frozen=True)
class ModelEntry:
    alias: str
    deployments: tuple[Deployment, ...]
    context_window: int
    max_output_tokens: int
    pricing: Pricing
    tokenizer: str = "o200k_base"
    category: str | None = None
    owned_by: str | None = None
    fallbacks: tuple[str, ...] = ()
    extra: dict[str, Any] = field(default_factory=dict)
    # Rank among the models of a category alias (small/big/auto): lower first. Defaults to the
    # best priority of the model's deployments.
    priority: int = 1
    kind: str = "chat"  # chat | embedding | image: the endpoint that may call it
    # Default `queue_timeout_s` of its deployments (0: no waiting).
    queue_timeout_s: float = 0.0
    # The response cache for this model (docs/cache.md): True / False, or None (the default decides).
    cache: bool | None = None

    def queue_timeout_for(self, deployment: Deployment) -> float:
        """How long a request may wait for `deployment`'s quota (0: refused at once)."""
        own = deployment.queue_timeout_s
        return own if own is not None else self.queue_timeout_s


@dataclass(frozen=True)
class Catalog:
    providers: dict[str, dict[str, Any]]
    models: dict[str, ModelEntry]
    created: int = 0

    def get(self, alias: str) -> ModelEntry | None:
        return self.models.get(alias)


def _decimal(value: Any, where: str) -> Decimal:
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise CatalogError(f"{where}: expected a decimal string such as \"0.15\", got {value!r}")
    try:
        result = Decimal(str(value))
    except InvalidOperation as exc:
        raise CatalogError(f"{where}: not a decimal number: {value!r}") from exc
    if not result.is_finite() or result < 0:
        raise CatalogError(f"{where}: must be a non-negative number, got {value!r}")
    return result


def _pos_int(value: Any, where: str, optional: bool = False) -> int | None:
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise CatalogError(f"{where}: must be a positive integer, got {value!r}")
    return value


def _seconds(value: Any, where: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0 or value != value:
        raise CatalogError(f"{where}: must be a non-negative number of seconds, got {value!r}")
    return float(value)


def _deployment(raw: Any, where: str, providers: dict[str, dict]) -> Deployment:
    if not isinstance(raw, dict):
        raise CatalogError(f"{where}: must be an object with 'provider' and 'model'")
    provider, model = raw.get("provider"), raw.get("model")
    if not isinstance(provider, str) or provider not in providers:
        raise CatalogError(f"{where}.provider: {provider!r} is not one of the providers "
                           f"({', '.join(sorted(providers)) or 'none defined'})")
    if not isinstance(model, str) or not model:
        raise CatalogError(f"{where}.model: must be the upstream model id (a non-empty string)")
    return Deployment(
        provider=provider, model=model,
        priority=_pos_int(raw.get("priority", 1), f"{where}.priority") or 1,
        weight=_pos_int(raw.get("weight", 1), f"{where}.weight") or 1,
        rpm=_pos_int(raw.get("rpm"), f"{where}.rpm", optional=True),
        tpm=_pos_int(raw.get("tpm"), f"{where}.tpm", optional=True),
        rpd=_pos_int(raw.get("rpd"), f"{where}.rpd", optional=True),
        queue_timeout_s=_seconds(raw.get("queue_timeout_s"), f"{where}.queue_timeout_s"),
    )


OPTIONAL_PRICES = ("cached_input_per_mtok", "cache_write_per_mtok")
_MODEL_KEYS = {"deployments", "context_window", "max_output_tokens", "pricing", "tokenizer",
               "category", "owned_by", "fallbacks", "priority", "queue_timeout_s", "kind", "cache"}
# Per-provider HTTP timeouts (seconds): connect, read (between two bytes, also the stream's idle
# timeout; `timeout_s` is its older name) and total (the whole upstream call, stream included).
TIMEOUT_KEYS = ("connect_timeout_s", "timeout_s", "read_timeout_s", "total_timeout_s")


def _model(alias: str, raw: Any, providers: dict[str, dict]) -> ModelEntry:
    where = f"models.{alias}"
    if not isinstance(raw, dict):
        raise CatalogError(f"{where}: must be an object")
    deps = raw.get("deployments")
    if not isinstance(deps, list) or not deps:
        raise CatalogError(f"{where}.deployments: must be a non-empty list")
    deployments = tuple(sorted((_deployment(d, f"{where}.deployments[{i}]", providers)
                                for i, d in enumerate(deps)), key=lambda d: d.priority))
    pricing_raw = raw.get("pricing", {})
    if not isinstance(pricing_raw, dict):
        raise CatalogError(f"{where}.pricing: must be an object")
    pricing = _pricing(pricing_raw, f"{where}.pricing")
    kind = raw.get("kind", "chat")
    if kind not in MODEL_KINDS:
        raise CatalogError(f"{where}.kind: must be one of {', '.join(MODEL_KINDS)}, got {kind!r}")
    tokenizer = raw.get("tokenizer", "o200k_base")
    if tokenizer not in KNOWN_TOKENIZERS:
        raise CatalogError(f"{where}.tokenizer: {tokenizer!r} is not shipped in data/tokenizers "
                           f"({', '.join(sorted(KNOWN_TOKENIZERS))})")
    category = raw.get("category")
    if category is not None and kind != "chat":
        raise CatalogError(f"{where}.category: only chat models belong to a category (this one is {kind!r})")
    if category is not None and category not in ("small", "big"):
        raise CatalogError(f"{where}.category: must be \"small\" or \"big\", got {category!r}")
    fallbacks = raw.get("fallbacks", [])
    if not isinstance(fallbacks, list) or not all(isinstance(f, str) for f in fallbacks):
        raise CatalogError(f"{where}.fallbacks: must be a list of model aliases")
    cache = raw.get("cache")
    if cache is not None and not isinstance(cache, bool):
        raise CatalogError(f"{where}.cache: must be true or false, got {cache!r}")
    if cache and kind != "chat":
        raise CatalogError(f"{where}.cache: only chat models' answers are cached (this one is {kind!r})")
    context_window = _pos_int(raw.get("context_window", 8192), f"{where}.context_window")
    max_output = _pos_int(raw.get("max_output_tokens", 4096), f"{where}.max_output_tokens")
    priority = _pos_int(raw.get("priority", min(d.priority for d in deployments)), f"{where}.priority")
    return ModelEntry(
        alias=alias, deployments=deployments, context_window=context_window or 0,
        max_output_tokens=max_output or 0, pricing=pricing, tokenizer=tokenizer,
        category=category, owned_by=raw.get("owned_by"), fallbacks=tuple(fallbacks),
        extra={k: v for k, v in raw.items() if k not in _MODEL_KEYS}, priority=priority or 1,
        queue_timeout_s=_seconds(raw.get("queue_timeout_s"), f"{where}.queue_timeout_s") or 0.0, kind=kind,
        cache=cache,
    )


def _pricing(raw: dict[str, Any], where: str) -> Pricing:
    by_size = raw.get("per_image_by_size", {})
    if not isinstance(by_size, dict) or not all(isinstance(k, str) for k in by_size):
        raise CatalogError(f"{where}.per_image_by_size: must be an object of size (\"1024x1024\") -> price")
    return Pricing(
        input_per_mtok=_decimal(raw.get("input_per_mtok", "0"), f"{where}.input_per_mtok"),
        output_per_mtok=_decimal(raw.get("output_per_mtok", "0"), f"{where}.output_per_mtok"),
        per_image=_decimal(raw.get("per_image", "0"), f"{where}.per_image"),
        per_image_by_size=tuple((size, _decimal(price, f"{where}.per_image_by_size.{size}"))
                                for size, price in by_size.items()),
        **{name: _decimal(raw[name], f"{where}.{name}") for name in OPTIONAL_PRICES if raw.get(name) is not None},
    )


def parse_catalog(data: Any, created: int = 0) -> Catalog:
    if not isinstance(data, dict):
        raise CatalogError("top level: must be an object with 'providers' and 'models'")
    providers = data.get("providers")
    if not isinstance(providers, dict) or not providers:
        raise CatalogError("providers: must be a non-empty object of provider name -> settings")
    for name, cfg in providers.items():
        if not isinstance(cfg, dict) or not isinstance(cfg.get("type"), str):
            raise CatalogError(f"providers.{name}: must be an object with a 'type'")
        for key in TIMEOUT_KEYS:
            value = cfg.get(key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                      or value <= 0):
                raise CatalogError(f"providers.{name}.{key}: must be a positive number of seconds")
    models_raw = data.get("models")
    if not isinstance(models_raw, dict) or not models_raw:
        raise CatalogError("models: must be a non-empty object of alias -> model")
    models = {alias: _model(alias, raw, providers) for alias, raw in models_raw.items()}
    for alias, entry in models.items():
        for fb in entry.fallbacks:
            if fb not in models:
                raise CatalogError(f"models.{alias}.fallbacks: unknown alias {fb!r}")
            if models[fb].kind != entry.kind:
                raise CatalogError(f"models.{alias}.fallbacks: {fb!r} is a {models[fb].kind} model, "
                                   f"{alias!r} a {entry.kind} model")
    return Catalog(providers=providers, models=models, created=created)


def load_catalog(path: str | Path) -> Catalog:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise CatalogError(f"cannot read models file {path}: {exc.strerror}") from exc
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise CatalogError(f"{path}: invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}") from exc
    try:
        return parse_catalog(data, created=int(path.stat().st_mtime))
    except CatalogError as exc:
        raise CatalogError(f"{path}: {exc}") from exc
