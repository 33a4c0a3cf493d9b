"""SSE / NDJSON parsing of upstream byte streams and the heartbeat wrapper of a silent source."""
from __future__ import annotations

import threading
from typing import Iterator

import pytest

from app.utils.streaming import DONE, iter_lines, iter_sse_data, sse_event, with_heartbeat

pytestmark = pytest.mark.timeout(30)

STREAM = (b'data: {"a":1}\n\n'
          b': keep-alive comment\n\n'
          b'event: message\nid: 7\ndata: {"b":2}\n\n'
          b'data: line one\ndata: line two\n\n'
          b'retry: 100\n\n'
          b'data: [DONE]\n\n')
EXPECTED = [b'{"a":1}', b'{"b":2}', b"line one\nline two", DONE]


def one_byte_at_a_time(data: bytes) -> list[bytes]:
    return [data[i:i + 1] for i in range(len(data))]


def test_whole_stream_in_one_chunk():
    """Events, comments, event:/id:/retry: lines and [DONE] of one chunk parse to the data payloads."""
    assert list(iter_sse_data([STREAM])) == EXPECTED


def test_events_split_one_byte_at_a_time():
    """Events split across arbitrary chunk boundaries (one byte per chunk) parse the same."""
    assert list(iter_sse_data(one_byte_at_a_time(STREAM))) == EXPECTED


@pytest.mark.parametrize("size", [2, 3, 5, 7, 11, 64])
def test_events_split_at_any_size(size):
    """Any chunking of the byte stream gives the same payloads."""
    chunks = [STREAM[i:i + size] for i in range(0, len(STREAM), size)]
    assert list(iter_sse_data(chunks)) == EXPECTED


def test_crlf_line_endings():
    """CRLF line endings parse like LF, also when the CR and LF arrive in different chunks."""
    crlf = STREAM.replace(b"\n", b"\r\n")
    assert list(iter_sse_data([crlf])) == EXPECTED
    assert list(iter_sse_data(one_byte_at_a_time(crlf))) == EXPECTED


def test_empty_chunks_are_ignored():
    """Empty chunks (keep-alive reads) do not end or break an event."""
    assert list(iter_sse_data([b"da", b"", b"ta: x\n", b"", b"\n"])) == [b"x"]


def test_comments_and_other_fields_skipped():
    """Comment-only and field-only events yield nothing."""
    assert list(iter_sse_data([b": ping\n\nevent: x\n\nid: 1\n\n"])) == []


def test_multi_line_data_joined_with_newline():
    """Several data: lines of one event are joined with '\\n'."""
    assert list(iter_sse_data([b"data: a\ndata: b\ndata: c\n\n"])) == [b"a\nb\nc"]


def test_data_without_space_and_single_space_stripped():
    """'data:x' gives x; only one leading space is removed ('data:  x' gives ' x')."""
    assert list(iter_sse_data([b"data:x\n\ndata:  x\n\n"])) == [b"x", b" x"]


def test_done_is_yielded():
    """The [DONE] marker is yielded like any payload, so the caller can stop on it."""
    out = list(iter_sse_data([b"data: [DONE]\n\n"]))
    assert out == [DONE] and DONE == b"[DONE]"


@pytest.mark.parametrize("tail", [b"data: last", b"data: last\n", b"data: last\r\n", b"data: last\r"])
def test_trailing_event_without_blank_line(tail):
    """A final event not followed by a blank line (stream closed) is still yielded."""
    assert list(iter_sse_data([b"data: first\n\n", tail])) == [b"first", b"last"]


def test_trailing_multi_line_event_without_final_newline():
    """A trailing event of several data lines, the last without a newline, is joined and yielded."""
    assert list(iter_sse_data(one_byte_at_a_time(b"data: a\ndata: b"))) == [b"a\nb"]


def test_trailing_event_keeps_second_leading_space():
    """The trailing-event path removes only one leading space, like the normal path."""
    assert list(iter_sse_data([b"data:  x"])) == [b" x"]


def test_trailing_comment_yields_nothing():
    """A trailing comment or field line without newline is not taken for data."""
    assert list(iter_sse_data([b"data: a\n\n: bye"])) == [b"a"]
    assert list(iter_sse_data([b"event: x"])) == []


def test_payloads_are_lazy():
    """Events are yielded as soon as they are complete, before the source ends."""
    def source() -> Iterator[bytes]:
        yield b"data: 1\n\n"
        raise AssertionError("read past the first event")

    assert next(iter_sse_data(source())) == b"1"


def test_sse_event_roundtrip():
    """sse_event() output parses back to the same payload."""
    assert list(iter_sse_data([sse_event(b'{"x":1}'), sse_event(DONE)])) == [b'{"x":1}', DONE]


# --- NDJSON -----------------------------------------------------------------------------------

def test_iter_lines_ndjson():
    """iter_lines yields each complete line across chunk boundaries, skipping blank lines, with the trailing line."""
    data = b'{"a":1}\n\n{"b":2}\r\n{"c":3}'
    assert list(iter_lines(one_byte_at_a_time(data))) == [b'{"a":1}', b'{"b":2}', b'{"c":3}']
    assert list(iter_lines([data])) == [b'{"a":1}', b'{"b":2}', b'{"c":3}']
    assert list(iter_lines([b"", b"\n\n"])) == []


# --- heartbeat --------------------------------------------------------------------------------

def test_heartbeat_yields_none_while_source_silent():
    """with_heartbeat yields None while the source is silent longer than the interval, then the
    items. The source stays silent until the consumer has seen three heartbeats (an event, not a
    duration: without heartbeats it would stay silent for 30 s and the test fails)."""
    release = threading.Event()

    def source() -> Iterator[int]:
        release.wait(30)
        yield 1
        yield 2

    out = []
    for item in with_heartbeat(source(), 0.05):
        out.append(item)
        if out.count(None) == 3:
            release.set()
    assert [x for x in out if x is not None] == [1, 2]
    heartbeats = out.index(1)
    assert heartbeats >= 3 and out[:heartbeats] == [None] * heartbeats, out


def test_heartbeat_no_none_when_source_is_fast():
    """A source that answers faster than the interval gives its items and no heartbeats."""
    assert list(with_heartbeat(iter([1, 2, 3]), 1.0)) == [1, 2, 3]


def test_heartbeat_reraises_source_exception():
    """An exception of the source is re-raised in the consumer, after the items before it."""
    class Boom(Exception):
        pass

    def source() -> Iterator[int]:
        yield 1
        raise Boom("upstream died")

    got = []
    with pytest.raises(Boom, match="upstream died"):
        for item in with_heartbeat(source(), 0.05):
            if item is not None:
                got.append(item)
    assert got == [1]


class BlockingSource:
    """An upstream stuck in a read until abort() is called (like HTTPStream)."""

    def __init__(self) -> None:
        self.aborted = threading.Event()
        self.abort_calls = 0

    def __iter__(self) -> "BlockingSource":
        return self

    def __next__(self) -> int:
        if not self.aborted.wait(10):
            raise AssertionError("never aborted")
        raise StopIteration

    def abort(self) -> None:
        self.abort_calls += 1
        self.aborted.set()


def test_heartbeat_aborts_source_when_consumer_closes_early():
    """Closing the consumer early calls abort() on the source, unblocking its pump."""
    src = BlockingSource()
    gen = with_heartbeat(src, 0.05)
    assert next(gen) is None  # the source is silent
    gen.close()
    assert src.abort_calls == 1
    assert src.aborted.is_set()

