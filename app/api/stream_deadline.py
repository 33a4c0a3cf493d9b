"""A deadline on each write of a streamed answer (server-sent events) under gunicorn.

A client that stops reading a stream fills its TCP window, and the worker's next send blocks
(the gevent worker waits for the socket; nothing else times it out). While the body's next
chunk is being written, a watcher (one greenlet per stream) checks the time; a write that has
not gone out within STREAM_CLIENT_IDLE_S shuts the connection down. The blocked send then
fails like a client that hung up (EPIPE, which gunicorn treats as such, without a traceback),
the body is closed and the completion run settles once as client_disconnected. Waiting for the upstream is not counted:
only the time the server spends writing what the body gave it.
"""
from __future__ import annotations

import os
import socket
import threading
import time
from typing import Any, Iterable, Iterator


def with_send_deadline(body: Iterable[bytes], sock: Any, idle_s: float) -> Iterator[bytes]:
    """`body`, with its connection shut down when one of its chunks is not written in `idle_s`."""
    writing_since: list[float | None] = [None]
    done = threading.Event()

    def watch() -> None:
        while not done.wait(min(idle_s / 4, 5.0)):
            since = writing_since[0]
            if since is not None and time.monotonic() - since >= idle_s:
                _shut_down(sock)
                return

    threading.Thread(target=watch, daemon=True, name="stream-send-deadline").start()
    try:
        for chunk in body:
            writing_since[0] = time.monotonic()
            yield chunk              # the server writes it before it asks for the next one
            writing_since[0] = None
    finally:
        done.set()
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
