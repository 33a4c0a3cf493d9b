"""Every place the gateway reaches into a third-party library's internals, in one module.

Each override names the library version it was written for and the hooks it relies on. At
start-up `Override.usable(switch)` checks both: when the installed version differs, a hook is
missing or the switch (`OVERRIDE_*` in app/config.py) is off, the override is not used, the
library's ordinary code path runs instead, and ONE log line says why. What each override
does, why, and what it measured (and the two that were measured and removed: gunicorn's
response writer and `http.client`'s send): docs/overrides.md.

- `TIKTOKEN_LOADER`: tiktoken's encodings built from the files in data/tokenizers/ instead of
  downloaded (app/utils/token_counter.py).
- `REDIS_POOL_BYPASS`: the limiter's own free list of redis-py connections, skipping the
  pool's per-checkout health poll and the command layers (app/services/rate_limit_service.py).
"""
from __future__ import annotations

import logging
import platform
import threading
from dataclasses import dataclass
from importlib import metadata
from typing import Any, Callable, Iterable

log = logging.getLogger("gateway.overrides")


@dataclass(frozen=True)
class Override:
    """One override: its switch, the library and version prefix it was written for, and a
    function listing the hooks it needs that are missing (empty: all there)."""
    name: str
    switch: str                                # the Settings / environment variable
    library: str                               # distribution name, or "python"
    written_for: str                           # version prefix, e.g. "27.0."
    missing_hooks: Callable[[], list[str]]

    def installed_version(self) -> str:
        if self.library == "python":
            return platform.python_version()
        try:
            return metadata.version(self.library)
        except metadata.PackageNotFoundError:
            return "not installed"

    def usable(self, switched_on: bool, version: str | None = None,
               logger: logging.Logger = log) -> bool:
        """Whether to use the override. When not, one log line says why (off, other version,
        missing hook); `version` replaces the installed one (tests)."""
        if not switched_on:
            logger.info("override %s not installed: switched off (%s=0)", self.name, self.switch)
            return False
        version = self.installed_version() if version is None else version
        if not (version + ".").startswith(self.written_for):
            logger.warning("override %s not installed: written for %s %s*, found %s; the library's "
                           "own code path is used", self.name, self.library, self.written_for, version)
            return False
        missing = self.missing_hooks()
        if missing:
            logger.warning("override %s not installed: %s %s has no %s; the library's own code path "
                           "is used", self.name, self.library, version, ", ".join(missing))
            return False
        return True


def _missing(pairs: Iterable[tuple[str, bool]]) -> list[str]:
    return [name for name, present in pairs if not present]


# --- tiktoken: encodings from local files -----------------------------------------------------

def _tiktoken_hooks() -> list[str]:
    try:
        import tiktoken_ext.openai_public as op
    except ImportError:
        return ["tiktoken_ext.openai_public"]
    return _missing([("openai_public.load_tiktoken_bpe", callable(getattr(op, "load_tiktoken_bpe", None)))]
                    + [(f"openai_public.{name}() reading its ranks with load_tiktoken_bpe",
                        "load_tiktoken_bpe" in getattr(getattr(op, name, None), "__code__", None).co_names
                        if callable(getattr(op, name, None)) else False)
                       for name in ("cl100k_base", "o200k_base")])


TIKTOKEN_LOADER = Override("tiktoken_local_files", "OVERRIDE_TIKTOKEN_LOADER", "tiktoken", "0.14.",
                           _tiktoken_hooks)
_tiktoken_lock = threading.Lock()


def tiktoken_local_encoding(name: str, path: str, sha256: str) -> Any:
    """The tiktoken Encoding `name` with tiktoken's own pattern and special tokens, its ranks
    read from the local file `path` (checked against `sha256`), nothing downloaded. The
    constructor's module-level `load_tiktoken_bpe` is swapped for the duration of the call."""
    import tiktoken
    import tiktoken_ext.openai_public as op
    from tiktoken.load import load_tiktoken_bpe

    with _tiktoken_lock:
        original = op.load_tiktoken_bpe
        op.load_tiktoken_bpe = lambda _url, expected_hash=None: load_tiktoken_bpe(path, sha256)
        try:
            params = getattr(op, name)()
        finally:
            op.load_tiktoken_bpe = original
    return tiktoken.Encoding(**params)


# --- redis-py: the limiter's connection free list ---------------------------------------------

def _redis_hooks() -> list[str]:
    import redis
    conn = redis.Connection
    return _missing([
        ("ConnectionPool.make_connection", callable(getattr(redis.ConnectionPool, "make_connection", None))),
        ("Connection.pack_commands", callable(getattr(conn, "pack_commands", None))),
        ("Connection.send_packed_command", callable(getattr(conn, "send_packed_command", None))),
        ("Connection.read_response", callable(getattr(conn, "read_response", None))),
        ("Connection.disconnect", callable(getattr(conn, "disconnect", None))),
    ])


REDIS_POOL_BYPASS = Override("redis_pool_bypass", "OVERRIDE_REDIS_POOL_BYPASS", "redis", "8.1.", _redis_hooks)


class RedisFreeList:
    """Pipelined commands on connections from our own free list. redis-py's pool polls every
    connection for stray data on each checkout (10% of a worker's CPU in profiles) and its
    command layers cost ~0.1 ms per call; here a connection that saw any error is
    disconnected, so one coming back to the list is always in a clean state."""

    def __init__(self, pool: Any, max_connections: int, unavailable: type[Exception]) -> None:
        self.pool = pool
        self.unavailable = unavailable
        self._idle: list[Any] = []
        self._slots = threading.BoundedSemaphore(max_connections)

    def execute(self, commands: list[tuple[Any, ...]]) -> list[Any]:
        """Every command in one write and their replies in one read; error replies are
        returned in place of their results. Connection failures raise `unavailable`."""
        import redis
        if not self._slots.acquire(timeout=5):
            raise self.unavailable("no Redis connection free within 5 s")
        conn = self._idle.pop() if self._idle else self.pool.make_connection()
        try:
            conn.send_packed_command(conn.pack_commands(commands))
            results: list[Any] = []
            for _ in commands:
                try:
                    results.append(conn.read_response())
                except redis.ResponseError as exc:
                    results.append(exc)
            return results
        except (redis.ConnectionError, redis.TimeoutError, OSError) as exc:
            conn.disconnect()
            raise self.unavailable(str(exc)) from None
        except BaseException:
            conn.disconnect()  # interrupted mid-reply (a timeout, a killed greenlet)
            raise
        finally:
            self._idle.append(conn)
            self._slots.release()

    def close(self) -> None:
        """Disconnect the idle connections (the pool does not know them)."""
        idle, self._idle = self._idle, []
        for conn in idle:
            conn.disconnect()


ALL = (TIKTOKEN_LOADER, REDIS_POOL_BYPASS)
