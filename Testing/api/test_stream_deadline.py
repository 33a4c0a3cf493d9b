"""The write deadline of streamed answers (app/api/stream_deadline.py): a write pending longer
than the idle time shuts its connection down, and one watcher serves every open stream of the
process (a watcher per stream cost ~11 KB of memory per open stream)."""
from __future__ import annotations

import socket
import threading

from app.api.stream_deadline import with_send_deadline


def watchers() -> int:
    return sum(1 for t in threading.enumerate() if t.name == "stream-send-deadline" and t.is_alive())


def test_a_write_pending_past_the_idle_time_shuts_the_connection_down():
    """The server took a chunk and never finished writing it: after idle_s the connection is
    shut down under it, and the peer reads the end of the stream."""
    server, client = socket.socketpair()
    try:
        body = with_send_deadline(iter([b"first", b"second"]), server, 0.2)
        assert next(body) == b"first"     # handed to the server, whose write never completes
        client.settimeout(30)
        assert client.recv(10) == b""     # shut down by the watcher
        body.close()
    finally:
        server.close()
        client.close()


def test_one_watcher_serves_every_open_stream():
    """Twenty streams being written at once: one watcher thread, not one per stream; a stream
    whose chunks are all taken in time is never shut down."""
    pairs = [socket.socketpair() for _ in range(20)]
    try:
        bodies = [with_send_deadline(iter([b"a", b"b"]), server, 60) for server, _ in pairs]
        assert [next(b) for b in bodies] == [b"a"] * 20
        assert watchers() == 1
        assert [list(b) for b in bodies] == [[b"b"]] * 20
        for server, client in pairs:
            server.sendall(b"still open")
            client.settimeout(30)
            assert client.recv(20) == b"still open"
    finally:
        for server, client in pairs:
            server.close()
            client.close()
