"""Alias -> deployments -> provider instances, created once per process.

Which deployment serves a request (priority, weights, fallbacks, categories, retries, circuit
breakers) is decided by `app/services/router.py`; this module only owns the instances.
"""
from __future__ import annotations

from typing import Any

import app.providers  # noqa: F401  (registers the provider types)
from app.providers.base import Provider, provider_class, registered_types
from app.providers.catalog import Catalog, CatalogError, ModelEntry, load_catalog


class ProviderManager:
    def __init__(self, catalog: Catalog, defaults: dict[str, Any] | None = None) -> None:
        self.catalog = catalog
        self.defaults = defaults or {}
        self._providers: dict[str, Provider] = {}
        for name, settings in catalog.providers.items():
            cls = provider_class(settings["type"])
            if cls is None:
                raise CatalogError(f"providers.{name}.type: unknown type {settings['type']!r} "
                                   f"(known: {', '.join(registered_types())})")
            try:
                cls.validate_settings(name, settings)
            except ValueError as exc:
                raise CatalogError(str(exc)) from exc

    @classmethod
    def from_file(cls, path: str, defaults: dict[str, Any] | None = None) -> "ProviderManager":
        return cls(load_catalog(path), defaults)

    def model(self, alias: str) -> ModelEntry | None:
        return self.catalog.get(alias)

    def provider(self, name: str) -> Provider:
        """The process-wide instance of provider `name` (its connection pool is reused)."""
        inst = self._providers.get(name)
        if inst is None:
            settings = self.catalog.providers[name]
            inst = provider_class(settings["type"])(name, settings, self.defaults)
            self._providers[name] = inst
        return inst

    def provider_type(self, name: str) -> str:
        return str(self.catalog.providers[name]["type"])

    def close(self) -> None:
        for inst in self._providers.values():
            inst.close()
        self._providers.clear()
