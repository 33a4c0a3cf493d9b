"""app/api/stream_deadline.py: one watcher per process gives up every stream whose write does
not go out within its idle deadline, and leaves the streams that are being read alone.
(Under gunicorn with real stalled clients: Testing/e2e/test_hostile_upstreams.py.)"""
from __future__ import annotations

import socket
import threading

from app.api import stream_deadline
from app.api.stream_deadline import with_send_deadline

CHUNK = b"x" * 65536


class Body:
    """A streamed body of `n` chunks that records whether it was closed."""

    def __init__(self, n: int) -> None:
        self.n, self.closed = n, False

    def __iter__(self):
        for _ in range(self.n):
            yield CHUNK

    def close(self) -> None:
        self.closed = True


def _serve(body: Body, sock: socket.socket, idle_s: float, outcome: dict) -> None:
    """What the server does with a body: write each chunk before asking for the next."""
    stream = with_send_deadline(body, sock, idle_s)
    try:
        for chunk in stream:
            sock.sendall(chunk)
        outcome["result"] = "complete"
    except OSError as exc:
        outcome["result"] = type(exc).__name__
    finally:
        stream.close()


def _drain(sock: socket.socket, total: int) -> int:
    got = 0
    while got < total:
        data = sock.recv(1 << 20)
        if not data:
            break
        got += len(data)
    return got


def test_stalled_stream_is_shut_down_and_a_read_one_completes_beside_it():
    """Two streams at once under one watcher: the one whose client never reads is shut down
    (its blocked send fails with a broken pipe, its body is closed); the one whose client
    reads gets all its bytes."""
    stalled_srv, stalled_cli = socket.socketpair()
    read_srv, read_cli = socket.socketpair()
    stalled_body, read_body = Body(1000), Body(200)
    stalled, read = {}, {}
    threads = [threading.Thread(target=_serve, args=(stalled_body, stalled_srv, 0.2, stalled)),
               threading.Thread(target=_serve, args=(read_body, read_srv, 0.2, read))]
    for t in threads:
        t.start()
    received = _drain(read_cli, 200 * len(CHUNK))
    for t in threads:
        t.join(timeout=60)
    assert stalled == {"result": "BrokenPipeError"} and stalled_body.closed
    assert read == {"result": "complete"} and read_body.closed
    assert received == 200 * len(CHUNK)
    for s in (stalled_srv, stalled_cli, read_srv, read_cli):
        s.close()


def test_finished_streams_leave_the_watcher():
    """A stream that ended (read to its end or closed early) is no longer watched."""
    srv, cli = socket.socketpair()
    whole = with_send_deadline(iter([b"a", b"b"]), srv, 60.0)
    assert list(whole) == [b"a", b"b"]
    early = with_send_deadline(iter([b"a", b"b"]), srv, 60.0)
    assert next(early) == b"a"
    early.close()
    assert stream_deadline._WATCHER._writes == set()
    srv.close()
    cli.close()


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
