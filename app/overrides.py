"""Every place the gateway reaches into a third-party library's internals, in one module.

Each override names the library version it was written for and the hooks it relies on. At
start-up `Override.usable(switch)` checks both: when the installed version differs, a hook is
missing or the switch (`OVERRIDE_*` in app/config.py) is off, the override is not used, the
library's ordinary code path runs instead, and ONE log line says why. What each override
does, why, and what it measured: docs/overrides.md.

- `GUNICORN_WRITER`: gunicorn's HTTP/1 response writer with fewer `send`s (installed in each
  worker by gunicorn.config.py's `post_fork`).
- `HTTP_ONE_SEND`: `http.client` connections that send headers and body in one `send`
  (app/providers/http_pool.py).
- `TIKTOKEN_LOADER`: tiktoken's encodings built from the files in data/tokenizers/ instead of
  downloaded (app/utils/token_counter.py).
- `REDIS_POOL_BYPASS`: the limiter's own free list of redis-py connections, skipping the
  pool's per-checkout health poll and the command layers (app/services/rate_limit_service.py).
"""
from __future__ import annotations

import http.client
import logging
import platform
import threading
from dataclasses import dataclass
from importlib import metadata
from typing import Any, Callable, Iterable

from gunicorn import util as gunicorn_util
from gunicorn.http import wsgi as gunicorn_wsgi

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


# --- gunicorn: the response writer ------------------------------------------------------------

class OneSendResponse(gunicorn_wsgi.Response):
    """gunicorn's HTTP/1 response, with fewer `send`s per response: the status line and
    headers leave with the first body bytes (gunicorn sends them alone first), and a chunked
    body's terminating chunk leaves with the last data when the app marks it (a bytes object
    whose `ends_body` is true: app/utils/streaming.py `FinalChunk`) instead of alone in
    `close()`. Built on gunicorn 27's extension points: `send_headers` (kept back here),
    `_emit_body` ("the one place body framing happens") and `close`. Every decision about
    what may be sent (no-body responses, Content-Length cuts, empty chunks) stays in
    gunicorn's `write()`."""

    _head = b""        # status line and headers not sent yet
    _ended = False     # the terminating chunk went out with the last data
    _eager = False     # sendfile: gunicorn writes to the socket itself, headers go at once

    def send_headers(self) -> None:
        if self.headers_sent or self._head:
            return
        head = self.default_headers()
        head.extend(["%s: %s\r\n" % (k, v) for k, v in self.headers])
        self._head = gunicorn_util.to_bytestring("%s\r\n" % "".join(head), "latin-1")
        if self._eager:
            self._send_head()

    def _send_head(self) -> None:
        head, self._head = self._head, b""
        self.headers_sent = True
        self.sock.sendall(head)

    def _emit_body(self, data: bytes) -> None:
        if self._ended:
            return
        if self.chunked:
            framed = b"%X\r\n%s\r\n" % (len(data), data)
            if getattr(data, "ends_body", False):
                framed += b"0\r\n\r\n"
                self._ended = True
        else:
            framed = data
        head, self._head = self._head, b""
        self.headers_sent = True
        self.sock.sendall(head + framed if head else framed)

    def sendfile(self, respiter: Any) -> bool:
        self._eager = True
        if self._head:
            self._send_head()
        return super().sendfile(respiter)

    def close(self) -> None:
        if not self.headers_sent and not self._head:
            self.send_headers()
        tail = b""
        if self.chunked and not self._ended:
            tail, self._ended = b"0\r\n\r\n", True
        if self._head:
            head, self._head = self._head, b""
            self.headers_sent = True
            self.sock.sendall(head + tail)
        elif tail:
            self.sock.sendall(tail)


def _gunicorn_hooks() -> list[str]:
    response = gunicorn_wsgi.Response
    create = getattr(gunicorn_wsgi, "create", None)
    return _missing([
        ("Response._emit_body", callable(getattr(response, "_emit_body", None))),
        ("Response.send_headers", callable(getattr(response, "send_headers", None))),
        ("Response.default_headers", callable(getattr(response, "default_headers", None))),
        # create() builds the HTTP/1 response from the module's `Response` when the worker
        # passes no response_class (HTTP/2 passes its own): that name is what we rebind.
        ("create(response_class=) using the module's Response",
         create is not None and "Response" in create.__code__.co_names
         and "response_class" in create.__code__.co_varnames),
    ])


GUNICORN_WRITER = Override("gunicorn_response_writer", "OVERRIDE_GUNICORN_WRITER", "gunicorn", "27.0.",
                           _gunicorn_hooks)


def install_gunicorn_writer(switched_on: bool) -> bool:
    """In a gunicorn worker (post_fork): HTTP/1 responses of this process use
    OneSendResponse. Returns whether it was installed."""
    if not GUNICORN_WRITER.usable(switched_on):
        return False
    gunicorn_wsgi.Response = OneSendResponse
    return True


# --- http.client: headers and body in one send ------------------------------------------------

class _OneSend:
    """Mixin for `http.client` connections: headers and a bytes body leave in one `send`
    (plain `http.client` sends them separately: one more syscall and, on loopback, one more
    wake-up of the upstream per call)."""

    def _send_output(self, message_body: Any = None, encode_chunked: bool = False) -> None:
        if isinstance(message_body, bytes) and not encode_chunked:
            self._buffer.extend((b"", b""))  # type: ignore[attr-defined]
            msg = b"\r\n".join(self._buffer) + message_body  # type: ignore[attr-defined]
            del self._buffer[:]  # type: ignore[attr-defined]
            self.send(msg)  # type: ignore[attr-defined]
            return
        super()._send_output(message_body, encode_chunked)  # type: ignore[misc]


class OneSendHTTPConnection(_OneSend, http.client.HTTPConnection):
    pass


class OneSendHTTPSConnection(_OneSend, http.client.HTTPSConnection):
    pass


def _http_client_hooks() -> list[str]:
    conn = http.client.HTTPConnection
    return _missing([
        ("HTTPConnection._send_output", callable(getattr(conn, "_send_output", None))),
        ("HTTPConnection._buffer", "_buffer" in conn.__init__.__code__.co_names),
    ])


HTTP_ONE_SEND = Override("http_client_one_send", "OVERRIDE_HTTP_ONE_SEND", "python", "3.11.",
                         _http_client_hooks)


def http_connection_classes(use_override: bool) -> tuple[type[http.client.HTTPConnection],
                                                         type[http.client.HTTPConnection]]:
    """(HTTP, HTTPS) connection classes for the upstream pools; `use_override`: what
    `HTTP_ONE_SEND.usable(...)` answered at start-up."""
    if use_override:
        return OneSendHTTPConnection, OneSendHTTPSConnection
    return http.client.HTTPConnection, http.client.HTTPSConnection


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


ALL = (GUNICORN_WRITER, HTTP_ONE_SEND, TIKTOKEN_LOADER, REDIS_POOL_BYPASS)
