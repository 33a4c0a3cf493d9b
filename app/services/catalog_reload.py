"""`data/models.json` reloaded without a restart, in every worker of every replica.

`POST /v1/admin/reload` (system secret) reloads the file in the worker that got the request and
publishes a `models.reload` event on the key-events channel; the listener of every other worker
(of every replica sharing the Redis) reloads the same way. Each worker reads the file itself
(each replica has its own copy, in compose the same mounted file), validates it completely
(every entry, every provider's settings) and only then swaps the new catalogue in; a file that
does not validate is refused with the error naming the entry, and the old catalogue keeps
serving. A worker whose listener was disconnected compares the file with what it loaded when it
resubscribes, so a reload it missed still reaches it. The gunicorn master's SIGHUP is handled
in gunicorn.config.py: it checks the file with `python db_manager.py check-models FILE`
first and restarts the workers (which load the new file) only when it is valid.

Requests already running finish on the deployment they started with; the old provider
instances (their connection pools) are closed once the longest upstream call could have ended.
"""
from __future__ import annotations

import hashlib
import logging
import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from app.providers.catalog import CatalogError
from app.providers.provider_manager import ProviderManager
from app.services.router import Router
from app.utils.token_counter import preload as preload_tokenizers

log = logging.getLogger("gateway.catalog")

EVENT = "models.reload"
_ENTRY = re.compile(r"(?:^|: )((?:providers|models)\.[^:\s]+)")


@dataclass
class ReloadResult:
    changed: bool
    models: int
    digest: str

    def to_json(self) -> dict[str, Any]:
        return {"object": "models.reload", "changed": self.changed, "models": self.models,
                "digest": self.digest, "pid": os.getpid()}


def file_digest(path: str | os.PathLike) -> str:
    """SHA-256 of the file's bytes ('' when it cannot be read)."""
    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()
    except OSError:
        return ""


def bad_entry(error: CatalogError) -> str | None:
    """The dotted entry a catalogue error names (`models.gpt-4o.pricing.input_per_mtok`)."""
    match = _ENTRY.search(str(error))
    return match.group(1) if match else None


class CatalogReloader:
    """Swaps the runtime's provider manager, router and uptime checker to a new catalogue."""

    def __init__(self, rt: Any) -> None:
        self.rt = rt
        self.path = rt.settings.MODELS_FILE
        self.digest = file_digest(self.path)
        self.reloads = 0
        self._lock = threading.Lock()

    def install(self) -> "CatalogReloader":
        """Listen for the reload event of other workers, and catch up on every resubscription."""
        events = self.rt.key_events
        if events is not None:
            events.handlers[EVENT] = lambda event: self._reload_quietly()
            events.on_subscribe.append(self._reload_quietly)
        return self

    def reload(self) -> ReloadResult:
        """Load and validate the file; swap it in when it changed. Raises CatalogError (the old
        catalogue stays) when the file is invalid."""
        with self._lock:
            digest = file_digest(self.path)
            if digest and digest == self.digest:
                return ReloadResult(False, len(self.rt.providers.catalog.models), digest)
            new = ProviderManager.from_file(self.path, defaults=self.rt.providers.defaults)
            preload_tokenizers({m.tokenizer for m in new.catalog.models.values()},
                               local_files=self.rt.settings.OVERRIDE_TIKTOKEN_LOADER)
            self._swap(new)
            self.digest = digest
            self.reloads += 1
            log.info("models reloaded from %s: %d models", self.path, len(new.catalog.models))
            return ReloadResult(True, len(new.catalog.models), digest)

    def reload_everywhere(self) -> ReloadResult:
        """Reload here, then tell every other worker of every replica (through Redis)."""
        result = self.reload()
        if self.rt.key_events is not None:
            self.rt.key_events.publish(EVENT, digest=result.digest)
        return result

    def _reload_quietly(self) -> None:
        try:
            self.reload()
        except CatalogError as exc:
            log.error("models file not reloaded, the previous catalogue keeps serving: %s", exc)

    def _swap(self, new: ProviderManager) -> None:
        rt = self.rt
        old = rt.providers
        rt.providers = new
        old_router = rt.router
        rt.router = Router(new.catalog, rt.health, old_router.policy, rng=old_router.rng,
                           clock=old_router.clock, sleep=old_router.sleep, unconfigured=new.unconfigured)
        rt.uptime.providers = new
        # Requests running on the old instances keep them until their upstream call ends.
        timer = threading.Timer(rt.settings.UPSTREAM_TOTAL_TIMEOUT_S, old.close)
        timer.daemon = True
        timer.start()


def reloader_of(app: Any) -> CatalogReloader:
    """The reloader create_app keeps on the Flask app."""
    return app.extensions["catalog_reloader"]
