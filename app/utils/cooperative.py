"""Taking turns under gevent: a request that does no I/O of its own must still let the worker's
other connections be served."""
from __future__ import annotations

from typing import Callable

_UNRESOLVED = object()
_impl: object = _UNRESOLVED


def pass_turn() -> None:
    """Under gevent (cooperative sockets), let the event loop run one iteration before going on;
    elsewhere (threads, tests) nothing.

    A gevent greenlet only yields when it waits for I/O. A request that needs none (a response-
    cache hit from a worker's hot copy) writes its answer, finds the client's next request already
    in the socket and serves it too, again and again, while the worker's other connections wait:
    measured with wrk at 16 connections, half the hits took 2 ms and a quarter 0.2-1.4 s. A timer
    of a microsecond puts the greenlet behind everything the loop has ready (`gevent.sleep(0)`
    would not: it may run again before the loop polls for I/O, and p99 stayed at ~150 ms)."""
    global _impl
    if _impl is _UNRESOLVED:
        _impl = _resolve()
    if _impl is not None:
        _impl()  # type: ignore[operator]


def _resolve() -> Callable[[], None] | None:
    try:
        import gevent
        from gevent import monkey
    except ImportError:  # pragma: no cover - gevent is in requirements.txt
        return None
    if not monkey.is_module_patched("socket"):
        return None
    return lambda: gevent.sleep(0.000001)
