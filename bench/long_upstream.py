#!/usr/bin/env python3
"""A fake OpenAI-compatible upstream for long streams: one token every `--interval` seconds.

    python bench/long_upstream.py --port 9200 [--interval 0.05] [--tokens 1200]

`POST /v1/chat/completions` with `"stream": true` answers server-sent events: a role chunk at
once, then one content chunk (one token, " tok") per tick, then the finish chunk, the usage
chunk (`completion_tokens` = the tokens sent) and `data: [DONE]`. A request's `max_tokens`
sets its number of tokens (else `--tokens`). `GET /_stats` answers the counters (streams
started, open, completed, cut; ticks that ran late). `GET /v1/models` answers a list (the
readiness check).

Built to hold thousands of streams on a shared 2-core machine at a small CPU cost: gevent
greenlets only accept connections and read requests; one ticker walks every open stream each
tick and writes its token with a non-blocking `os.write` (no greenlet, timer or wake-up per
stream). A token the socket cannot take yet is kept and sent before the next one. The answer
closes the connection (`Connection: close`).
"""
from __future__ import annotations

from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import socket  # noqa: E402
import time  # noqa: E402

import gevent  # noqa: E402

HEAD = (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n"
        b"Cache-Control: no-cache\r\nConnection: close\r\n\r\n")
CREATED = int(time.time())
PREFIX = ('{"id":"chatcmpl-long","object":"chat.completion.chunk","created":%d,"model":"bench",'
          '"system_fingerprint":"fp_long","choices":' % CREATED)
TOKEN_TEXT = " tok"
PROMPT_TOKENS = 12


def chunk(payload: bytes) -> bytes:
    """One HTTP/1.1 chunk."""
    return b"%x\r\n%s\r\n" % (len(payload), payload)


def sse(data: str) -> bytes:
    return chunk(b"data: " + data.encode() + b"\n\n")


FIRST = sse(PREFIX + '[{"index":0,"delta":{"role":"assistant","content":""},"finish_reason":null}],"usage":null}')
TOKEN = sse(PREFIX + '[{"index":0,"delta":{"content":%s},"finish_reason":null}],"usage":null}'
            % json.dumps(TOKEN_TEXT))


