"""The long-stream benchmark's raw reader (bench/sse_reader.py) decodes HTTP/1.1 chunked
server-sent events correctly however the bytes are split, so that its counts of errors and
tokens can be trusted without the official client."""
from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

from sse_reader import StreamParser  # noqa: E402


def chunk(payload: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(payload), payload)


def event(content: str | None = None, **extra) -> bytes:
    delta = {} if content is None else {"content": content}
    return json.dumps({"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": delta}], **extra}).encode()


HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
# Two events in one chunk, an event split over two chunks, a keep-alive comment, CRLF line ends,
# a role chunk with empty content, the usage chunk, [DONE], the last chunk.
BODY = (chunk(b"data: " + event("") + b"\n\ndata: " + event("Hello") + b"\n\n")
        + chunk(b"data: " + event(" wor")[:20]) + chunk(event(" wor")[20:] + b"\n\n")
        + chunk(b": keep-alive\n\n")
        + chunk(b"data: " + event("ld") + b"\r\n\r\n")
        + chunk(b"data: " + json.dumps({"choices": [], "usage": {"completion_tokens": 3}}).encode() + b"\n\n")
        + chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n")


def parsed(pieces: list[bytes]) -> StreamParser:
    parser = StreamParser(keep_text=True)
    for piece in pieces:
        parser.feed(piece)
    return parser


def test_a_stream_fed_whole_or_split_anywhere_gives_the_same_result():
    """Whole, byte by byte, and split at every position: 200, 3 tokens, "Hello world", [DONE],
    the chunked body finished, no error."""
    stream = HEAD + BODY
    ways = [[stream], [stream[i:i + 1] for i in range(len(stream))]]
    ways += [[stream[:i], stream[i:]] for i in range(1, len(stream))]
    for pieces in ways:
        p = parsed(pieces)
        assert (p.status, p.tokens, p.text, p.done, p.finished, p.error) == \
            (200, 3, "Hello world", True, True, None)


def test_a_stream_cut_before_done_is_not_done():
    """A body that stops before [DONE] (the connection closed): not done, not finished."""
    stream = HEAD + BODY[:BODY.index(b"data: [DONE]") - 4]
    p = parsed([stream])
    assert (p.status, p.tokens, p.done, p.finished) == (200, 3, False, False)


def test_an_error_answer_keeps_its_status_and_body():
    """A 503 with a JSON body (Content-Length, not chunked): the status and the body's start."""
    body = b'{"error": {"message": "Rate limits cannot be checked right now"}}'
    p = parsed([b"HTTP/1.1 503 SERVICE UNAVAILABLE\r\nContent-Length: %d\r\n\r\n" % len(body), body])
    assert (p.status, p.done, p.tokens, p.body_start) == (503, False, 0, body)


def test_an_error_event_mid_stream_is_reported():
    """An error event after some tokens (an upstream failure forwarded by the gateway)."""
    stream = HEAD + chunk(b"data: " + event("one") + b"\n\n") \
        + chunk(b'data: {"error": {"message": "upstream died"}}\n\n') + chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n"
    p = parsed([stream])
    assert (p.tokens, p.done, p.error) == (1, True, "error event: upstream died")
