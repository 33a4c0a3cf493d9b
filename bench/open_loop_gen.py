#!/usr/bin/env python3
"""Open-loop HTTP load generator: a constant arrival rate, latency from the intended send time.

    .venv/bin/python bench/open_loop_gen.py --url http://127.0.0.1:8000/v1/chat/completions \\
        --rate 500 --duration 10 --body-file body.json [--header 'Authorization: Bearer ...'] \\
        [--stream] [--warmup 2] [--timeout 10] [--max-conns 1000] [--start T] --out samples.json

Why not wrk: wrk (and every closed-loop tool) sends the next request on a connection only when
the previous answer came back, so a stalled server is sent fewer requests and the wait of the
requests that were never sent is never measured ("coordinated omission"). Here the send time of
request i is fixed in advance, ``start + i / rate``, whatever the server does; its latency is
counted from that intended time, so time spent waiting for a free connection, for the
connection to open, or for the generator itself to get round to it, is part of it. Debian's
packages on this machine have no open-loop tool (no wrk2, vegeta or k6; `hey -q` is a rate limit
on closed-loop workers), and streams need the time to their first content token, which no
packaged tool reports: hence this one, checked against `hey` where `hey` is exact
(``bench/open_loop.py --validate``).

Per request it records (``time.monotonic`` seconds): intended send time, actual send time,
first content token (streams: the first SSE event with a non-empty ``content`` string;
non-streaming: the first response byte), completion, HTTP status and an error kind. Writes them
as JSON (one list per field) for ``bench/open_loop.py`` to merge and summarise
(:func:`summarize`); requests scheduled during ``--warmup`` are sent but not counted.

Connections: HTTP/1.1 keep-alive, one request at a time each; a request takes an idle
connection, or opens one while fewer than ``--max-conns`` exist, or waits for one (in order).
A request not answered within ``--timeout`` of its intended time is abandoned (its connection
closed) and counted as an error.
"""
from __future__ import annotations

import argparse
import asyncio
import collections
import json
import math
import re
import resource
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any
from urllib.parse import urlsplit

NAN = float("nan")
# The first SSE event that carries text: `"content":"x` with x not the closing quote (the role
# chunk's "content":"" does not count). Works on the gateway's, the fake's and LiteLLM's JSON.
CONTENT_RE = re.compile(rb'"content"\s*:\s*"[^"]')
TAIL = 64  # bytes of the body kept to find a pattern cut between two reads


@dataclass
class Samples:
    """One list per field; index k is the k-th request this generator sent."""
    intended: list[float] = field(default_factory=list)
    sent: list[float] = field(default_factory=list)   # NaN: never sent
    first: list[float] = field(default_factory=list)  # first content token / first byte; NaN
    done: list[float] = field(default_factory=list)   # NaN: never completed
    status: list[int] = field(default_factory=list)   # 0: no HTTP status line
    error: list[str] = field(default_factory=list)    # "" when the request succeeded

    def add(self, intended: float) -> int:
        self.intended.append(intended)
        self.sent.append(NAN)
        self.first.append(NAN)
        self.done.append(NAN)
        self.status.append(0)
        self.error.append("")
        return len(self.intended) - 1

    def extend(self, other: "Samples") -> None:
        for name in ("intended", "sent", "first", "done", "status", "error"):
            getattr(self, name).extend(getattr(other, name))

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "Samples":
        return cls(**{k: data[k] for k in ("intended", "sent", "first", "done", "status", "error")})


# --------------------------------------------------------------------------- accounting


