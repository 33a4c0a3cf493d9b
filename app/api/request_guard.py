"""The WSGI layer in front of Flask: what every request goes through before any controller.

- **Client address**: the peer's address, or the client named by `X-Forwarded-For` when the
  peer is one of `TRUSTED_PROXIES` (stored in the environ for the per-address limits).
- **Connections per client address**: at most `MAX_CONNECTIONS_PER_CLIENT` requests of one
  address being read or processed in this worker (from the headers until the app returns its
  response: the whole of a JSON answer, a stream until its first piece); past it: 429 and the
  connection is closed, before the body is read. Counting ends when the app returns, not when
  the response is closed, so that no server or test client that forgets to close a response
  can leak a count.
- **The request body is read here, whole, with a deadline**: it must be complete within
  `REQUEST_BODY_TIMEOUT_S` plus one second per `REQUEST_BODY_MIN_RATE` bytes received so far
  (408 and close otherwise), and hold at most `MAX_REQUEST_BYTES` (413). Chunked bodies
  (`Transfer-Encoding: chunked`, no `Content-Length`) are read the same way, so every
  controller sees a `Content-Length` and the same limits apply. The deadline interrupts a
  blocked read under gevent (the production server); the development server only checks it
  between reads.
- **Security headers** on every response, the errors of this layer included.

The refusals of this layer are in the envelope of the API the path belongs to (app/errors.py
`envelope_for`: Anthropic's for the Messages API, OpenAI's everywhere else).
"""
from __future__ import annotations

import io
import ipaddress
import threading
import time
from typing import Any, Callable, Iterable

from app.config import Settings
from app.errors import APIError, RateLimited, RequestTimeout, RequestTooLarge, envelope_for, error_response

CLIENT_ADDRESS = "gateway.client_address"  # environ key of the resolved client address
BODY = "gateway.body"  # environ key of the whole body as read here (bytes), when it had one
_READ_PIECE = 16 * 1024
_UNRESOLVED = object()
_StartResponse = Callable[..., Any]


def parse_networks(spec: str) -> tuple[ipaddress._BaseNetwork, ...]:
    """`TRUSTED_PROXIES` ("127.0.0.1,10.0.0.0/8") as networks; a bad entry fails at start-up."""
    return tuple(ipaddress.ip_network(part.strip(), strict=False) for part in spec.split(",") if part.strip())


def _in(address: str, networks: tuple[ipaddress._BaseNetwork, ...]) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in net for net in networks)


def client_address(environ: dict[str, Any], trusted: tuple[ipaddress._BaseNetwork, ...]) -> str:
    """The peer's address; behind trusted proxies, the right-most `X-Forwarded-For` entry that
    is not itself a trusted proxy (entries left of it could be forged by the client)."""
    peer = environ.get("REMOTE_ADDR") or "unknown"
    if not trusted or not _in(peer, trusted):
        return peer
    hops = [h.strip() for h in environ.get("HTTP_X_FORWARDED_FOR", "").split(",") if h.strip()]
    for hop in reversed(hops):
        if not _in(hop, trusted):
            return hop
    return hops[0] if hops else peer


def security_headers(settings: Settings) -> Callable[[list[tuple[str, str]]], None]:
    """A function adding the security headers to a WSGI header list (those already set stay).
    One pass over the response's headers (it runs on every response)."""
    always = [(n, v) for n, v in (("X-Content-Type-Options", "nosniff"),
                                  ("Referrer-Policy", settings.REFERRER_POLICY)) if v]
    html = [(n, v) for n, v in (("Content-Security-Policy", settings.CONTENT_SECURITY_POLICY),
                                ("X-Frame-Options", "DENY")) if v]
    ours = {n.lower() for n, _ in always + html}

    def add(headers: list[tuple[str, str]]) -> None:
        present: set[str] = set()
        is_html = False
        for name, value in headers:
            lower = name.lower()
            if lower in ours:
                present.add(lower)
            elif lower == "content-type" and value[:9].lower() == "text/html":
                is_html = True
        for name, value in always:
            if name.lower() not in present:
                headers.append((name, value))
        if is_html:
            for name, value in html:
                if name.lower() not in present:
                    headers.append((name, value))
    return add


def _gevent_timeout() -> Any:
    """gevent.Timeout when sockets are cooperative (gunicorn's gevent worker), else None."""
    try:
        from gevent import Timeout, monkey
    except ImportError:  # pragma: no cover - gevent is in requirements.txt
        return None
    return Timeout if monkey.is_module_patched("socket") else None


class _BodyRefused(Exception):
    def __init__(self, error: APIError, close: bool) -> None:
        super().__init__(error.message)
        self.error, self.close = error, close


