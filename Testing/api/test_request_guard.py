"""The request guard on a real gunicorn + gevent server (raw sockets, PostgreSQL, Redis): slow
request bodies get 408 and a closed connection, connections per client address are capped
while other addresses are served, chunked bodies are read by every endpoint with the same size
limit, and every response carries the security headers."""
from __future__ import annotations

import json
import select
import socket
from typing import Iterator

import pytest

from app.api.request_guard import RequestGuard, client_address, parse_networks
from app.config import Settings
from Testing.conftest import app_config
from Testing.support import SYSTEM_SECRET, GatewayProcess, http_json

pytestmark = pytest.mark.timeout(180)

BODY_TIMEOUT_S = 2
CAP = 10


@pytest.fixture(scope="module")
def guarded(pg_url, models_file, tmp_path_factory) -> Iterator[GatewayProcess]:
    """A gateway with a short body deadline, a small per-address cap and small worker pools
    (100 connections per worker), so that a few hundred sockets would fill it without the guard."""
    env = {k: str(v) for k, v in app_config(
        pg_url, models_file, REQUEST_BODY_TIMEOUT_S=BODY_TIMEOUT_S, REQUEST_BODY_MIN_RATE=1000,
        MAX_CONNECTIONS_PER_CLIENT=CAP, LOG_LEVEL="INFO").items()}
    env["WORKER_CONNECTIONS"] = "100"
    log = tmp_path_factory.mktemp("guard") / "gunicorn.log"
    with GatewayProcess(env, workers=2, log_path=log) as proc:
        yield proc


def _connect(port: int, source: str = "127.0.0.1") -> socket.socket:
    """A connection from `source` (any 127.x address is this host: a second client address)."""
    return socket.create_connection(("127.0.0.1", port), timeout=30, source_address=(source, 0))


def _head(method: str, path: str, headers: dict[str, str]) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: gateway", *(f"{k}: {v}" for k, v in headers.items())]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def _read_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 response (Content-Length or chunked body) from a raw socket."""
    buf = b""
    while b"\r\n\r\n" not in buf:
        data = sock.recv(65536)
        if not data:
            raise AssertionError(f"connection closed before a response: {buf!r}")
        buf += data
    head, _, rest = buf.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    if "content-length" in headers:
        need = int(headers["content-length"])
        while len(rest) < need:
            data = sock.recv(65536)
            if not data:
                break
            rest += data
        body = rest[:need]
    else:  # chunked
        body = b""
        while True:
            while b"\r\n" not in rest:
                rest += sock.recv(65536)
            size_line, _, rest = rest.partition(b"\r\n")
            size = int(size_line, 16)
            while len(rest) < size + 2:
                rest += sock.recv(65536)
            if size == 0:
                break
            body += rest[:size]
            rest = rest[size + 2:]
    return int(status_line.split()[1]), headers, body


def _closed_by_server(sock: socket.socket) -> bool:
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


def _chunked(parts: list[bytes]) -> bytes:
    return b"".join(b"%X\r\n%s\r\n" % (len(p), p) for p in parts) + b"0\r\n\r\n"


def _admin(gateway: GatewayProcess, method: str, path: str, body=None) -> dict:
    status, _, answer = http_json(method, gateway.base_url + path, body, {"X-System-Secret": SYSTEM_SECRET})
    assert status in (200, 201), answer
    return answer


@pytest.fixture(scope="module")
def valid_key(guarded) -> str:
    """A key with no limits: the attack of the issue holds a valid key (bodies used to be read
    only after the key was accepted)."""
    return _admin(guarded, "POST", "/v1/api-keys", {"name": "slow", "tenant": "guard-slow"})["key"]


def test_a_stalled_body_gets_408_with_the_envelope_and_the_connection_closed(guarded, valid_key):
    """A client that announces 1000 bytes and sends 10 is answered 408 (OpenAI envelope,
    Connection: close) once the body deadline passes, and the connection is closed."""
    sock = _connect(guarded.port)
    sock.sendall(_head("POST", "/v1/chat/completions", {
        "Authorization": f"Bearer {valid_key}", "Content-Type": "application/json",
        "Content-Length": "1000"}) + b'{"model": ')
    status, headers, body = _read_response(sock)
    assert status == 408
    assert headers["connection"] == "close"
    assert json.loads(body)["error"]["code"] == "request_timeout"
    assert json.loads(body)["error"]["type"] == "invalid_request_error"
    assert headers["x-content-type-options"] == "nosniff"
    assert _closed_by_server(sock)
    sock.close()


