"""A hostile OpenAI-compatible upstream: a real HTTP server (Chat Completions wire format)
whose answers break the gateway's assumptions, picked by a substring of the request's `model`:

``echo-key``        400 whose error message repeats the caller's key (the Authorization value)
``usage-string``    a normal answer whose usage figures are strings
``usage-negative``  ... negative numbers
``usage-huge``      ... absurdly large numbers
``usage-missing``   ... a usage object without the token fields
``late-usage``      a stream of LATE_EVENTS content events LATE_DELAY_S apart, then the usage
                    chunk (LATE_PROMPT / LATE_COMPLETION tokens) and [DONE]
``no-usage-hang``   one content event, a pause of HANG_PAUSE_S, two more, then silence (never
                    usage, never the end)
``long-stream``     a fast, endless-looking stream: LONG_EVENTS events of ~1 KiB each

Streams are written with back-pressure (asyncio drain): a gateway that stops reading stops
this server. `sent_bytes` counts the stream bytes handed to the socket so far.
"""
from __future__ import annotations

import json
import time
from typing import Any, Iterator

from Testing.fakes.http_fake import FakeHTTPServer, FakeRequest, Reply, Streamed

LATE_EVENTS = 10
LATE_DELAY_S = 0.1
LATE_PROMPT, LATE_COMPLETION = 1234, 567
HANG_PAUSE_S = 0.5
LONG_EVENTS = 40000
LONG_WORD = "lorem " * 160  # ~1 KiB of content per event
BAD_USAGE = {
    "usage-string": {"prompt_tokens": "12", "completion_tokens": "3", "total_tokens": "15"},
    "usage-negative": {"prompt_tokens": -500, "completion_tokens": -7, "total_tokens": -507},
    "usage-huge": {"prompt_tokens": 10 ** 15, "completion_tokens": 10 ** 15, "total_tokens": 2 * 10 ** 15},
    "usage-missing": {"total_tokens": 9},
}
ANSWER = "Hello from the hostile upstream"


def _chunk(model: str, delta: dict[str, Any], usage: Any = None, choices: bool = True) -> bytes:
    obj: dict[str, Any] = {"id": "chatcmpl-hostile", "object": "chat.completion.chunk",
                           "created": int(time.time()), "model": model,
                           "choices": [{"index": 0, "delta": delta, "finish_reason": None}] if choices else []}
    if usage is not None:
        obj["usage"] = usage
    return b"data: " + json.dumps(obj).encode() + b"\n\n"


class HostileOpenAI(FakeHTTPServer):
    name = "hostile-openai"

    def __init__(self, host: str = "127.0.0.1") -> None:
        super().__init__(host)
        self.sent_bytes = 0

    def handle(self, request: FakeRequest) -> Any:
        body = request.json or {}
        model = str(body.get("model", ""))
        if "echo-key" in model:
            key = request.headers.get("authorization", "").removeprefix("Bearer ")
            return Reply(400, {"error": {"message": f"Invalid request: key {key} may not use {model}",
                                         "type": "invalid_request_error", "param": None, "code": None}})
        stream = bool(body.get("stream"))
        if "late-usage" in model:
            return Streamed(self._counted(self._late(model)))
        if "no-usage-hang" in model:
            return Streamed(self._counted(self._hang(model)))
        if "long-stream" in model:
            return Streamed(self._counted(self._long(model)))
        usage = next((u for name, u in BAD_USAGE.items() if name in model), None)
        if stream:
            events = [_chunk(model, {"role": "assistant", "content": ""})]
            words = ANSWER.split(" ")
            events += [_chunk(model, {"content": (" " if i else "") + w}) for i, w in enumerate(words)]
            events += [_chunk(model, {}, usage=usage, choices=False), b"data: [DONE]\n\n"]
            return Streamed(events)
        return Reply(200, {"id": "chatcmpl-hostile", "object": "chat.completion", "created": int(time.time()),
                           "model": model, "usage": usage,
                           "choices": [{"index": 0, "finish_reason": "stop",
                                        "message": {"role": "assistant", "content": ANSWER}}]})

    def _counted(self, events: Iterator[bytes | float]) -> Iterator[bytes | float]:
        for event in events:
            if isinstance(event, bytes):
                self.sent_bytes += len(event)
            yield event

    @staticmethod
    def _late(model: str) -> Iterator[bytes | float]:
        for i in range(LATE_EVENTS):
            yield _chunk(model, {"content": f"word{i} "})
            yield LATE_DELAY_S
        yield _chunk(model, {}, usage={"prompt_tokens": LATE_PROMPT, "completion_tokens": LATE_COMPLETION,
                                       "total_tokens": LATE_PROMPT + LATE_COMPLETION}, choices=False)
        yield b"data: [DONE]\n\n"

    @staticmethod
    def _hang(model: str) -> Iterator[bytes | float]:
        yield _chunk(model, {"content": "one"})
        yield HANG_PAUSE_S  # the client hangs up here; the rest comes during the gateway's grace read
        for word in (" two", " three"):
            yield _chunk(model, {"content": word})
        yield 3600.0

    @staticmethod
    def _long(model: str) -> Iterator[bytes]:
        event = _chunk(model, {"content": LONG_WORD})
        for _ in range(LONG_EVENTS):
            yield event
        yield b"data: [DONE]\n\n"