def schedule(start: float, rate: float, count: int) -> list[float]:
    """Intended send times: computed from the index, not accumulated, so no drift."""
    return [start + i / rate for i in range(count)]


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile of an ascending list (NaN when empty): the smallest value with at
    least q% of the values at or below it."""
    if not sorted_values:
        return NAN
    # rounded first: 99.9 / 100 * 1000 is 999.0000000000001 in floating point, not rank 1000
    rank = max(1, math.ceil(round(q / 100.0 * len(sorted_values), 9)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


QUANTILES = (50.0, 99.0, 99.9)


def _quantiles_ms(values: list[float]) -> dict[str, float]:
    values.sort()
    return {f"p{q:g}": percentile(values, q) * 1000.0 for q in QUANTILES}


def summarize(s: Samples, measure_from: float, rate: float) -> dict[str, Any]:
    """Figures of the requests intended at or after `measure_from` (the warm-up excluded).

    latency = completion - intended send time (what a user arriving at that time waits);
    ttft = first content token - intended send time; service = completion - actual send time
    (what a closed-loop tool would report); send_lag = actual send - intended (time the request
    waited for a connection or the generator: included in latency, excluded from service).
    Quantiles are over the successful requests; failed ones are counted in `errors`."""
    idx = [i for i, t in enumerate(s.intended) if t >= measure_from]
    ok = [i for i in idx if not s.error[i]]
    errors: dict[str, int] = collections.Counter(s.error[i] for i in idx if s.error[i])
    latency = [s.done[i] - s.intended[i] for i in ok]
    ttft = [s.first[i] - s.intended[i] for i in ok if not math.isnan(s.first[i])]
    service = [s.done[i] - s.sent[i] for i in ok]
    lag = [s.sent[i] - s.intended[i] for i in idx if not math.isnan(s.sent[i])]
    window = 0.0
    if ok:
        window = max(s.done[i] for i in ok) - min(s.intended[i] for i in idx)
    return {
        "offered_rate": rate, "requests": len(idx), "ok": len(ok),
        "errors": sum(errors.values()), "errors_by_kind": dict(sorted(errors.items())),
        "achieved_rate": len(ok) / window if window > 0 else 0.0,
        "latency_ms": _quantiles_ms(latency), "ttft_ms": _quantiles_ms(ttft),
        "service_ms": _quantiles_ms(service), "send_lag_ms": _quantiles_ms(lag),
        "max_latency_ms": max(latency) * 1000.0 if latency else NAN,
    }


# --------------------------------------------------------------------------- HTTP client


class Conn(asyncio.Protocol):
    """One keep-alive HTTP/1.1 client connection with an incremental response parser."""

    def __init__(self, run: "OpenLoop") -> None:
        self.run = run
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.k = -1  # index of the request in flight, -1 when idle
        self.waiter: asyncio.Future[bool] | None = None
        self.buf = bytearray()
        self.used = False  # a request was sent on it before
        self.answered = False  # the request in flight got at least one byte back

    # -- asyncio callbacks
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.run.forget(self)
        if self.k >= 0 and self.waiter is not None and not self.waiter.done():
            if self.until_close and self.head_done:
                self._complete("")  # a body delimited by the end of the connection
            else:
                self._complete("closed")

    def data_received(self, data: bytes) -> None:
        if self.k < 0:
            return  # bytes after a complete answer on an idle connection: ignored
        now = self.run.clock()
        s = self.run.samples
        self.answered = True
        if not self.stream and math.isnan(s.first[self.k]):
            s.first[self.k] = now
        self.buf += data
        if not self.head_done and not self._parse_head():
            return
        if self.chunked:
            self._parse_chunks(now)
        elif self.until_close:
            self._body(bytes(self.buf), now)
            self.buf.clear()
        else:
            take = min(self.left, len(self.buf))
            self._body(bytes(self.buf[:take]), now)
            del self.buf[:take]
            self.left -= take
            if self.left == 0:
                self._complete("")

    # -- requests
    def send(self, k: int, request: bytes, stream: bool) -> "asyncio.Future[bool]":
        self.k, self.stream = k, stream
        self.head_done = self.chunked = self.until_close = self.close_after = False
        self.left = 0
        self.chunk_left = -1  # -1: expecting a chunk-size line; -2: expecting the trailer
        self.tail = b""
        self.saw_done = False
        self.answered = False
        self.buf.clear()
        self.waiter = self.run.loop.create_future()
        self.transport.write(request)  # type: ignore[union-attr]
        return self.waiter

    def abort(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.abort()

    # -- parsing
    def _parse_head(self) -> bool:
        end = self.buf.find(b"\r\n\r\n")
        if end < 0:
            return False
        lines = bytes(self.buf[:end]).decode("latin-1").split("\r\n")
        del self.buf[:end + 4]
        parts = lines[0].split(" ", 2)
        try:
            status = int(parts[1])
        except (IndexError, ValueError):
            self._complete("bad-response")
            return False
        if status == 100:  # 100 Continue: the real head follows
            return self._parse_head()
        self.run.samples.status[self.k] = status
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip().lower()
        self.head_done = True
        self.close_after = headers.get("connection") == "close"
        if "chunked" in headers.get("transfer-encoding", ""):
            self.chunked = True
        elif "content-length" in headers:
            self.left = int(headers["content-length"])
            if self.left == 0:
                self._complete("")
                return False
        else:
            self.until_close = True
        return True

    def _parse_chunks(self, now: float) -> None:
        buf, pos = self.buf, 0
        while self.k >= 0:
            if self.chunk_left == -1:
                eol = buf.find(b"\r\n", pos)
                if eol < 0:
                    break
                size = int(bytes(buf[pos:eol]).split(b";")[0], 16)
                pos = eol + 2
                self.chunk_left = size + 2 if size else -2  # data + its CRLF
            elif self.chunk_left == -2:  # trailer section: an empty line ends the body
                eol = buf.find(b"\r\n", pos)
                if eol < 0:
                    break
                empty = eol == pos
                pos = eol + 2
                if empty:
                    del buf[:pos]
                    self._complete("")
                    return
            else:
                take = min(self.chunk_left, len(buf) - pos)
                if take <= 0:
                    break
                data_end = min(take, self.chunk_left - 2)  # leave the chunk's CRLF out
                if data_end > 0:
                    self._body(bytes(buf[pos:pos + data_end]), now)
                pos += take
                self.chunk_left -= take
                if self.chunk_left == 0:
                    self.chunk_left = -1
        del buf[:pos]

    def _body(self, data: bytes, now: float) -> None:
        if not self.stream:
            return
        window = self.tail + data
        if math.isnan(self.run.samples.first[self.k]) and CONTENT_RE.search(window):
            self.run.samples.first[self.k] = now
        if b"[DONE]" in window:
            self.saw_done = True
        self.tail = window[-TAIL:]

    def _complete(self, error: str) -> None:
        k, s = self.k, self.run.samples
        self.k = -1
        s.done[k] = self.run.clock()
        if not error and s.status[k] != 200:
            error = f"status-{s.status[k]}"
        if not error and self.stream and not self.saw_done:
            error = "stream-without-done"
        s.error[k] = error
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(not (error or self.close_after or self.closed))


class OpenLoop:
    """Sends `count` requests at `rate` per second from `start` (loop time = time.monotonic),
    each on its own task, and records their timings in `samples`."""

    def __init__(self, url: str, body: bytes, headers: list[str], stream: bool, rate: float,
                 count: int, start: float, timeout: float = 10.0, max_conns: int = 1000,
                 shard: int = 0, shards: int = 1) -> None:
        parts = urlsplit(url)
        self.host, self.port = parts.hostname or "127.0.0.1", parts.port or 80
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        head = [f"POST {path} HTTP/1.1", f"Host: {self.host}:{self.port}",
                "Content-Type: application/json", f"Content-Length: {len(body)}", *headers]
        self.request = ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body
        self.stream, self.timeout, self.max_conns = stream, timeout, max_conns
        self.times = schedule(start, rate, count)[shard::shards]
        self.samples = Samples()
        self.clock = time.monotonic
        self.idle: list[Conn] = []
        self.total = 0  # connections open or opening
        self.waiters: collections.deque[asyncio.Future[Conn | None]] = collections.deque()
        self.max_open = 0
        self.retries = 0  # requests sent again after an idle connection closed under them
        self.loop: asyncio.AbstractEventLoop

    async def run(self) -> Samples:
        self.loop = asyncio.get_running_loop()
        self.clock = self.loop.time  # the loop's clock is time.monotonic
        tasks: set[asyncio.Task[None]] = set()
        times, n, i = self.times, len(self.times), 0
        while i < n:
            now = self.clock()
            while i < n and times[i] <= now:  # all requests due by now, late ones included
                task = self.loop.create_task(self._one(self.samples.add(times[i])))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
                i += 1
            if i < n:
                await asyncio.sleep(max(0.0, times[i] - self.clock()))
        while tasks:
            await asyncio.gather(*list(tasks), return_exceptions=True)
        for conn in self.idle:
            conn.abort()
        return self.samples

    async def _one(self, k: int) -> None:
        s = self.samples
        task = asyncio.current_task()
        timer = self.loop.call_at(s.intended[k] + self.timeout, task.cancel)  # type: ignore[union-attr]
        conn: Conn | None = None
        try:
            for attempt in (0, 1):
                conn = await self._acquire()
                reused, conn.used = conn.used, True
                if attempt == 0:
                    s.sent[k] = self.clock()
                reusable = await conn.send(k, self.request, self.stream)
                if s.error[k] == "closed" and reused and not conn.answered and attempt == 0:
                    # The server closed an idle keep-alive connection as this request left on
                    # it (nothing came back): sent again once on another connection, as HTTP
                    # clients do; the latency still counts from the intended time.
                    s.error[k] = ""
                    self.retries += 1
                    conn = None
                    continue
                if reusable:
                    self._release(conn)
                else:
                    conn.abort()
                conn = None
                break
        except asyncio.CancelledError:
            s.error[k], s.done[k] = "timeout", NAN
        except OSError as exc:
            s.error[k] = "connect" if math.isnan(s.sent[k]) else type(exc).__name__
        finally:
            timer.cancel()
            if conn is not None:  # abandoned mid-answer: the connection is unusable
                conn.k = -1
                conn.abort()

    # -- connection pool
    async def _acquire(self) -> Conn:
        while True:
            while self.idle:
                conn = self.idle.pop()
                if not conn.closed:
                    return conn
            if self.total < self.max_conns:
                self.total += 1
                self.max_open = max(self.max_open, self.total)
                try:
                    _, conn = await self.loop.create_connection(lambda: Conn(self), self.host,
                                                                self.port)
                except BaseException:
                    self.total -= 1
                    self._wake()
                    raise
                return conn  # type: ignore[return-value]
            waiter: asyncio.Future[Conn | None] = self.loop.create_future()
            self.waiters.append(waiter)
            try:
                got = await waiter
            except asyncio.CancelledError:
                # timed out just as a connection was handed over: pass it on, do not leak it
                if waiter.done() and not waiter.cancelled():
                    handed = waiter.result()
                    if handed is not None:
                        self._release(handed)
                    else:
                        self._wake()
                raise
            if got is not None and not got.closed:
                return got

    def _release(self, conn: Conn) -> None:
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_result(conn)
                return
        self.idle.append(conn)

    def _wake(self) -> None:
        """A connection slot came free: the first waiter tries again (it may open one)."""
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    def forget(self, conn: Conn) -> None:
        self.total -= 1
        if conn in self.idle:
            self.idle.remove(conn)
        self._wake()


# --------------------------------------------------------------------------- command line


@dataclass
class GenResult:
    samples: dict[str, list[Any]]
    cpu_s: float
    max_conns_open: int
    retries: int


def generate(url: str, body: bytes, headers: list[str], stream: bool, rate: float,
             duration: float, warmup: float, start: float, timeout: float, max_conns: int,
             shard: int = 0, shards: int = 1) -> GenResult:
    count = int(round(rate * (warmup + duration)))
    run = OpenLoop(url, body, headers, stream, rate, count, start, timeout, max_conns, shard, shards)
    before = resource.getrusage(resource.RUSAGE_SELF)
    samples = asyncio.run(run.run())
    after = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return GenResult(asdict(samples), cpu, run.max_open, run.retries)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", required=True)
    p.add_argument("--rate", type=float, required=True, help="requests per second")
    p.add_argument("--duration", type=float, default=10.0, help="measured seconds")
    p.add_argument("--warmup", type=float, default=0.0, help="unmeasured seconds before")
    p.add_argument("--body-file", required=True)
    p.add_argument("--header", action="append", default=[], help="'Name: value', repeatable")
    p.add_argument("--stream", action="store_true", help="SSE answers: time to first content")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds from the intended time")
    p.add_argument("--max-conns", type=int, default=1000)
    p.add_argument("--start", type=float, default=0.0,
                   help="time.monotonic() of the first send (default: in 0.2 s)")
    p.add_argument("--shard", default="0/1", help="k/N: send requests k, k+N, ... of the schedule")
    p.add_argument("--out", required=True, help="JSON file for the samples")
    p.add_argument("--summary", action="store_true", help="also print the summary")
    args = p.parse_args(argv)
    shard, shards = (int(x) for x in args.shard.split("/"))
    body = open(args.body_file, "rb").read()
    start = args.start or time.monotonic() + 0.2
    result = generate(args.url, body, args.header, args.stream, args.rate, args.duration,
                      args.warmup, start, args.timeout, args.max_conns, shard, shards)
    with open(args.out, "w") as out:
        json.dump(asdict(result), out)
    if args.summary:
        print(json.dumps(summarize(Samples.from_json(result.samples), start + args.warmup,
                                   args.rate), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