def tail(tokens: int) -> bytes:
    """Finish chunk, usage chunk, [DONE] and the end of the chunked body."""
    usage = {"prompt_tokens": PROMPT_TOKENS, "completion_tokens": tokens,
             "total_tokens": PROMPT_TOKENS + tokens}
    return (sse(PREFIX + '[{"index":0,"delta":{},"finish_reason":"stop"}],"usage":null}')
            + sse(PREFIX + '[],"usage":%s}' % json.dumps(usage, separators=(",", ":")))
            + chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n")


class Stats:
    def __init__(self) -> None:
        self.started = 0
        self.completed = 0
        self.cut = 0
        self.late_ticks = 0
        self.ticks = 0
        self.max_tick_s = 0.0


class Stream:
    __slots__ = ("sock", "fd", "left", "total", "pending")

    def __init__(self, sock: socket.socket, tokens: int) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.left = tokens
        self.total = tokens
        self.pending = b""


class Upstream:
    def __init__(self, interval: float, default_tokens: int) -> None:
        self.interval = interval
        self.default_tokens = default_tokens
        self.streams: set[Stream] = set()
        self.stats = Stats()

    # -- the ticker: one token per open stream per tick ---------------------------------------
    def tick_forever(self) -> None:
        next_at = time.monotonic() + self.interval
        while True:
            delay = next_at - time.monotonic()
            if delay > 0:
                gevent.sleep(delay)
            else:
                self.stats.late_ticks += 1
                gevent.sleep(0)  # let accepts and request reads run
            began = time.monotonic()
            self.tick()
            took = time.monotonic() - began
            self.stats.ticks += 1
            self.stats.max_tick_s = max(self.stats.max_tick_s, took)
            next_at += self.interval
            if next_at < time.monotonic():
                next_at = time.monotonic()  # behind: do not try to catch up in a burst

    def tick(self) -> None:
        finished = []
        for s in self.streams:
            if s.left > 0:
                s.left -= 1
                data = s.pending + TOKEN
                if s.left == 0:
                    data += tail(s.total)
            elif s.pending:
                data = s.pending
            else:
                finished.append(s)
                continue
            try:
                sent = os.write(s.fd, data)
            except BlockingIOError:
                sent = 0
            except OSError:
                self.stats.cut += 1
                finished.append(s)
                s.left, s.pending = -1, b""
                continue
            s.pending = data[sent:]
            if s.left == 0 and not s.pending:
                self.stats.completed += 1
                finished.append(s)
        for s in finished:
            self.streams.discard(s)
            try:
                s.sock.close()
            except OSError:
                pass

    # -- connections -----------------------------------------------------------------------------
    def serve(self, listener: socket.socket) -> None:
        gevent.spawn(self.tick_forever)
        while True:
            sock, _ = listener.accept()
            gevent.spawn(self.handle, sock)

    def handle(self, sock: socket.socket) -> None:
        try:
            sock.settimeout(30)
            request = read_request(sock)
            if request is None:
                sock.close()
                return
            method, path, body = request
            if method == "GET" and path in ("/v1/models", "/models"):
                self.answer(sock, 200, {"object": "list", "data": [{"id": "bench", "object": "model"}]})
            elif method == "GET" and path == "/_stats":
                st = self.stats
                self.answer(sock, 200, {"started": st.started, "open": len(self.streams),
                                        "completed": st.completed, "cut": st.cut, "ticks": st.ticks,
                                        "late_ticks": st.late_ticks, "max_tick_ms": round(st.max_tick_s * 1000, 1)})
            elif method == "POST" and path.endswith("/chat/completions"):
                self.start_stream(sock, body)
            else:
                self.answer(sock, 404, {"error": {"message": f"no route {method} {path}", "type": "invalid_request_error"}})
        except OSError:
            sock.close()

    def start_stream(self, sock: socket.socket, body: bytes) -> None:
        try:
            req = json.loads(body)
        except ValueError:
            req = None
        if not isinstance(req, dict) or req.get("stream") is not True:
            self.answer(sock, 400, {"error": {"message": "this fake only streams", "type": "invalid_request_error"}})
            return
        tokens = req.get("max_tokens") or req.get("max_completion_tokens") or self.default_tokens
        sock.sendall(HEAD + FIRST)
        sock.settimeout(0.0)  # from here on only the ticker writes, never waiting
        self.stats.started += 1
        self.streams.add(Stream(sock, int(tokens)))

    @staticmethod
    def answer(sock: socket.socket, status: int, obj: dict) -> None:
        body = json.dumps(obj).encode()
        sock.sendall(b"HTTP/1.1 %d X\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
                     b"Connection: close\r\n\r\n%s" % (status, len(body), body))
        sock.close()


def read_request(sock: socket.socket) -> tuple[str, str, bytes] | None:
    """Method, path and body of one HTTP/1.1 request (Content-Length bodies only)."""
    buf = b""
    while b"\r\n\r\n" not in buf:
        data = sock.recv(65536)
        if not data:
            return None
        buf += data
    head, _, body = buf.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    method, path = lines[0].split(" ")[:2]
    length = 0
    for line in lines[1:]:
        name, _, value = line.partition(":")
        if name.strip().lower() == "content-length":
            length = int(value.strip())
    while len(body) < length:
        data = sock.recv(65536)
        if not data:
            return None
        body += data
    return method, path, body[:length]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--interval", type=float, default=0.05, help="seconds between tokens")
    p.add_argument("--tokens", type=int, default=1200, help="tokens when the request sets no max_tokens")
    args = p.parse_args()
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((args.host, args.port))
    listener.listen(4096)
    Upstream(args.interval, args.tokens).serve(listener)


if __name__ == "__main__":
    main()
