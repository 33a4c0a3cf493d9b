"""The open-loop load generator (bench/open_loop_gen.py) counts latency from each request's
intended send time, so a server that stalls shows its queueing in the figures instead of
slowing the generator down (coordinated omission), and the paced upstream
(bench/paced_upstream.py) answers at the pace the benchmark states."""

from __future__ import annotations

import asyncio
import json
import threading
from types import ModuleType

import pytest

from Testing.bench import load_bench_script

pytestmark = pytest.mark.timeout(60)


gen = load_bench_script("open_loop_gen")
paced = load_bench_script("paced_upstream")
fake = paced.fo


def test_schedule_is_fixed_in_advance() -> None:
    """Send times come from the index (start + i / rate), whatever the server does."""
    assert gen.schedule(10.0, 4.0, 5) == [10.0, 10.25, 10.5, 10.75, 11.0]


def test_percentile_is_nearest_rank() -> None:
    """p50 / p99 / p99.9 are values that were measured (nearest rank), never interpolated."""
    values = [float(v) for v in range(1, 1001)]  # 1 .. 1000
    assert gen.percentile(values, 50) == 500.0
    assert gen.percentile(values, 99) == 990.0
    assert gen.percentile(values, 99.9) == 999.0
    assert gen.percentile([7.0], 99.9) == 7.0
    assert gen.percentile([], 50) != gen.percentile([], 50)  # NaN when nothing was measured


def _stalled_server_samples(sent_on_time: bool) -> object:
    """10 requests intended at 0.0, 0.1, ... 0.9 s to a server that answers nothing until
    1.0 s, then one answer every 10 ms. Open loop: each request left at its intended time.
    Closed loop would have held request i back until answer i-1 came."""
    s = gen.Samples()
    for i in range(10):
        k = s.add(i / 10)
        done = 1.0 + (i + 1) / 100
        s.sent[k] = i / 10 if sent_on_time else (0.0 if i == 0 else 1.0 + i / 100)
        s.first[k] = done
        s.done[k] = done
        s.status[k] = 200
    return s


def test_stalled_server_queueing_counts_from_the_intended_time() -> None:
    """The queue of a stalled server is in the latency even when the requests could only be
    sent late (waiting for a connection): latency is completion - intended send time, the
    time from the actual send is reported apart (service), and so is the send lag."""
    on_time = gen.summarize(_stalled_server_samples(True), 0.0, 10.0)
    held = gen.summarize(_stalled_server_samples(False), 0.0, 10.0)
    # request 0 waited 1.01 s, request 9 (intended at 0.9) 0.2 s; p50 is the 5th smallest (0.56 s)
    assert [round(on_time["latency_ms"][q], 6) for q in ("p50", "p99", "p99.9")] == [560.0, 1010.0, 1010.0]
    assert held["latency_ms"] == on_time["latency_ms"]
    assert [round(held["service_ms"][q], 6) for q in ("p50", "p99", "p99.9")] == [10.0, 1010.0, 1010.0]
    assert [round(held["send_lag_ms"][q], 6) for q in ("p50", "p99", "p99.9")] == [460.0, 910.0, 910.0]
    assert [round(on_time["send_lag_ms"][q], 6) for q in ("p50", "p99", "p99.9")] == [0.0, 0.0, 0.0]
    assert on_time["ok"] == 10 and on_time["errors"] == 0
    assert round(on_time["achieved_rate"], 6) == round(10 / 1.1, 6)


def test_warmup_and_failures_are_kept_out_of_the_quantiles() -> None:
    """Requests intended before the measured window are not counted; failed ones are counted
    as errors by kind, not as latencies."""
    s = gen.Samples()
    for i, (status, error) in enumerate([(200, ""), (200, ""), (500, "status-500"), (0, "timeout")]):
        k = s.add(float(i))
        s.sent[k], s.first[k], s.done[k], s.status[k], s.error[k] = i, i + 0.5, i + 1.0, status, error
    summary = gen.summarize(s, 1.0, 1.0)
    assert summary["requests"] == 3 and summary["ok"] == 1
    assert summary["errors_by_kind"] == {"status-500": 1, "timeout": 1}
    assert summary["latency_ms"]["p99.9"] == 1000.0
    assert summary["ttft_ms"]["p50"] == 500.0


