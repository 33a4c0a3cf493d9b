"""Alias -> deployments -> provider instances, created once per process.

Which deployment serves a request (priority, weights, fallbacks, categories, retries, circuit
breakers) is decided by `app/services/router.py`; this module only owns the instances.
"""
from __future__ import annotations

from dataclasses import replace
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
        # Output cap of each upstream model, for protocols that require one (Anthropic).
        self._caps: dict[str, dict[str, int]] = {}
        for entry in catalog.models.values():
            for dep in entry.deployments:
                self._caps.setdefault(dep.provider, {}).setdefault(dep.model, entry.max_output_tokens)

    @classmethod
    def from_file(cls, path: str, defaults: dict[str, Any] | None = None) -> "ProviderManager":
        return cls(load_catalog(path), defaults)

    def model(self, alias: str) -> ModelEntry | None:
        """The alias with only the deployments whose provider is configured (its environment
        variables are set); unchanged when none is, so that the call names what is missing."""
        entry = self.catalog.get(alias)
        if entry is None or len(entry.deployments) == 1:
            return entry
        usable = tuple(d for d in entry.deployments if not self.unconfigured(d.provider))
        if usable and len(usable) != len(entry.deployments):
            return replace(entry, deployments=usable)
        return entry

    def missing_configuration(self, entry: ModelEntry) -> list[str]:
        """The unset variables that keep every deployment of `entry` from being used ([] when
        at least one deployment is configured)."""
        missing: list[str] = []
        for dep in entry.deployments:
            names = self.unconfigured(dep.provider)
            if not names:
                return []
            missing += [n for n in names if n not in missing]
        return missing

    def unconfigured(self, provider: str) -> list[str]:
        """The environment variables provider `provider` needs and that are unset ([] when it
        can be called). The one test of "usable deployment": the router skips deployments
        whose provider fails it, listings and probes use it too."""
        return self.provider(provider).missing_configuration()

    def provider(self, name: str) -> Provider:
        """The process-wide instance of provider `name` (its connection pool is reused)."""
        inst = self._providers.get(name)
        if inst is None:
            settings = self.catalog.providers[name]
            inst = provider_class(settings["type"])(
                name, settings, {**self.defaults, "max_output_tokens": self._caps.get(name, {})})
            self._providers[name] = inst
        return inst

    def provider_type(self, name: str) -> str:
        return str(self.catalog.providers[name]["type"])

    def close(self) -> None:
        for inst in self._providers.values():
            inst.close()
        self._providers.clear()
