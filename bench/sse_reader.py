#!/usr/bin/env python3
"""Many streamed chat completions at once, read to their end by one thread (epoll, raw HTTP).

    python bench/sse_reader.py --url http://127.0.0.1:8000/v1/chat/completions --key KEY \\
        --streams 5000 --tokens 1200 --ramp 10

The official client costs far too much per stream for thousands of them on the machine that
also runs the gateway; this reader opens plain non-blocking sockets, sends one request each
(`HTTP/1.1`, `Connection: close`), and decodes the answer incrementally: status line and
headers, chunked transfer encoding, then server-sent events (`StreamParser`, tested in
Testing/bench/test_sse_reader.py). A stream is **ok** when it answered 200, ended with
`data: [DONE]` and carried exactly `--tokens` content deltas; anything else is an error whose
reason is kept (status and body start, no [DONE], wrong count, error event, reset, timeout).

Streams are opened at an even rate over `--ramp` seconds, from `--sources` loopback addresses
(127.0.0.2, 127.0.0.3, ...) in turn, as many clients would. Every second one JSON line
`{"progress": ...}` goes to stdout; at the end one `{"result": ...}` line with the counts,
the reasons of the errors (and a few samples), and per-stream duration and longest silence.
"""
from __future__ import annotations

import argparse
import errno
import json
import select
import socket
import sys
import time
from collections import Counter
from typing import Any
from urllib.parse import urlsplit

_DONE = b"[DONE]"


class StreamParser:
    """Incremental decoder of one streamed chat answer: HTTP head, chunked body, SSE events.

    `feed(bytes)` takes whatever arrived (split anywhere). Afterwards: `status`, `done` (the
    `[DONE]` event came), `tokens` (content deltas that were not empty), `events`, `error`
    (an error event's text, or a protocol problem), `body_start` (first bytes of a non-200
    body), `finished` (the chunked body's last chunk came), and `text` when `keep_text`."""

    # Parsing each event's JSON costs more CPU than the gateway's forwarding of it; identical
    # payloads (the bench's upstream repeats one token chunk) are counted from a small cache.
    _cache: dict[bytes, tuple[int, str, str | None]] = {}

    def __init__(self, keep_text: bool = False) -> None:
        self.keep_text = keep_text
        self.text_parts: list[str] = []
        self.status = 0
        self.head_done = False
        self.chunked = False
        self.done = False
        self.finished = False
        self.tokens = 0
        self.events = 0
        self.error: str | None = None
        self.body_start = b""
        self._raw = bytearray()      # undecoded bytes (head, then chunked framing)
        self._chunk_left = -1        # bytes left of the current chunk; -1: a size line is next
        self._sse = b""              # decoded body bytes not yet forming a whole event
        self._data: list[bytes] = []

    @property
    def text(self) -> str:
        return "".join(self.text_parts)

    def feed(self, data: bytes) -> None:
        if self.head_done and not self.chunked:
            self._body(data)
            return
        self._raw += data
        if not self.head_done:
            end = self._raw.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(self._raw[:end]).decode("latin-1").split("\r\n")
            del self._raw[:end + 4]
            try:
                self.status = int(head[0].split(" ")[1])
            except (IndexError, ValueError):
                self.error = f"bad status line {head[0][:80]!r}"
                self.status = -1
            for line in head[1:]:
                name, _, value = line.partition(":")
                if name.strip().lower() == "transfer-encoding" and "chunked" in value.lower():
                    self.chunked = True
            self.head_done = True
            if not self.chunked:
                rest, self._raw = bytes(self._raw), bytearray()
                self._body(rest)
                return
        self._dechunk()

    def _dechunk(self) -> None:
        raw = self._raw
        pos = 0
        n = len(raw)
        while pos < n and not self.finished:
            if self._chunk_left < 0:
                nl = raw.find(b"\r\n", pos)
                if nl < 0:
                    break
                try:
                    size = int(bytes(raw[pos:nl]).split(b";")[0], 16)
                except ValueError:
                    self.error = f"bad chunk size line {bytes(raw[pos:nl])[:40]!r}"
                    self.finished = True
                    break
                pos = nl + 2
                if size == 0:
                    self.finished = True
                    break
                self._chunk_left = size
            take = min(self._chunk_left, n - pos)
            if take:
                self._body(bytes(raw[pos:pos + take]))
                pos += take
                self._chunk_left -= take
            if self._chunk_left == 0:
                if n - pos < 2:
                    break  # the chunk's CRLF has not arrived yet
                pos += 2
                self._chunk_left = -1
        del raw[:pos]

    def _body(self, data: bytes) -> None:
        if self.status != 200:
            if len(self.body_start) < 300:
                self.body_start += data[:300 - len(self.body_start)]
            return
        buf = self._sse + data
        start = 0
        while True:
            nl = buf.find(b"\n", start)
            if nl < 0:
                break
            line = buf[start:nl]
            start = nl + 1
            if line.endswith(b"\r"):
                line = line[:-1]
            if not line:
                if self._data:
                    self._event(b"\n".join(self._data))
                    self._data = []
            elif line.startswith(b"data:"):
                value = line[5:]
                self._data.append(value[1:] if value.startswith(b" ") else value)
        self._sse = buf[start:]

    def _event(self, data: bytes) -> None:
        self.events += 1
        if data == _DONE:
            self.done = True
            return
        if self.done:
            self.error = self.error or "event after [DONE]"
        hit = self._cache.get(data)
        if hit is None:
            hit = _count(data)
            if len(self._cache) < 256:
                self._cache[data] = hit
        n, text, err = hit
        self.tokens += n
        if self.keep_text and text:
            self.text_parts.append(text)
        if err is not None:
            self.error = err


