"""A small real HTTP/1.1 server for the fake upstream providers (Anthropic, Gemini, Ollama,
GigaChat): asyncio streams on their own loop in a real OS thread (like `fake_openai`, so it
works whether or not gevent patched the process), keep-alive, Content-Length request bodies,
and answers that are either whole (`Reply`) or streamed in chunked encoding (`Streamed`), with
optional pauses between events and a connection cut mid-stream.

A fake is a subclass with a `handle(request)` method; every request is recorded (method,
path, query, lower-cased headers, raw and parsed body) for the tests to assert on.
"""
from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from typing import Any, Iterable
from urllib.parse import parse_qs

from Testing.fakes.fake_openai import _new_loop, _original

_REASONS = {200: "OK", 400: "Bad Request", 401: "Unauthorized", 403: "Forbidden", 404: "Not Found",
            405: "Method Not Allowed", 413: "Payload Too Large", 422: "Unprocessable Entity",
            429: "Too Many Requests", 500: "Internal Server Error", 503: "Service Unavailable",
            529: "Overloaded"}


@dataclass
class FakeRequest:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    raw_body: bytes

    @property
    def json(self) -> Any:
        try:
            return json.loads(self.raw_body) if self.raw_body else None
        except ValueError:
            return None

    def record(self) -> dict[str, Any]:
        body: Any = self.json
        if body is None and self.raw_body:
            body = self.raw_body.decode("utf-8", "replace")
        return {"method": self.method, "path": self.path, "query": self.query, "headers": self.headers,
                "body": body, "time": time.time()}


@dataclass
class Reply:
    status: int
    body: bytes | dict | list
    headers: dict[str, str] = field(default_factory=dict)
    content_type: str = "application/json"

    def data(self) -> bytes:
        return self.body if isinstance(self.body, bytes) else json.dumps(self.body).encode()


@dataclass
class Streamed:
    """A 200 answer streamed event by event (each element leaves in its own write)."""
    events: Iterable[bytes | float]   # a number: pause that many seconds there (a silent upstream)
    content_type: str = "text/event-stream"
    delay_s: float = 0.0
    die_after: int | None = None  # cut the connection after this many events (no terminator)
    headers: dict[str, str] = field(default_factory=dict)


HANG = object()  # a handler's answer: never reply


def sse(obj: Any, event: str | None = None) -> bytes:
    head = f"event: {event}\n".encode() if event else b""
    return head + b"data: " + json.dumps(obj, ensure_ascii=False).encode() + b"\n\n"


def echo_words(text: str, n: int) -> list[str]:
    """The n answer pieces of every fake: "Echo:" and the words of `text`, cycled."""
    words = ["Echo:"] + text.split()
    return [(" " if i else "") + words[i % len(words)] for i in range(n)]


def count_words(*texts: str) -> int:
    return sum(len(t.split()) for t in texts)


class FakeHTTPServer:
    """Subclasses implement `handle(request) -> Reply | Streamed | HANG`."""

    name = "fake"

    def __init__(self, host: str = "127.0.0.1") -> None:
        self.host = host
        self.port = 0
        self._lock = _original("_thread", "allocate_lock")()
        self._recorded: list[dict[str, Any]] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.AbstractServer | None = None
        self._stopped = _original("_thread", "allocate_lock")()
        self._writers: set[asyncio.StreamWriter] = set()

    # -- lifecycle ----------------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 10.0) -> "FakeHTTPServer":
        ready = _original("_thread", "allocate_lock")()
        ready.acquire()
        self._stopped.acquire()
        _original("_thread", "start_new_thread")(self._run, (ready,))
        if not ready.acquire(True, timeout) or not self.port:
            raise RuntimeError(f"{self.name} did not start")
        return self

    def _run(self, ready: Any) -> None:
        loop = _new_loop()
        self._loop = loop
        asyncio.set_event_loop(loop)
        try:
            self._server = loop.run_until_complete(asyncio.start_server(self._serve, self.host, 0))
            self.port = self._server.sockets[0].getsockname()[1]
        finally:
            ready.release()
        try:
            loop.run_forever()
        finally:
            self._server.close()
            for task in asyncio.all_tasks(loop):
                task.cancel()
            loop.run_until_complete(asyncio.sleep(0))
            loop.close()
            self._stopped.release()

    def stop(self, timeout: float = 5.0) -> None:
        loop = self._loop
        if loop is None or loop.is_closed():
            return

        def shutdown() -> None:
            for writer in list(self._writers):
                writer.transport.abort()
            loop.stop()

        loop.call_soon_threadsafe(shutdown)
        self._stopped.acquire(True, timeout)

    def __enter__(self) -> "FakeHTTPServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- recorded requests ---------------------------------------------------------------------

    def requests(self) -> list[dict[str, Any]]:
        with self._lock:
            return list(self._recorded)

    def reset(self) -> None:
        with self._lock:
            self._recorded.clear()

    def handle(self, request: FakeRequest) -> Any:
        raise NotImplementedError

    # -- HTTP -----------------------------------------------------------------------------------

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            while True:
                request = await self._read(reader)
                if request is None:
                    return
                with self._lock:
                    self._recorded.append(request.record())
                    del self._recorded[:-1000]
                answer = self.handle(request)
                if answer is HANG:
                    await asyncio.sleep(3600)
                    return
                if isinstance(answer, Streamed):
                    if not await self._write_stream(writer, answer):
                        return
                else:
                    data = answer.data()
                    head = [f"HTTP/1.1 {answer.status} {_REASONS.get(answer.status, 'Unknown')}",
                            f"Content-Type: {answer.content_type}", f"Content-Length: {len(data)}"]
                    head += [f"{k}: {v}" for k, v in answer.headers.items()]
                    writer.write(("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + data)
                    await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            return
        finally:
            self._writers.discard(writer)
            writer.close()

    async def _read(self, reader: asyncio.StreamReader) -> FakeRequest | None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, ConnectionError):
            return None
        lines = head.decode("latin-1").split("\r\n")
        method, target, _ = lines[0].split(" ", 2)
        headers: dict[str, str] = {}
        for line in lines[1:]:
            if ":" in line:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
        body = await reader.readexactly(int(headers.get("content-length", "0") or 0))
        path, _, query = target.partition("?")
        return FakeRequest(method, path, {k: v[-1] for k, v in parse_qs(query).items()}, headers, body)

    async def _write_stream(self, writer: asyncio.StreamWriter, answer: Streamed) -> bool:
        head = ["HTTP/1.1 200 OK", f"Content-Type: {answer.content_type}", "Transfer-Encoding: chunked",
                "Cache-Control: no-cache"] + [f"{k}: {v}" for k, v in answer.headers.items()]
        writer.write(("\r\n".join(head) + "\r\n\r\n").encode("latin-1"))
        for i, event in enumerate(answer.events):
            if answer.die_after is not None and i >= answer.die_after:
                await writer.drain()
                writer.transport.abort()
                return False
            if isinstance(event, (int, float)):
                await asyncio.sleep(event)
                continue
            if i and answer.delay_s:
                await asyncio.sleep(answer.delay_s)
            writer.write(b"%x\r\n%s\r\n" % (len(event), event))
            await writer.drain()
        writer.write(b"0\r\n\r\n")
        await writer.drain()
        return True