class _Transport:
    """Stands in for a socket: the request bytes are kept, nothing is sent."""

    def __init__(self) -> None:
        self.written = b""

    def write(self, data: bytes) -> None:
        self.written += data

    def abort(self) -> None:
        pass


def _feed_byte_by_byte(answer: bytes, stream: bool) -> tuple[float, float, int, str]:
    """One answer fed to a client connection one byte per read; the clock reads the index of
    the byte being fed. Returns (first, done, status, error) of the request."""
    run = gen.OpenLoop("http://127.0.0.1:9/v1/chat/completions", b"{}", [], stream, 1.0, 1, 0.0)
    run.loop = asyncio.new_event_loop()
    try:
        tick = [0.0]
        run.clock = lambda: tick[0]
        conn = gen.Conn(run)
        conn.connection_made(_Transport())
        k = run.samples.add(0.0)
        waiter = conn.send(k, run.request, stream)
        for i in range(len(answer)):
            tick[0] = float(i)
            conn.data_received(answer[i:i + 1])
        assert waiter.done()
        s = run.samples
        return s.first[k], s.done[k], s.status[k], s.error[k]
    finally:
        run.loop.close()


def _chunk(payload: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(payload), payload)


STREAM_HEAD = (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
               b"Transfer-Encoding: chunked\r\n\r\n")
ROLE_EVENT = b'data: {"choices":[{"delta":{"role":"assistant","content":""}}]}\n\n'
TEXT_EVENT = b'data: {"choices":[{"delta":{"content":"Hi"}}]}\n\n'
DONE_EVENT = b"data: [DONE]\n\n"


def test_first_token_is_the_first_event_with_text_even_when_cut_between_reads() -> None:
    """A stream's first token is the read that completes `"content":"` + a character (the role
    chunk's empty content does not count), found even when every read is one byte; the answer
    is complete at the chunked terminator's last byte."""
    answer = (STREAM_HEAD + _chunk(ROLE_EVENT) + _chunk(TEXT_EVENT) + _chunk(DONE_EVENT)
              + b"0\r\n\r\n")
    assert len(answer) == 229
    assert _feed_byte_by_byte(answer, True) == (194.0, 228.0, 200, "")


def test_a_stream_without_done_is_an_error() -> None:
    """A stream that ends (terminating chunk) without `data: [DONE]` was cut short upstream."""
    answer = STREAM_HEAD + _chunk(ROLE_EVENT) + _chunk(TEXT_EVENT) + b"0\r\n\r\n"
    first, done, status, error = _feed_byte_by_byte(answer, True)
    assert (first, status, error) == (194.0, 200, "stream-without-done")


def test_non_streaming_answer_first_byte_and_content_length() -> None:
    """Non-streaming: `first` is the first byte of the answer, completion the last byte the
    Content-Length announced; a non-200 status is an error named after it."""
    body = b'{"ok":true}'
    ok = b"HTTP/1.1 200 OK\r\nContent-Length: 11\r\n\r\n" + body
    assert _feed_byte_by_byte(ok, False) == (0.0, 49.0, 200, "")
    bad = b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 11\r\n\r\n" + body
    assert _feed_byte_by_byte(bad, False) == (0.0, 66.0, 503, "status-503")


def _run_against_paced(stream: bool, count: int, rate: float, max_conns: int) -> object:
    """The generator and the paced upstream (50 ms to the first byte, 20 ms per chunk) on one
    event loop, on real sockets."""
    async def scenario() -> object:
        loop = asyncio.get_running_loop()
        state = fake.FakeState(threading.Lock)
        server = await loop.create_server(lambda: paced.PacedConnection(state), "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        body = {"model": "bench", "messages": [{"role": "user", "content": "Say hello"}],
                "max_tokens": 3, "stream": stream}
        run = gen.OpenLoop(f"http://127.0.0.1:{port}/v1/chat/completions",
                           json.dumps(body).encode(), ["Authorization: Bearer sk-test"], stream,
                           rate, count, loop.time() + 0.05, timeout=30.0, max_conns=max_conns)
        samples = await run.run()
        server.close()
        await server.wait_closed()
        return samples
    return asyncio.run(scenario())