def test_a_body_dripping_below_the_minimum_rate_gets_408(guarded):
    """One byte every 0.2 s never ends the deadline of an idle timer, but stays below the
    minimum rate (1000 bytes/s after the first 2 s): 408."""
    sock = _connect(guarded.port)
    sock.sendall(_head("POST", "/v1/api-keys", {"X-System-Secret": SYSTEM_SECRET,
                                                "Content-Type": "application/json",
                                                "Content-Length": "100000"}))
    answered = False
    for _ in range(300):  # at most 60 s of dripping
        try:
            sock.sendall(b" ")
        except OSError:
            answered = True
            break
        if select.select([sock], [], [], 0.2)[0]:
            answered = True
            break
    assert answered, "the server never answered a body dripping at 5 bytes/s"
    status, headers, body = _read_response(sock)
    assert status == 408
    assert json.loads(body)["error"]["code"] == "request_timeout"
    sock.close()


def test_slow_bodies_from_one_address_are_capped_and_health_answers_other_addresses(guarded, valid_key):
    """300 connections from 127.0.0.1 announcing a large body and sending none: past the cap
    (10 per worker) each is answered 429 too_many_connections and closed at once, so the
    workers' 100-connection pools never fill, and /health answers a client on 127.0.0.2
    while the capped ones are still open."""
    socks = []
    head = _head("POST", "/v1/chat/completions", {"Authorization": f"Bearer {valid_key}",
                                                  "Content-Type": "application/json", "Content-Length": "100000"})
    try:
        for _ in range(300):
            sock = _connect(guarded.port)
            sock.sendall(head)
            socks.append(sock)
        status, _, health = _health_from("127.0.0.2", guarded.port)
        assert status == 200, health
        statuses = []
        for sock in socks:
            code, hdrs, body = _read_response(sock)
            statuses.append(code)
            if code == 429:
                assert json.loads(body)["error"]["code"] == "too_many_connections"
                assert hdrs["connection"] == "close"
        assert statuses.count(429) >= 300 - 2 * CAP
        assert set(statuses) <= {429, 408}
    finally:
        for sock in socks:
            sock.close()


def _health_from(source: str, port: int) -> tuple[int, dict, dict]:
    sock = _connect(port, source)
    try:
        sock.sendall(_head("GET", "/health", {"Connection": "close"}))
        status, headers, body = _read_response(sock)
        return status, headers, json.loads(body)
    finally:
        sock.close()


def test_a_chunked_rotate_keeps_its_grace_period(guarded):
    """POST /v1/api-keys/<id>/rotate with a chunked body: its grace_period_s applies (the old
    secret keeps working), as with a Content-Length."""
    key = _admin(guarded, "POST", "/v1/api-keys", {"name": "rotated", "tenant": "guard-chunked"})
    sock = _connect(guarded.port)
    sock.sendall(_head("POST", f"/v1/api-keys/{key['id']}/rotate", {
        "X-System-Secret": SYSTEM_SECRET, "Content-Type": "application/json",
        "Transfer-Encoding": "chunked"}) + _chunked([b'{"grace_period', b'_s": 3600}']))
    status, _, body = _read_response(sock)
    sock.close()
    assert status == 200, body
    assert json.loads(body)["previous_key_expires_at"] is not None
    status, _, _ = http_json("GET", guarded.base_url + "/v1/models", headers={"Authorization": f"Bearer {key['key']}"})
    assert status == 200


def test_a_chunked_usage_query_keeps_its_filters(guarded):
    """POST /v1/usage with a chunked JSON body: its start and end are the ones answered."""
    sock = _connect(guarded.port)
    sock.sendall(_head("POST", "/v1/usage", {"X-System-Secret": SYSTEM_SECRET, "Content-Type": "application/json",
                                             "Transfer-Encoding": "chunked"})
                 + _chunked([b'{"start": "2020-01-01T00:00:00Z", ', b'"end": "2020-01-02T00:00:00Z"}']))
    status, _, body = _read_response(sock)
    sock.close()
    assert status == 200, body
    answer = json.loads(body)
    assert (answer["start"], answer["end"]) == ("2020-01-01T00:00:00Z", "2020-01-02T00:00:00Z")


