"""A small keep-alive pool of `http.client` connections to one upstream host.

Why not urllib3 or httpx: on the gateway's hot path urllib3 cost ~0.45 ms of CPU per call in
profiles (URL parsing, a liveness poll before each reuse, headers and body in two sends);
httpx's pool collapses under gevent concurrency (docs/traps.md). This pool adds only a list of idle
connections to `http.client` (whose headers and body leave in two `send`s: joining them was
measured and did not pay, docs/overrides.md). Under gevent
the sockets are cooperative; timeouts are per socket operation (connect, then every read:
the read timeout is also the stream idle timeout). An optional total timeout bounds the whole
call: it is checked before every read, and a read never waits longer than what is left of it.
"""
from __future__ import annotations

import http.client
import socket
import ssl
import threading
import time
from typing import Any, Iterator
from urllib.parse import urlsplit

# Errors of a reused keep-alive connection that the server had already closed: the request
# never reached it, so one retry on a fresh connection is safe.
_STALE = (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError, ConnectionAbortedError)


# What reading a body can raise; AttributeError is http.client's answer when the socket was
# closed under a read in progress (abort).
_READ_ERRORS = (socket.timeout, http.client.HTTPException, OSError, ValueError, AttributeError)


class UpstreamConnectError(OSError):
    """The upstream could not be reached (refused, DNS, TLS)."""


class UpstreamTimeoutError(OSError):
    """Connect or read took longer than its timeout."""


class UpstreamProtocolError(OSError):
    """The upstream closed the connection or sent something that is not HTTP."""


class PooledResponse:
    """An upstream answer whose connection goes back to the pool once fully read."""

    def __init__(self, pool: "HTTPPool", conn: http.client.HTTPConnection,
                 response: http.client.HTTPResponse, deadline: float | None = None) -> None:
        self._pool = pool
        self._conn: http.client.HTTPConnection | None = conn
        self._response = response
        self.status = response.status
        self.headers = response.headers
        self._deadline = deadline
        self._shortened = False  # the socket's timeout was cut to what is left of the total

    def _bound(self) -> None:
        """Enforce the total timeout before a read (raises socket.timeout when it is over)."""
        left = self._deadline - time.monotonic()  # type: ignore[operator]
        if left <= 0:
            raise socket.timeout("total timeout")
        if left < self._pool.read_timeout:
            conn = self._conn
            if conn is not None and conn.sock is not None:
                conn.sock.settimeout(left)
                self._shortened = True

    def read(self) -> bytes:
        try:
            if self._deadline is not None:
                self._bound()
            data = self._response.read()
        except _READ_ERRORS as exc:
            raise self._failed(exc) from None
        self.release()
        return data

    def iter_chunks(self, size: int = 65536) -> Iterator[bytes]:
        """The body as it arrives (chunked decoding included)."""
        try:
            deadline = self._deadline
            while True:
                if deadline is not None:
                    self._bound()
                data = self._response.read1(size)
                if not data:
                    return
                yield data
        except _READ_ERRORS as exc:
            raise self._failed(exc) from None

    def _failed(self, exc: BaseException) -> OSError:
        self.close()
        if isinstance(exc, socket.timeout):
            return UpstreamTimeoutError("read timed out")
        return UpstreamProtocolError(str(exc) or type(exc).__name__)

    def release(self) -> None:
        """Back to the pool when the body was read to its end, else closed."""
        conn, self._conn = self._conn, None
        if conn is None:
            return
        if self._response.isclosed() and not self._response.will_close:
            if self._shortened and conn.sock is not None:
                conn.sock.settimeout(self._pool.read_timeout)
            self._pool._put(conn)
        else:
            conn.close()

    def abort(self) -> None:
        """From another greenlet: shut the socket down so that a read in progress returns.
        The reading side then closes the connection itself (closing the reader's buffer from
        here would be a reentrant call)."""
        conn = self._conn
        sock = conn.sock if conn is not None else None
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def close(self) -> None:
        """Close the connection (never reused): an aborted or broken body."""
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                if conn.sock is not None:
                    conn.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            try:
                conn.close()
            except RuntimeError:  # a read still in progress in another greenlet
                pass

    def drain(self) -> None:
        """Read what is left of the body (after a stream's last event) so that the connection
        can be reused; closed instead when that read fails."""
        try:
            for _ in self.iter_chunks():
                pass
            self.release()
        except OSError:
            self.close()


