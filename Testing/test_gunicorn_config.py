"""The gunicorn response writer of app/overrides.py: fewer sends, byte-exact HTTP/1.1."""
from __future__ import annotations

from types import SimpleNamespace

from gunicorn.config import Config

from app.overrides import OneSendResponse
from app.utils.streaming import FinalChunk


class RecordingSocket:
    def __init__(self) -> None:
        self.sends: list[bytes] = []

    def sendall(self, data: bytes) -> None:
        self.sends.append(bytes(data))


def _response(headers: list[tuple[str, str]]) -> tuple[object, RecordingSocket]:
    req = SimpleNamespace(version=(1, 1), method="POST", should_close=lambda: False)
    sock = RecordingSocket()
    resp = OneSendResponse(req, sock, Config())
    resp.start_response("200 OK", headers)
    return resp, sock


def _split(raw: bytes) -> tuple[bytes, bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    return head, body


def test_stream_headers_go_with_first_chunk_and_terminator_with_final_chunk():
    """A chunked stream: headers leave with the first event, the terminating chunk with the
    FinalChunk; the bytes on the wire are exactly headers + chunks + 0-chunk."""
    resp, sock = _response([("Content-Type", "text/event-stream")])
    resp.write(b"data: a\n\n")
    resp.write(FinalChunk(b"data: [DONE]\n\n"))
    resp.close()
    assert len(sock.sends) == 2
    head, body = _split(b"".join(sock.sends))
    assert head.startswith(b"HTTP/1.1 200 OK\r\n") and b"Transfer-Encoding: chunked" in head
    assert body == b"9\r\ndata: a\n\n\r\nE\r\ndata: [DONE]\n\n\r\n0\r\n\r\n"
    assert sock.sends[0].endswith(b"9\r\ndata: a\n\n\r\n")


def test_stream_without_final_marker_still_terminated_once_by_close():
    """Plain bytes as the last chunk: close() sends the terminating chunk, once."""
    resp, sock = _response([("Content-Type", "text/event-stream")])
    resp.write(b"data: a\n\n")
    resp.close()
    head, body = _split(b"".join(sock.sends))
    assert body == b"9\r\ndata: a\n\n\r\n0\r\n\r\n"
    assert len(sock.sends) == 2


def test_sized_body_leaves_with_headers_in_one_send():
    """A body with Content-Length: one send holding headers and body, nothing from close()."""
    resp, sock = _response([("Content-Type", "application/json"), ("Content-Length", "7")])
    resp.write(b'{"a":1}')
    resp.close()
    assert len(sock.sends) == 1
    head, body = _split(sock.sends[0])
    assert b"Content-Length: 7" in head and b"Transfer-Encoding" not in head and body == b'{"a":1}'


def test_body_longer_than_content_length_is_cut_by_gunicorn():
    """The edge case stays gunicorn's: no more bytes than Content-Length go out."""
    resp, sock = _response([("Content-Type", "text/plain"), ("Content-Length", "3")])
    resp.write(b"abcdef")
    resp.close()
    assert _split(b"".join(sock.sends))[1] == b"abc"


def test_empty_stream_is_headers_and_terminating_chunk_in_one_send():
    """No body at all (chunked): close() sends the headers and the 0-chunk together."""
    resp, sock = _response([("Content-Type", "text/event-stream")])
    resp.write(b"")  # gunicorn drops an empty chunk (it would end the body)
    assert not resp.headers_sent  # nothing on the wire yet: gunicorn could still answer a 500
    resp.close()
    assert len(sock.sends) == 1
    head, body = _split(sock.sends[0])
    assert b"Transfer-Encoding: chunked" in head and body == b"0\r\n\r\n"


def test_no_body_status_sends_the_headers_alone_once():
    """A 204: gunicorn's write() drops the body; close() sends the headers, once, no chunk."""
    req = SimpleNamespace(version=(1, 1), method="POST", should_close=lambda: False)
    sock = RecordingSocket()
    resp = OneSendResponse(req, sock, Config())
    resp.start_response("204 No Content", [("X-Request-ID", "r1")])
    resp.write(b"dropped")
    resp.close()
    assert len(sock.sends) == 1
    head, body = _split(sock.sends[0])
    assert head.startswith(b"HTTP/1.1 204 No Content\r\n") and b"X-Request-ID: r1" in head and body == b""