def test_one_connection_to_a_slow_server_shows_the_queue() -> None:
    """With one connection and answers taking 50 ms, requests intended 10 ms apart queue in
    the generator: the 5th is sent at least 4 x 50 ms after the first, so its latency from its
    intended time (40 ms after the first's) is at least 5 x 50 - 40 = 210 ms, while the time
    from its actual send stays at least one answer (50 ms)."""
    s = _run_against_paced(False, 5, 100.0, 1)
    assert s.status == [200] * 5 and s.error == [""] * 5
    last = 4
    assert s.done[last] - s.intended[last] >= 0.21
    assert s.sent[last] - s.intended[last] >= 0.16
    assert s.done[last] - s.sent[last] >= 0.05
    assert all(s.done[i] - s.intended[i] >= 0.05 for i in range(5))


def test_stream_time_to_first_token_from_the_intended_time() -> None:
    """A stream's first token is the first event with text (not the role chunk): at least the
    upstream's 50 ms after the send, the whole stream at least 50 + 2 x 20 ms; on one
    connection the 3rd stream (intended 20 ms after the first) waits for two whole streams."""
    s = _run_against_paced(True, 3, 100.0, 1)
    assert s.status == [200] * 3 and s.error == [""] * 3
    for i in range(3):
        assert s.first[i] - s.sent[i] >= 0.05
        assert s.done[i] - s.sent[i] >= 0.09
        assert s.first[i] < s.done[i]
    assert s.first[2] - s.intended[2] >= 2 * 0.09 + 0.05 - 0.02


def test_paced_batches_group_a_stream_by_send_time() -> None:
    """Headers, role chunk and first content chunk leave together, then one content chunk per
    interval, the finish, usage and [DONE] frames with the last content chunk."""
    frames = [b"H+role", b"c1", b"c2", b"c3", b"finish", b"usage", b"done"]
    assert paced.paced_batches(frames, 3) == [b"H+rolec1", b"c2", b"c3finishusagedone"]
    assert paced.paced_batches(frames[:1] + frames[4:], 0) == [b"H+rolefinishusagedone"]


def _cell(ol: ModuleType, target: str, p99_ms: float, errors: int = 0) -> object:
    quantiles = {"p50": 50.0, "p99": p99_ms, "p99.9": p99_ms}
    summary = {"achieved_rate": 500.0, "requests": 5000, "ok": 5000 - errors, "errors": errors,
               "latency_ms": quantiles, "ttft_ms": quantiles}
    return ol.Cell("nonstream", 500.0, target, summary=summary)


def test_the_issue_targets_are_read_at_500_per_second() -> None:
    """The report's verdict: added p99 at 500 req/s within 1 ms and no errors is "met"; more,
    or any error, is "NOT met"; the Markdown row shows the target's quantiles and what they add."""
    ol = load_bench_script("open_loop")
    direct = _cell(ol, "direct", 60.0)
    assert ol.targets_check([direct, _cell(ol, "gateway", 60.8)]) == [
        "gateway: added p99 latency, non-streaming at 500 req/s: +0.80 ms (target <= 1 ms): met"]
    assert ol.targets_check([direct, _cell(ol, "gateway", 61.5)]) == [
        "gateway: added p99 latency, non-streaming at 500 req/s: +1.50 ms (target <= 1 ms): NOT met"]
    assert ol.targets_check([direct, _cell(ol, "gateway", 60.5, errors=1)])[0].endswith("NOT met")
    table = ol.markdown([direct, _cell(ol, "gateway", 61.5)])
    assert "| 500 | gateway | 500 | 50.0 / 61.5 / 61.5 | +0.0 / +1.5 / +1.5 | 0 | - |" in table
