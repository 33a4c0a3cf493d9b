#!/usr/bin/env python3
"""CPU cost of the Responses API translation, in process: what a `/v1/responses` request costs
the gateway beyond a chat completion of the same size (same prompt, same 20-token answer).

    .venv/bin/python bench/responses_translation.py [--iterations 5000] [--rounds 5]
    .venv/bin/python bench/responses_translation.py --app [--pg-url URL]   # whole requests

Both paths are timed with the process CPU clock, interleaved round by round (the machine is
shared: the median of the rounds is reported). What is timed is the work that differs:

- chat: validating the body (CHAT_SCHEMA); the answer forwarded as the upstream's bytes; a
  stream's chunks forwarded as SSE events, then `[DONE]`;
- responses: validating the body (RESPONSES_SCHEMA), the input items and the chat request
  (app/translate/responses_to_chat.py), a response id; the answer turned into a `response`
  object and serialised; a stream's chunks turned into Responses events
  (app/translate/chat_stream_to_responses.py).

The rest of a request (authentication, admission, the upstream call, settlement) is the same
completion run for both. `--app` times whole requests instead: the Flask app in this process
(its test client, no gunicorn), a key without limits, a temporary PostgreSQL database, the fake
upstream as a separate process (its CPU is not counted); chat and Responses requests of the same
size alternate round by round. bench/run_benchmark.py --modes nonstream,responses,stream,responses-stream
measures them through gunicorn and wrk.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from app.api.responses_schema import RESPONSES_SCHEMA  # noqa: E402
from app.api.schemas import CHAT_SCHEMA  # noqa: E402
from app.providers.base import Completion, StreamPiece  # noqa: E402
from app.services.response_store import new_response_id  # noqa: E402
from app.translate.chat_stream_to_responses import ChatStreamToResponses  # noqa: E402
from app.translate.chat_to_responses import response_from_chat  # noqa: E402
from app.translate.responses_to_chat import normalise_input, to_chat  # noqa: E402
from app.utils.streaming import DONE_EVENT, sse_event  # noqa: E402
from Testing.fakes.fake_openai import ChatPlan  # noqa: E402

PROMPT = "Say hello to the benchmark"
CHAT = {"model": "bench", "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 64}
RESPONSES = {"model": "bench", "input": PROMPT, "max_output_tokens": 64, "store": False}


def upstream(stream: bool) -> tuple[bytes, list[StreamPiece]]:
    """The fake upstream's answer to the chat request: JSON bytes, or the stream's pieces as the
    OpenAI-compatible adapter hands them over (raw bytes; the usage chunk parsed)."""
    plan = ChatPlan({**CHAT, "stream": stream, "stream_options": {"include_usage": True}}, "chatcmpl-bench")
    if not stream:
        return plan.completion_body(), []
    pieces = []
    for event in plan.stream_events()[:-1]:
        data = event[len(b"data: "):-2]
        chunk = json.loads(data) if b'"usage":{' in data else None
        pieces.append(StreamPiece(raw=data, chunk=chunk, usage=(chunk or {}).get("usage"),
                                  usage_only=chunk is not None))
    return b"", pieces


def chat_request(stream: bool) -> Callable[[], bytes]:
    body_bytes, pieces = upstream(stream)
    body = {**CHAT, "stream": stream}

    def run() -> bytes:
        CHAT_SCHEMA.load(body)
        if not stream:
            return Completion(body=json.loads(body_bytes), raw=body_bytes).json_bytes()
        return b"".join([*(sse_event(p.data()) for p in pieces), DONE_EVENT])
    return run


def responses_request(stream: bool) -> Callable[[], bytes]:
    body_bytes, pieces = upstream(stream)
    body = {**RESPONSES, "stream": stream}

    def run() -> bytes:
        RESPONSES_SCHEMA.load(body)
        to_chat(body, normalise_input(body["input"]))
        response_id, created = new_response_id(False), int(time.time())
        if not stream:
            chat = Completion(body=json.loads(body_bytes), raw=body_bytes).body
            return json.dumps(response_from_chat(chat, body, response_id, created), separators=(",", ":")).encode()
        encoder = ChatStreamToResponses(body, response_id, created, body["model"])
        out = encoder.start()
        for piece in pieces:
            out += encoder.feed(piece)
        out += encoder.finish()
        return b"".join(out)
    return run


def cpu_us(fn: Callable[[], bytes], iterations: int) -> float:
    start = time.process_time()
    for _ in range(iterations):
        fn()
    return (time.process_time() - start) / iterations * 1e6


def whole_requests(iterations: int, rounds: int, pg_url: str) -> None:
    """Chat and Responses requests through the app in this process (see the module docstring)."""
    os.environ["TEST_PG_URL"] = pg_url
    from Testing.support import create_database, database_url, drop_database, free_port
    import db_manager
    from app import create_app

    port = free_port()
    fake = subprocess.Popen([sys.executable, "-m", "Testing.fakes.fake_openai", "--port", str(port)],
                            cwd=Path(__file__).resolve().parents[1], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL)
    name = create_database("gw_responses_bench")
    app = None
    try:
        assert fake.stdout is not None and b"listening" in fake.stdout.readline()
        db_manager.upgrade(database_url(name))
        models = Path(tempfile.mkdtemp()) / "models.json"
        models.write_text(json.dumps({
            "providers": {"up": {"type": "openai", "base_url": f"http://127.0.0.1:{port}/v1",
                                 "api_key_env": "BENCH_UPSTREAM_KEY"}},
            "models": {"bench": {"deployments": [{"provider": "up", "model": "bench"}], "context_window": 128000,
                                 "max_output_tokens": 4096,
                                 "pricing": {"input_per_mtok": "0.15", "output_per_mtok": "0.60"}}}}))
        os.environ["BENCH_UPSTREAM_KEY"] = "sk-bench-upstream"
        app = create_app({"DATABASE_URL": database_url(name), "MODELS_FILE": str(models), "SYSTEM_SECRET": "bench",
                          "REDIS_URL": "", "LOG_LEVEL": "WARNING", "STREAM_KEEPALIVE_S": 0})
        app.extensions["gateway"].start()  # its background threads, as in a gunicorn worker
        client = app.test_client()
        key = client.post("/v1/api-keys", json={"name": "bench", "tenant": "bench"},
                          headers={"X-System-Secret": "bench"}).get_json()["key"]
        headers = {"Authorization": f"Bearer {key}"}

        def request(path: str, body: dict) -> Callable[[], bytes]:
            def run() -> bytes:
                resp = client.post(path, json=body, headers=headers)
                data = resp.get_data()
                resp.close()
                if resp.status_code != 200:
                    raise SystemExit(f"{path} answered {resp.status_code}: {data[:300]!r}")
                return data
            return run

        print(f"{'mode':<10} {'chat ms':>9} {'responses ms':>13} {'added ms':>9}   (CPU per whole request, "
              f"median of {rounds} rounds of {iterations})")
        for stream in (False, True):
            chat = request("/v1/chat/completions", {**CHAT, "stream": stream})
            responses = request("/v1/responses", {**RESPONSES, "stream": stream})
            chat(), responses()
            pairs = [(cpu_us(chat, iterations) / 1000, cpu_us(responses, iterations) / 1000) for _ in range(rounds)]
            print(f"{'stream' if stream else 'plain':<10} {statistics.median(c for c, _ in pairs):>9.3f} "
                  f"{statistics.median(r for _, r in pairs):>13.3f} {statistics.median(r - c for c, r in pairs):>9.3f}")
    finally:
        if app is not None:
            app.extensions["gateway"].close(timeout=5)
        fake.terminate()
        fake.wait()
        drop_database(name)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--iterations", type=int, default=5000)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--app", action="store_true",
                   help="whole requests through the app (needs PostgreSQL; at most 400 per round)")
    p.add_argument("--pg-url", default="postgresql://postgres@127.0.0.1:5432/postgres")
    args = p.parse_args(argv)
    if args.app:
        whole_requests(min(args.iterations, 400), args.rounds, args.pg_url)
        return 0
    print(f"{'mode':<10} {'chat µs':>9} {'responses µs':>13} {'added µs':>9}   (CPU per request, median of "
          f"{args.rounds} rounds of {args.iterations})")
    for stream in (False, True):
        chat, responses = chat_request(stream), responses_request(stream)
        chat(), responses()  # warm up
        rounds = [(cpu_us(chat, args.iterations), cpu_us(responses, args.iterations)) for _ in range(args.rounds)]
        c = statistics.median(r[0] for r in rounds)
        r = statistics.median(r[1] for r in rounds)
        added = statistics.median(r[1] - r[0] for r in rounds)
        print(f"{'stream' if stream else 'plain':<10} {c:>9.1f} {r:>13.1f} {added:>9.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