def http_timeouts(settings: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
    """HTTPPool's timeouts from a provider's models.json entry, else the gateway's defaults:
    `connect_timeout_s`, `read_timeout_s` (or its older name `timeout_s`), `total_timeout_s`."""
    read = settings.get("read_timeout_s", settings.get("timeout_s", defaults.get("read_timeout_s", 600)))
    total = settings.get("total_timeout_s", defaults.get("total_timeout_s"))
    return {"connect_timeout": float(settings.get("connect_timeout_s", defaults.get("connect_timeout_s", 10))),
            "read_timeout": float(read), "total_timeout": float(total) if total else None}


class HTTPPool:
    def __init__(self, base_url: str, *, connect_timeout: float, read_timeout: float,
                 maxsize: int = 64, ca_file: str | None = None,
                 total_timeout: float | None = None) -> None:
        parts = urlsplit(base_url)
        self.https = parts.scheme == "https"
        self.host = parts.hostname or "localhost"
        self.port = parts.port or (443 if self.https else 80)
        self.base_path = parts.path.rstrip("/")
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.total_timeout = total_timeout
        self.maxsize = maxsize
        self._idle: list[http.client.HTTPConnection] = []
        self._lock = threading.Lock()
        # ca_file: a provider whose certificate chain is not in the system store (GigaChat's
        # Russian Trusted Root CA) is verified against that file instead of not at all.
        self._ssl = ssl.create_default_context(cafile=ca_file) if self.https else None

    def _new(self) -> http.client.HTTPConnection:
        if self.https:
            conn: http.client.HTTPConnection = http.client.HTTPSConnection(
                self.host, self.port, timeout=self.connect_timeout, context=self._ssl)
        else:
            conn = http.client.HTTPConnection(self.host, self.port, timeout=self.connect_timeout)
        try:
            conn.connect()
        except socket.timeout:
            raise UpstreamTimeoutError(f"connect to {self.host}:{self.port} timed out") from None
        except OSError as exc:
            raise UpstreamConnectError(f"cannot connect to {self.host}:{self.port}: "
                                       f"{exc.strerror or type(exc).__name__}") from None
        conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn.sock.settimeout(self.read_timeout)
        return conn

    def _get(self) -> tuple[http.client.HTTPConnection, bool]:
        with self._lock:
            if self._idle:
                return self._idle.pop(), True
        return self._new(), False

    def _put(self, conn: http.client.HTTPConnection) -> None:
        with self._lock:
            if len(self._idle) < self.maxsize:
                self._idle.append(conn)
                return
        conn.close()

    def post(self, path: str, body: bytes, headers: dict[str, str]) -> PooledResponse:
        """POST and read the status and headers; the body is read from the answer."""
        total = self.total_timeout
        deadline = time.monotonic() + total if total else None
        for attempt in (0, 1):
            conn, reused = self._get()
            try:
                conn.request("POST", self.base_path + path, body=body, headers=headers)
                if deadline is not None and total < self.read_timeout:  # type: ignore[operator]
                    conn.sock.settimeout(max(0.001, deadline - time.monotonic()))
                    response = conn.getresponse()
                    conn.sock.settimeout(self.read_timeout)
                else:
                    response = conn.getresponse()
                return PooledResponse(self, conn, response, deadline)
            except _STALE:
                conn.close()
                if reused and attempt == 0:
                    continue  # the server closed an idle keep-alive connection: a fresh one
                raise UpstreamProtocolError("the upstream closed the connection") from None
            except socket.timeout:
                conn.close()
                raise UpstreamTimeoutError("no answer within the read timeout") from None
            except (http.client.HTTPException, OSError) as exc:
                conn.close()
                raise UpstreamProtocolError(str(exc) or type(exc).__name__) from None
        raise UpstreamProtocolError("unreachable")  # pragma: no cover

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()