@pytest.mark.parametrize("path", ["/v1/api-keys/1/rotate", "/v1/usage", "/v1/chat/completions", "/v1/tenants"])
def test_a_chunked_body_past_the_size_limit_is_413(guarded, path):
    """A chunked body larger than MAX_REQUEST_BYTES (256 KiB here) is refused with 413 and the
    envelope on every endpoint, never cut short and read as something else."""
    sock = _connect(guarded.port)
    filler = b'{"name": "' + b"x" * (300 * 1024) + b'"}'
    sock.sendall(_head("POST", path, {"X-System-Secret": SYSTEM_SECRET, "Authorization": "Bearer sk-x",
                                      "Content-Type": "application/json", "Transfer-Encoding": "chunked"})
                 + _chunked([filler[i:i + 16384] for i in range(0, len(filler), 16384)]))
    status, headers, body = _read_response(sock)
    sock.close()
    assert status == 413
    assert json.loads(body)["error"]["code"] == "request_too_large"


def test_a_broken_chunked_body_is_400_with_the_envelope(guarded):
    """A chunk size that is not hexadecimal: 400 invalid_body, not the server's bare error page."""
    sock = _connect(guarded.port)
    sock.sendall(_head("POST", "/v1/tenants", {"X-System-Secret": SYSTEM_SECRET, "Content-Type": "application/json",
                                               "Transfer-Encoding": "chunked"}) + b"ZZ\r\n{}\r\n0\r\n\r\n")
    status, _, body = _read_response(sock)
    sock.close()
    assert status == 400
    assert json.loads(body)["error"]["code"] == "invalid_body"


@pytest.mark.parametrize("method,path,headers", [
    ("GET", "/health", {}),
    ("GET", "/v1/no-such-route", {}),
    ("POST", "/v1/chat/completions", {"Authorization": "Bearer sk-wrong", "Content-Length": "2"}),
    ("GET", "/v1/tenants", {"X-System-Secret": SYSTEM_SECRET}),
])
def test_every_response_carries_the_security_headers(guarded, method, path, headers):
    """nosniff and a Referrer-Policy on answers, refusals and errors alike (JSON: no CSP)."""
    sock = _connect(guarded.port, "127.0.0.3")
    body = b"{}" if headers.get("Content-Length") else b""
    sock.sendall(_head(method, path, {**headers, "Connection": "close"}) + body)
    _, hdrs, _ = _read_response(sock)
    sock.close()
    assert hdrs["x-content-type-options"] == "nosniff"
    assert hdrs["referrer-policy"] == "no-referrer"
    assert "content-security-policy" not in hdrs


def test_failed_keys_are_counted_per_address_across_workers(guarded):
    """20 unknown keys from one address (AUTH_FAILURE_LIMIT's default), whichever of the two
    workers serves each (counted in Redis): the next attempt from it is 429 with Retry-After;
    another address still gets 401."""
    def attempt(source: str) -> tuple[int, dict[str, str], bytes]:
        sock = _connect(guarded.port, source)
        try:
            sock.sendall(_head("GET", "/v1/models", {"Authorization": "Bearer sk-guess", "Connection": "close"}))
            return _read_response(sock)
        finally:
            sock.close()
    assert [attempt("127.0.0.4")[0] for _ in range(20)] == [401] * 20
    status, headers, body = attempt("127.0.0.4")
    assert status == 429
    assert json.loads(body)["error"]["code"] == "too_many_failed_attempts"
    assert int(headers["retry-after"]) >= 1
    assert attempt("127.0.0.5")[0] == 401


# --- the guard's parts, without a server --------------------------------------------------------

def _html_app(csp: str | None = None):
    def app(environ, start_response):
        headers = [("Content-Type", "text/html; charset=utf-8")]
        if csp:
            headers.append(("Content-Security-Policy", csp))
        start_response("200 OK", headers)
        return [b"<p>hi</p>"]
    return app


def _call(app, environ=None) -> dict[str, str]:
    seen = {}

    def start_response(status, headers, exc_info=None):
        seen.update({k.lower(): v for k, v in headers})
    env = {"REQUEST_METHOD": "GET", "PATH_INFO": "/", "REMOTE_ADDR": "10.0.0.1", **(environ or {})}
    list(app(env, start_response))
    return seen


def test_html_responses_get_a_content_security_policy_unless_they_set_one():
    """An HTML answer gets the configured CSP and X-Frame-Options; one with its own CSP keeps it."""
    headers = _call(RequestGuard(_html_app(), Settings()))
    assert headers["content-security-policy"].startswith("default-src 'self'; frame-ancestors 'none'")
    assert headers["x-frame-options"] == "DENY"
    assert headers["x-content-type-options"] == "nosniff"
    assert _call(RequestGuard(_html_app("default-src 'none'"), Settings()))["content-security-policy"] == \
        "default-src 'none'"


