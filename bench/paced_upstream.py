#!/usr/bin/env python3
"""The open-loop benchmark's upstream: the fake OpenAI server, answering at a model's pace.

    .venv/bin/python bench/paced_upstream.py --port 9200 [--ttfb-ms 50] [--chunk-ms 20]

It is `Testing/fakes/fake_openai.py` (same parser, same answers, same ``/_stats`` counters)
with one change: a valid chat completion is not answered at once. A non-streaming answer
leaves ``--ttfb-ms`` after the request arrived; a stream sends its headers, role chunk and
first content chunk after ``--ttfb-ms``, then one content chunk every ``--chunk-ms``, the
finish, usage and ``[DONE]`` events with the last one (so ``max_tokens: 10`` gives 10 content
chunks, 50 + 9 x 20 = 230 ms per stream with the defaults).

Every write is a ``loop.call_at`` callback scheduled when the request arrives: no task and no
sleep per request, so a thousand streams a second cost the one asyncio process little CPU
(the benchmark prints this process's CPU per request, to show it is not the bottleneck).
Scripted failures of the fake (``fail-500`` and the others in the model name) still apply.
"""
from __future__ import annotations

import argparse
import asyncio
import signal
import sys
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from Testing.fakes import fake_openai as fo  # noqa: E402 - the repo root is put on the path above


class PacedConnection(fo.HttpConnection):
    """A fake-upstream connection whose chat answers wait `ttfb` and stream one content
    chunk every `interval` seconds."""

    ttfb = 0.05
    interval = 0.02

    def _chat(self, req: fo.Request) -> None:
        body = self._recorded_json(req)
        problem = fo.validate_chat(body)
        if problem is not None:
            return self.respond(req, 400, problem)
        failure = fo.scripted_error(body["model"].lower(), body["messages"])
        if failure is not None:
            return self.respond(req, failure[0], failure[1], failure[2])
        plan = fo.ChatPlan(body, self.state.next_id())
        loop = asyncio.get_running_loop()
        start = loop.time() + self.ttfb
        self.busy = True  # a pipelined next request waits for this answer, as in the fake
        if not plan.stream:
            answer = fo.response_bytes(200, plan.completion_body(), req.keep_alive,
                                       extra=["x-request-id: req_" + plan.cid])
            loop.call_at(start, self._send, answer, req.keep_alive, True)
            return None
        for i, batch in enumerate(paced_batches(self._stream_frames(req, plan), len(plan.pieces))):
            last = i == len(plan.pieces) - 1 or len(plan.pieces) == 0
            loop.call_at(start + i * self.interval, self._send, batch, req.keep_alive, last)
        return None

    def _send(self, data: bytes, keep_alive: bool, last: bool) -> None:
        self.write(data)
        if not last:
            return
        if not keep_alive:
            self.close()
        self.busy = False
        if not self.closed and self.buf:
            self._process()


def paced_batches(frames: list[bytes], pieces: int) -> list[bytes]:
    """Group a stream's frames by the time they leave: headers + role chunk + first content
    chunk, then one content chunk each, the finish/usage/[DONE] frames with the last one.

    frames are [headers+role, content 1..pieces, finish, (usage), [DONE]+terminator]."""
    if pieces <= 0:
        return [b"".join(frames)]
    batches = [frames[0] + frames[1]] + list(frames[2:pieces + 1])
    batches[-1] += b"".join(frames[pieces + 1:])
    return batches


async def serve(host: str, port: int) -> None:
    state = fo.FakeState(threading.Lock)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: PacedConnection(state), host, port,
                                      backlog=4096, reuse_address=True)
    bound = server.sockets[0].getsockname()[1]
    print(f"paced upstream listening on http://{host}:{bound}/v1 "
          f"(ttfb {PacedConnection.ttfb * 1000:g} ms, chunk every {PacedConnection.interval * 1000:g} ms)",
          flush=True)
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with server:
        await stop.wait()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Fake OpenAI upstream answering at a model's pace")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=9200, help="0 picks a free port")
    p.add_argument("--ttfb-ms", type=float, default=50.0, help="delay before the first byte")
    p.add_argument("--chunk-ms", type=float, default=20.0, help="delay between stream chunks")
    args = p.parse_args(argv)
    PacedConnection.ttfb = args.ttfb_ms / 1000
    PacedConnection.interval = args.chunk_ms / 1000
    asyncio.run(serve(args.host, args.port))


if __name__ == "__main__":
    main()
