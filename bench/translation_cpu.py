#!/usr/bin/env python3
"""CPU of the Anthropic Messages translation alone, in process (no server, no network), for
the benchmark's request size: what `/v1/messages` adds on top of a chat completion.

    .venv/bin/python bench/translation_cpu.py [--rounds 20000]

Non-streaming: the Messages body to the chat request, then the chat answer to the Messages
answer (parse + encode, as the endpoint does). Streaming: the same request, then 20 OpenAI
chunks + the usage chunk (as raw JSON, as an OpenAI-compatible upstream sends them) to
Anthropic's events (text-only chunks take the fast path that reuses their JSON string). Prints
microseconds of CPU (process time) per request.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from app.translate.anthropic_to_chat import to_chat_request  # noqa: E402
from app.translate.chat_to_anthropic import MessageStreamEncoder, to_message  # noqa: E402

PROMPT = "Say hello to the benchmark"
BODY = {"model": "bench", "max_tokens": 64, "messages": [{"role": "user", "content": PROMPT}]}
USAGE = {"prompt_tokens": 12, "completion_tokens": 20, "total_tokens": 32,
         "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0}}
ANSWER = json.dumps({"id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "bench",
                     "choices": [{"index": 0, "message": {"role": "assistant", "content": "Echo: hello " * 10},
                                  "finish_reason": "stop"}], "usage": USAGE}).encode()
CHUNKS = [json.dumps({"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "bench",
                      "choices": [{"index": 0, "delta": {"content": " word"}, "logprobs": None,
                                   "finish_reason": None}]}, separators=(",", ":")).encode()
          for _ in range(20)] + [json.dumps({"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1,
                                             "model": "bench", "choices": [], "usage": USAGE}).encode()]


def nonstream() -> bytes:
    to_chat_request(json.loads(json.dumps(BODY)))
    return json.dumps(to_message(json.loads(ANSWER)), separators=(",", ":")).encode()


def stream() -> bytes:
    to_chat_request(json.loads(json.dumps({**BODY, "stream": True})))
    encoder = MessageStreamEncoder("bench", 12)
    out = [encoder.feed_raw(raw) for raw in CHUNKS]
    out.append(encoder.close())
    return b"".join(out)


def per_request_us(fn, rounds: int) -> float:
    for _ in range(min(1000, rounds)):
        fn()
    start = time.process_time()
    for _ in range(rounds):
        fn()
    return (time.process_time() - start) / rounds * 1e6


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=20000)
    args = p.parse_args()
    print(f"non-streaming: {per_request_us(nonstream, args.rounds):.1f} us CPU per request")
    print(f"streaming (20 chunks + usage): {per_request_us(stream, args.rounds):.1f} us CPU per request")


if __name__ == "__main__":
    main()