class _TickingStream:
    """A body stream that moves `clock` by `seconds_per_read` on every read of one byte."""

    def __init__(self, size: int, clock: list[float], seconds_per_read: float) -> None:
        self.left, self.clock, self.step = size, clock, seconds_per_read

    def read(self, n: int) -> bytes:
        self.clock[0] += self.step
        if not self.left:
            return b""
        self.left -= 1
        return b"x"


@pytest.mark.parametrize("min_rate,seconds_per_byte,refused", [
    (0, 0.5, True),       # a fixed 2 s deadline: the 5th byte comes too late
    (1000, 0.5, True),    # each byte extends the deadline by 1 ms, far less than it takes
    (1, 0.5, False),      # each byte extends it by 1 s, more than it takes
    (0, 0.0, False),      # a fast client
])
def test_the_body_deadline_is_a_base_plus_one_second_per_min_rate_bytes(min_rate, seconds_per_byte, refused):
    """A 10-byte body read one byte at a time against REQUEST_BODY_TIMEOUT_S=2."""
    clock = [0.0]
    guard = RequestGuard(lambda environ, start: [environ["wsgi.input"].read()],
                         Settings(REQUEST_BODY_TIMEOUT_S=2, REQUEST_BODY_MIN_RATE=min_rate),
                         clock=lambda: clock[0])
    statuses = []
    env = {"REQUEST_METHOD": "POST", "PATH_INFO": "/", "REMOTE_ADDR": "10.0.0.1", "CONTENT_LENGTH": "10",
           "wsgi.input": _TickingStream(10, clock, seconds_per_byte)}
    body = b"".join(guard(env, lambda status, headers, exc_info=None: statuses.append(status)))
    if refused:
        assert statuses == ["408 REQUEST TIMEOUT"]
        assert json.loads(body)["error"]["code"] == "request_timeout"
    else:
        assert body == b"x" * 10


def test_the_client_address_comes_from_x_forwarded_for_only_behind_a_trusted_proxy():
    """X-Forwarded-For is believed only from TRUSTED_PROXIES, and only its right-most
    untrusted entry (a client can prepend anything)."""
    trusted = parse_networks("127.0.0.1, 10.0.0.0/8")
    env = {"REMOTE_ADDR": "127.0.0.1", "HTTP_X_FORWARDED_FOR": "6.6.6.6, 203.0.113.9, 10.1.2.3"}
    assert client_address(env, trusted) == "203.0.113.9"
    assert client_address({**env, "REMOTE_ADDR": "198.51.100.7"}, trusted) == "198.51.100.7"
    assert client_address(env, ()) == "127.0.0.1"
    assert client_address({"REMOTE_ADDR": "127.0.0.1"}, trusted) == "127.0.0.1"


def test_cors_still_answers_with_the_security_headers(client):
    """A browser preflight from an allowed origin (CORS_ORIGINS="*" in the tests) is answered
    by CORS as before, with the security headers added."""
    resp = client.options("/v1/chat/completions", headers={
        "Origin": "https://app.example", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type"})
    assert resp.status_code == 200
    assert resp.headers["Access-Control-Allow-Origin"] in ("*", "https://app.example")
    assert resp.headers["X-Content-Type-Options"] == "nosniff"
    assert resp.headers["Referrer-Policy"] == "no-referrer"


def test_cors_headers_of_a_request_without_origin_are_those_flask_cors_sends(client):
    """A request without `Origin` (an API client) gets the CORS headers flask-cors sends such a
    request (set at once, without flask-cors matching the path again); a browser's request with
    `Origin` still gets flask-cors' answer for that origin."""
    plain = client.get("/v1/models")
    assert plain.headers["Access-Control-Allow-Origin"] == "*"
    assert "X-Request-ID" in plain.headers["Access-Control-Expose-Headers"]
    assert "Vary" not in plain.headers
    browser = client.get("/v1/models", headers={"Origin": "https://app.example"})
    assert browser.headers["Access-Control-Allow-Origin"] == "https://app.example"
    assert browser.headers["Vary"] == "Origin"
    assert browser.headers["Access-Control-Expose-Headers"] == plain.headers["Access-Control-Expose-Headers"]
    assert plain.headers.getlist("Access-Control-Allow-Origin") == ["*"]   # set once, not twice
