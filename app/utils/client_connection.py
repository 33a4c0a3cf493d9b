"""Whether the client of the current request is still connected, for code that waits before
answering (a provider queue) and must stop when nobody is listening any more.

The HTTP layer calls `watch(socket)` at the start of every request; services call `gone()`.
The probe lives in a context variable: per request under gevent (each greenlet has its own
context) and under threads. Without a socket (the test client, the embedded server) the
client is never seen as gone.
"""
from __future__ import annotations

import select
import socket
from contextvars import ContextVar
from typing import Any, Callable, Optional

_probe: ContextVar[Optional[Callable[[], bool]]] = ContextVar("client_connection_probe", default=None)


def watch(sock: Any) -> None:
    """Probe `sock` (the request's client socket, or None) for the rest of this request."""
    _probe.set(_socket_probe(sock) if sock is not None else None)


def gone() -> bool:
    """True when the client closed or reset its connection."""
    probe = _probe.get()
    return probe() if probe is not None else False


def _socket_probe(sock: Any) -> Callable[[], bool]:
    def closed() -> bool:
        # Readable with nothing to read = the peer closed; readable with data = a pipelined
        # next request (still connected). Never blocks: select with timeout 0, then a peek.
        try:
            readable, _, _ = select.select([sock], [], [], 0)
            return bool(readable) and sock.recv(1, socket.MSG_PEEK) == b""
        except (OSError, ValueError):
            return True
    return closed
