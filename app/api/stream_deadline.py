"""A deadline on each write of a streamed answer (server-sent events) under gunicorn.

A client that stops reading a stream fills its TCP window, and the worker's next send blocks
(the gevent worker waits for the socket; nothing else times it out). While the body's next
chunk is being written, a watcher checks the time; a write that has not gone out within
STREAM_CLIENT_IDLE_S shuts the connection down. The blocked send then fails like a client that
hung up (EPIPE, which gunicorn treats as such, without a traceback), the body is closed and the
completion run settles once as client_disconnected. Waiting for the upstream is not counted:
only the time the server spends writing what the body gave it.

One watcher (a daemon thread: a greenlet under gevent) serves every stream of the process: a
thread per stream cost ~11 KB of memory per open stream (its greenlet, Python data stack and
events), a fifth of the 50 KB a long stream may take (bench/long_streams.py).
"""
from __future__ import annotations

import os
import socket
import threading
import time
from typing import Any, Iterable, Iterator


class _Write:
    """One stream's pending write: when it started (None: no write pending)."""
    __slots__ = ("sock", "idle_s", "since")

    def __init__(self, sock: Any, idle_s: float) -> None:
        self.sock = sock
        self.idle_s = idle_s
        self.since: float | None = None


class _Watcher:
    """Checks every registered stream each `min(idle_s / 4, 5)` seconds (the smallest idle_s
    registered) and shuts down the connection of a write pending for idle_s or longer."""

    def __init__(self) -> None:
        self._streams: set[_Write] = set()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._pid = 0
        self._period = 5.0  # the watcher's current sleep between checks

    def add(self, entry: _Write) -> None:
        with self._lock:
            self._streams.add(entry)
            if self._thread is None or not self._thread.is_alive() or self._pid != os.getpid():
                self._pid = os.getpid()  # a forked child starts its own watcher
                self._thread = threading.Thread(target=self._run, daemon=True, name="stream-send-deadline")
                self._thread.start()
        if entry.idle_s / 4 < self._period:
            self._wake.set()  # checks must come more often than the watcher now sleeps

    def remove(self, entry: _Write) -> None:
        with self._lock:
            self._streams.discard(entry)

    def _run(self) -> None:
        while True:
            with self._lock:
                entries = list(self._streams)
            now = time.monotonic()
            for entry in entries:
                since = entry.since
                if since is not None and now - since >= entry.idle_s:
                    entry.since = None
                    self.remove(entry)
                    _shut_down(entry.sock)
            self._period = min(min((e.idle_s for e in entries), default=20.0) / 4, 5.0)
            self._wake.wait(self._period)
            self._wake.clear()


_WATCHER = _Watcher()


def with_send_deadline(body: Iterable[bytes], sock: Any, idle_s: float) -> Iterator[bytes]:
    """`body`, with its connection shut down when one of its chunks is not written in `idle_s`."""
    entry = _Write(sock, idle_s)
    _WATCHER.add(entry)
    try:
        for chunk in body:
            entry.since = time.monotonic()
            yield chunk              # the server writes it before it asks for the next one
            entry.since = None
    finally:
        _WATCHER.remove(entry)
        close = getattr(body, "close", None)
        if close is not None:
            close()


def _shut_down(sock: Any) -> None:
    """Shut the connection down under the blocked writer. Through a duplicate descriptor: gevent's
    own `shutdown` would wake the writer with EBADF ("closed in another greenlet"), which gunicorn
    logs as a socket error; the kernel's shutdown makes the pending send fail with EPIPE, which
    it treats as a client that went away."""
    try:
        dup = socket.socket(fileno=os.dup(sock.fileno()))
    except OSError:
        return  # already closed
    try:
        dup.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    finally:
        dup.close()