def _count(data: bytes) -> tuple[int, str, str | None]:
    """(non-empty content deltas, their text, error message) of one event's JSON."""
    try:
        obj = json.loads(data)
    except ValueError:
        return 0, "", f"event is not JSON: {data[:80]!r}"
    if not isinstance(obj, dict):
        return 0, "", f"event is not an object: {data[:80]!r}"
    if "error" in obj:
        err = obj["error"]
        return 0, "", "error event: " + str(err.get("message") if isinstance(err, dict) else err)[:200]
    n, parts = 0, []
    for choice in obj.get("choices") or []:
        content = (choice.get("delta") or {}).get("content")
        if content:
            n += 1
            parts.append(content)
    return n, "".join(parts), None


# --------------------------------------------------------------------------- the client


class Conn:
    __slots__ = ("i", "sock", "state", "parser", "opened", "connected", "first", "last",
                 "max_gap", "ended", "error")

    def __init__(self, i: int, sock: socket.socket, now: float) -> None:
        self.i = i
        self.sock = sock
        self.state = "connecting"
        self.parser = StreamParser()
        self.opened = now
        self.connected = 0.0
        self.first = 0.0
        self.last = 0.0
        self.max_gap = 0.0
        self.ended = 0.0
        self.error: str | None = None


def request_bytes(url: str, key: str, tokens: int, model: str) -> bytes:
    parts = urlsplit(url)
    body = json.dumps({"model": model, "stream": True, "max_tokens": tokens,
                       "messages": [{"role": "user", "content": "Stream for a long time, please."}]}).encode()
    return (f"POST {parts.path} HTTP/1.1\r\nHost: {parts.netloc}\r\nAuthorization: Bearer {key}\r\n"
            f"Content-Type: application/json\r\nAccept: text/event-stream\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode() + body


def verdict(c: Conn, tokens: int) -> str | None:
    """None when the stream is ok, else the reason it is not."""
    p = c.parser
    if c.error:
        return c.error
    if p.status != 200:
        return f"HTTP {p.status}: {p.body_start[:120]!r}"
    if p.error:
        return p.error
    if not p.done:
        return "no [DONE]"
    if p.tokens != tokens:
        return f"{p.tokens} tokens instead of {tokens}"
    return None


def run(url: str, key: str, streams: int, tokens: int, ramp: float, sources: int,
        timeout: float, model: str = "bench") -> dict[str, Any]:
    parts = urlsplit(url)
    addr = (parts.hostname or "127.0.0.1", parts.port or 80)
    req = request_bytes(url, key, tokens, model)
    ep = select.epoll()
    conns: dict[int, Conn] = {}
    fd_index: dict[int, Conn] = {}
    finished: list[Conn] = []
    started = time.monotonic()
    deadline = started + ramp + timeout
    opened = 0
    next_progress = started + 1.0
    connect_errors: Counter = Counter()

    def end(c: Conn, error: str | None = None) -> None:
        if error and not c.error:
            c.error = error
        c.ended = time.monotonic()
        fd = c.sock.fileno()
        fd_index.pop(fd, None)
        try:
            ep.unregister(fd)
        except (OSError, ValueError):
            pass
        conns.pop(c.i, None)
        c.sock.close()
        c.sock = None  # type: ignore[assignment]
        finished.append(c)

    while opened < streams or conns:
        now = time.monotonic()
        due = streams if ramp <= 0 else min(streams, int(streams * (now - started) / ramp) + 1)
        while opened < due:
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.setblocking(False)
            if sources > 0:
                s.bind((f"127.0.0.{2 + opened % sources}", 0))
            c = Conn(opened, s, now)
            opened += 1
            rc = s.connect_ex(addr)
            if rc not in (0, errno.EINPROGRESS):
                connect_errors[errno.errorcode.get(rc, str(rc))] += 1
                conns[c.i] = c
                end(c, f"connect: {errno.errorcode.get(rc, rc)}")
                continue
            conns[c.i] = c
            ep.register(s.fileno(), select.EPOLLOUT)
            fd_index[s.fileno()] = c
        if now >= deadline:
            for c in list(conns.values()):
                end(c, "timeout (client deadline)")
            break
        wait = 0.2 if opened >= streams else max(0.0, min(0.2, started + ramp * opened / streams - now))
        for fd, ev in ep.poll(wait):
            c = fd_index.get(fd)
            if c is None or c.sock is None:
                continue
            if c.state == "connecting":
                err = c.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if err:
                    end(c, f"connect: {errno.errorcode.get(err, err)}")
                    continue
                try:
                    c.sock.send(req)  # small: fits the empty send buffer at once
                except OSError as exc:
                    end(c, f"send: {exc}")
                    continue
                c.state = "reading"
                c.connected = time.monotonic()
                ep.modify(fd, select.EPOLLIN)
                continue
            while True:
                try:
                    data = c.sock.recv(262144)
                except BlockingIOError:
                    break
                except OSError as exc:
                    end(c, f"recv: {exc.strerror or exc}")
                    break
                t = time.monotonic()
                if not data:
                    end(c)
                    break
                if c.first == 0.0:
                    c.first = t
                elif t - c.last > c.max_gap:
                    c.max_gap = t - c.last
                c.last = t
                c.parser.feed(data)
                if c.parser.finished:
                    end(c)
                    break
                if len(data) < 262144:
                    break
        now = time.monotonic()
        if now >= next_progress:
            next_progress = now + 1.0
            emit({"progress": progress(opened, conns, finished, tokens, now - started)})
    ep.close()
    return summary(finished, tokens, time.monotonic() - started, connect_errors)


def progress(opened: int, conns: dict[int, Conn], finished: list[Conn], tokens: int, t: float) -> dict[str, Any]:
    reading = sum(1 for c in conns.values() if c.state == "reading")
    return {"t": round(t, 1), "opened": opened, "open": len(conns), "reading": reading,
            "answered": sum(1 for c in conns.values() if c.first), "finished": len(finished),
            "errors": sum(1 for c in finished if verdict(c, tokens) is not None)}


def _pct(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def summary(finished: list[Conn], tokens: int, elapsed: float, connect_errors: Counter) -> dict[str, Any]:
    reasons: Counter = Counter()
    samples: list[str] = []
    for c in finished:
        why = verdict(c, tokens)
        if why is not None:
            reasons[why.split(":")[0][:60]] += 1
            if len(samples) < 5:
                samples.append(f"stream {c.i}: {why}")
    ok = [c for c in finished if verdict(c, tokens) is None]
    durations = [c.ended - c.opened for c in ok]
    ttft = [c.first - c.opened for c in ok if c.first]
    gaps = [c.max_gap for c in ok]
    return {"streams": len(finished), "ok": len(ok), "errors": len(finished) - len(ok),
            "error_reasons": dict(reasons), "error_samples": samples,
            "connect_errors": dict(connect_errors),
            "tokens_expected": tokens, "tokens_received": sum(c.parser.tokens for c in finished),
            "elapsed_s": round(elapsed, 1),
            "duration_s": {"p50": round(_pct(durations, 0.5), 2), "p99": round(_pct(durations, 0.99), 2),
                           "max": round(max(durations, default=0.0), 2)},
            "first_byte_s": {"p50": round(_pct(ttft, 0.5), 3), "p99": round(_pct(ttft, 0.99), 3),
                             "max": round(max(ttft, default=0.0), 3)},
            "longest_silence_s": {"p50": round(_pct(gaps, 0.5), 3), "p99": round(_pct(gaps, 0.99), 3),
                                  "max": round(max(gaps, default=0.0), 3)}}


def emit(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", required=True)
    p.add_argument("--key", required=True)
    p.add_argument("--streams", type=int, default=5000)
    p.add_argument("--tokens", type=int, default=1200)
    p.add_argument("--ramp", type=float, default=10.0, help="seconds over which the streams are opened")
    p.add_argument("--sources", type=int, default=20, help="loopback source addresses (0: the default one)")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds after the ramp before unfinished streams count as errors")
    p.add_argument("--model", default="bench")
    args = p.parse_args(argv)
    result = run(args.url, args.key, args.streams, args.tokens, args.ramp, args.sources, args.timeout, args.model)
    emit({"result": result})
    return 0 if result["errors"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