class RequestGuard:
    """WSGI middleware wrapping the Flask app (see the module docstring)."""

    def __init__(self, app: Callable[..., Iterable[bytes]], settings: Settings,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.app = app
        self.max_bytes = settings.MAX_REQUEST_BYTES
        self.timeout_s = settings.REQUEST_BODY_TIMEOUT_S
        self.min_rate = settings.REQUEST_BODY_MIN_RATE
        self.cap = settings.MAX_CONNECTIONS_PER_CLIENT
        self.trusted = parse_networks(settings.TRUSTED_PROXIES)
        self.add_headers = security_headers(settings)
        self.clock = clock
        self._active: dict[str, int] = {}
        self._lock = threading.Lock()
        self._timeout_cls: Any = _UNRESOLVED

    def __call__(self, environ: dict[str, Any], start_response: _StartResponse) -> Iterable[bytes]:
        def with_headers(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
            self.add_headers(headers)
            return start_response(status, headers, exc_info) if exc_info else start_response(status, headers)

        address = client_address(environ, self.trusted)
        environ[CLIENT_ADDRESS] = address
        if not self._enter(address):
            return self._refuse(environ, with_headers, start_response, RateLimited(
                "Too many connections from this address in progress; retry when some have ended.",
                code="too_many_connections", headers={"Retry-After": "1"}), close=True)
        try:
            self._buffer_body(environ)
            return self.app(environ, with_headers)
        except _BodyRefused as refused:
            return self._refuse(environ, with_headers, start_response, refused.error, refused.close)
        finally:
            self._leave(address)

    # -- connections per address ---------------------------------------------------------------

    def _enter(self, address: str) -> bool:
        with self._lock:
            n = self._active.get(address, 0)
            if self.cap and n >= self.cap:
                return False
            self._active[address] = n + 1
            return True

    def _leave(self, address: str) -> None:
        with self._lock:
            n = self._active.get(address, 0) - 1
            if n > 0:
                self._active[address] = n
            else:
                self._active.pop(address, None)

    # -- the body --------------------------------------------------------------------------------

    def _buffer_body(self, environ: dict[str, Any]) -> None:
        """Read the whole body into memory (within the limits) and hand it on with its length."""
        chunked = "chunked" in environ.get("HTTP_TRANSFER_ENCODING", "").lower()
        length_header = environ.get("CONTENT_LENGTH", "").strip()
        if chunked:
            length = None
        elif length_header:
            try:
                length = int(length_header)
            except ValueError:
                raise _BodyRefused(APIError("Invalid Content-Length header.", status=400,
                                            code="invalid_content_length"), close=True) from None
            if length < 0:
                raise _BodyRefused(APIError("Invalid Content-Length header.", status=400,
                                            code="invalid_content_length"), close=True)
            if length > self.max_bytes:
                raise _BodyRefused(self._too_large(), close=False)
            if length == 0:
                return
        else:
            return
        data = self._read(environ["wsgi.input"], length)
        environ[BODY] = data   # read_json_object takes it from here, without werkzeug's stream wrappers
        environ["wsgi.input"] = io.BytesIO(data)
        environ["CONTENT_LENGTH"] = str(len(data))
        environ.pop("HTTP_TRANSFER_ENCODING", None)
        environ["wsgi.input_terminated"] = True

    def _read(self, stream: Any, length: int | None) -> bytes:
        """`length` bytes (None: up to the end of a chunked body), each read of at most 16 KiB
        finished before start + timeout + received / min_rate."""
        if self._timeout_cls is _UNRESOLVED:  # resolved in the serving process (after gevent patched it)
            self._timeout_cls = _gevent_timeout()
        timeout_cls = self._timeout_cls
        start = self.clock()
        parts: list[bytes] = []
        received = 0
        while length is None or received < length:
            want = _READ_PIECE if length is None else min(_READ_PIECE, length - received)
            allowance = self.timeout_s + (received / self.min_rate if self.min_rate else 0.0)
            remaining = start + allowance - self.clock()
            if remaining <= 0:
                raise _BodyRefused(self._timed_out(), close=True)
            try:
                if timeout_cls is not None:
                    with timeout_cls(remaining, _ReadTimedOut):
                        piece = stream.read(want)
                else:
                    piece = stream.read(want)
            except _ReadTimedOut:
                raise _BodyRefused(self._timed_out(), close=True) from None
            except Exception as exc:  # the client hung up, or sent a broken chunk (the server's parse error)
                raise _BodyRefused(APIError(f"The request body could not be read ({type(exc).__name__}).",
                                            status=400, code="invalid_body"), close=True) from None
            if not piece:
                break
            parts.append(piece)
            received += len(piece)
            if received > self.max_bytes:
                raise _BodyRefused(self._too_large(), close=False)
        if length is not None and received < length:
            raise _BodyRefused(APIError("The request body ended before its Content-Length.",
                                        status=400, code="invalid_body"), close=True)
        return b"".join(parts)

    def _too_large(self) -> APIError:
        return RequestTooLarge(f"Request body too large (limit: {self.max_bytes} bytes).")

    def _timed_out(self) -> APIError:
        return RequestTimeout(f"The request body did not arrive in time (allowed: {self.timeout_s:g} s "
                              f"plus 1 s per {self.min_rate} bytes received). The connection is closed.")

    # -- answers of this layer -------------------------------------------------------------------

    @staticmethod
    def _refuse(environ: dict[str, Any], with_headers: _StartResponse, start_response: _StartResponse,
                err: APIError, close: bool) -> Iterable[bytes]:
        if close:
            _close_after_response(start_response)
        response = error_response(err, envelope_for(environ.get("PATH_INFO", "")))
        if close:
            response.headers["Connection"] = "close"
        return response(environ, with_headers)


class _ReadTimedOut(Exception):
    pass


def _close_after_response(start_response: _StartResponse) -> None:
    """Ask gunicorn to close the connection after this response (its Response.force_close; a
    `Connection: close` header set by the app is dropped by gunicorn as hop-by-hop)."""
    force_close = getattr(getattr(start_response, "__self__", None), "force_close", None)
    if callable(force_close):
        force_close()
