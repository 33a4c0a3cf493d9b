"""A deadline on each write of a streamed answer (server-sent events) under gunicorn.

A client that stops reading a stream fills its TCP window, and the worker's next send blocks
(the gevent worker waits for the socket; nothing else times it out). While the body's next
chunk is being written, the process's one watcher checks the time; a write that has not gone
out within STREAM_CLIENT_IDLE_S shuts the connection down. The blocked send then fails like a
client that hung up (EPIPE, which gunicorn treats as such, without a traceback), the body is
closed and the completion run settles once as client_disconnected. Waiting for the upstream
is not counted: only the time the server spends writing what the body gave it.

One watcher (a thread; a greenlet under gevent) per process serves every stream: a stream
only registers its write slot, and marks the start and the end of each write. (A watcher per
stream cost a thread start and a timer per stream: ~5% of a stream's CPU at 64 connections.)
"""
from __future__ import annotations

import os
import socket
import threading
import time
from typing import Any, Iterable, Iterator


class _Write:
    """One stream's slot: when its current write started (None: not writing)."""

    __slots__ = ("sock", "idle_s", "since")

    def __init__(self, sock: Any, idle_s: float) -> None:
        self.sock, self.idle_s, self.since = sock, idle_s, None


class _Watcher:
    """Checks every registered stream each `min(idle_s / 4, 5)` seconds; sleeps while none is."""

    def __init__(self) -> None:
        self._writes: set[_Write] = set()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._pid = 0
        self._tick = 5.0

    def add(self, write: _Write) -> None:
        tick = min(write.idle_s / 4, 5.0)
        with self._lock:
            self._writes.add(write)
            if self._pid != os.getpid():  # first stream of this process (or of a forked child)
                self._pid = os.getpid()
                self._wake = threading.Event()
                threading.Thread(target=self._run, args=(self._wake,), daemon=True,
                                 name="stream-send-deadline").start()
            elif tick < self._tick or len(self._writes) == 1:
                self._wake.set()

    def discard(self, write: _Write) -> None:
        with self._lock:
            self._writes.discard(write)

    def _run(self, wake: threading.Event) -> None:
        while True:
            with self._lock:
                writes = list(self._writes)
            if not writes:
                self._tick = 5.0
                wake.wait()
                wake.clear()
                continue
            self._tick = min(min(w.idle_s for w in writes) / 4, 5.0)
            now = time.monotonic()
            for w in writes:
                since = w.since
                if since is not None and now - since >= w.idle_s:
                    w.since = None
                    self.discard(w)
                    _shut_down(w.sock)
            if wake.wait(self._tick):
                wake.clear()


_WATCHER = _Watcher()


def with_send_deadline(body: Iterable[bytes], sock: Any, idle_s: float) -> Iterator[bytes]:
    """`body`, with its connection shut down when one of its chunks is not written in `idle_s`."""
    write = _Write(sock, idle_s)
    _WATCHER.add(write)
    monotonic = time.monotonic
    try:
        for chunk in body:
            write.since = monotonic()
            yield chunk              # the server writes it before it asks for the next one
            write.since = None
    finally:
        _WATCHER.discard(write)
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
