"""A chat-completions answer as an Anthropic Messages answer: the `message` object, its usage, and
the stream of OpenAI chunks as Anthropic's server-sent events.

Pure: no Flask, no I/O. Anthropic's `input_tokens` counts only the fresh input: OpenAI's
`prompt_tokens` includes the cached tokens (and, from our Anthropic adapter, the tokens written
to the cache), so those are taken out and reported as `cache_read_input_tokens` and
`cache_creation_input_tokens`.
"""
from __future__ import annotations

import json
import re
import uuid
from typing import Any, Callable

STOP_REASON = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use",
               "function_call": "tool_use", "content_filter": "refusal"}


def new_message_id() -> str:
    return "msg_" + uuid.uuid4().hex[:24]


def anthropic_usage(usage: dict[str, Any] | None) -> dict[str, int]:
    """OpenAI usage (as normalised by the providers) in Anthropic's shape."""
    usage = usage or {}
    prompt = int(usage.get("prompt_tokens") or 0)
    cached = int((usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0)
    written = int(usage.get("cache_creation_input_tokens") or 0)
    return {"input_tokens": max(prompt - cached - written, 0),
            "cache_creation_input_tokens": written, "cache_read_input_tokens": cached,
            "output_tokens": int(usage.get("completion_tokens") or 0)}


def stop_reason(finish: str | None, called_tools: bool) -> str:
    reason = STOP_REASON.get(finish or "stop", "end_turn")
    return "tool_use" if called_tools and reason == "end_turn" else reason


def tool_input(arguments: Any) -> dict[str, Any]:
    """Tool-call arguments (a JSON string) as the tool_use block's input object."""
    if isinstance(arguments, dict):
        return arguments
    try:
        value = json.loads(arguments or "{}")
    except (TypeError, ValueError):
        return {"arguments": arguments}  # not JSON: kept, not lost
    return value if isinstance(value, dict) else {"arguments": value}


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
    return ""


def to_message(chat: dict[str, Any], usage: dict[str, Any] | None = None) -> dict[str, Any]:
    """A `chat.completion` body as an Anthropic `message` (first choice)."""
    choices = chat.get("choices") or [{}]
    choice = choices[0]
    message = choice.get("message") or {}
    content: list[dict[str, Any]] = []
    reasoning = message.get("reasoning_content")
    if isinstance(reasoning, str) and reasoning:
        content.append({"type": "thinking", "thinking": reasoning, "signature": ""})
    text = _text(message.get("content"))
    if text:
        content.append({"type": "text", "text": text})
    calls = message.get("tool_calls") or []
    for call in calls:
        fn = call.get("function") or {}
        content.append({"type": "tool_use", "id": str(call.get("id") or "toolu_" + uuid.uuid4().hex[:24]),
                        "name": str(fn.get("name", "")), "input": tool_input(fn.get("arguments"))})
    return {"id": new_message_id(), "type": "message", "role": "assistant", "model": chat.get("model"),
            "content": content, "stop_reason": stop_reason(choice.get("finish_reason"), bool(calls)),
            "stop_sequence": None, "usage": anthropic_usage(usage if usage is not None else chat.get("usage"))}


def sse(name: str, payload: dict[str, Any]) -> bytes:
    """One Anthropic server-sent event (the SDK reads the `event:` line)."""
    return b"event: " + name.encode() + b"\ndata: " + json.dumps(payload, separators=(",", ":"),
                                                                   ensure_ascii=False).encode() + b"\n\n"


PING = sse("ping", {"type": "ping"})
# The event sent once per text chunk, formatted without building and dumping a dict (the hot path).
_TEXT_DELTA = (b'event: content_block_delta\ndata: {"type":"content_block_delta","index":%d,'
               b'"delta":{"type":"text_delta","text":%b}}\n\n')


# A chunk whose only news is text for choice 0, as OpenAI-compatible servers write it: its
# JSON string literal is reused as it is (already escaped), so most chunks of a stream need no
# parsing and no encoding. Anything else (other spacing, a role, tool calls, a finish reason,
# usage) does not match and is parsed. (The pattern cannot match inside a string value: a quote
# there is escaped.) The gateway's OpenAI adapter parses every chunk that carries usage.
_TEXT_ONLY_CHUNK = re.compile(
    rb'"choices":\[\{"index":0,"delta":\{"content":("(?:[^"\\]|\\.)*")\}(?:,"logprobs":null)?,'
    rb'"finish_reason":null\}\][,}]')


def text_literal(raw: bytes) -> bytes | None:
    """The JSON string literal of the text of a text-only OpenAI chunk (raw bytes), else None."""
    match = _TEXT_ONLY_CHUNK.search(raw)
    return match.group(1) if match else None


def _json_string(text: str) -> bytes:
    return json.dumps(text, ensure_ascii=False).encode()


def error_event(body: dict[str, Any]) -> bytes:
    """An `error` event carrying an Anthropic error envelope ({"type": "error", "error": ...})."""
    return sse("error", body)


class MessageStreamEncoder:
    """OpenAI `chat.completion.chunk`s in, Anthropic stream events out (as SSE bytes).

    `message_start` carries `input_tokens` (our count: the upstream reports its own only at
    the end, and `message_delta` then carries it, so the client's final figure is the
    upstream's). Each run of text, reasoning or one tool call's arguments becomes one content
    block. `count_output` counts the generated text when the upstream reports no usage."""

    def __init__(self, model: str, input_tokens: int,
                 count_output: Callable[[str], int] | None = None) -> None:
        self.model = model
        self.input_tokens = input_tokens
        self.count_output = count_output
        self.id = new_message_id()
        self.started = False
        self.finished = False
        self.index = -1                 # the Anthropic index of the open block
        self.open_kind: str | None = None  # "text" | "thinking" | "tool" of the open block
        self.tool_blocks: dict[int, int] = {}  # OpenAI tool_calls index -> block index
        self.finish: str | None = None
        self.usage: dict[str, Any] | None = None
        self.generated: list[str | bytes] = []  # text, or JSON string literals of text

    def start(self, model: str | None = None) -> bytes:
        self.started = True
        message = {"id": self.id, "type": "message", "role": "assistant", "model": model or self.model,
                   "content": [], "stop_reason": None, "stop_sequence": None,
                   "usage": {"input_tokens": self.input_tokens, "cache_creation_input_tokens": 0,
                             "cache_read_input_tokens": 0, "output_tokens": 0}}
        return sse("message_start", {"type": "message_start", "message": message}) + PING

    def _close_block(self) -> bytes:
        if self.open_kind is None:
            return b""
        self.open_kind = None
        return sse("content_block_stop", {"type": "content_block_stop", "index": self.index})

    def _open(self, kind: str, block: dict[str, Any]) -> bytes:
        out = self._close_block()
        self.index += 1
        self.open_kind = kind
        return out + sse("content_block_start", {"type": "content_block_start", "index": self.index,
                                                 "content_block": block})

    def _delta(self, index: int, delta: dict[str, Any]) -> bytes:
        return sse("content_block_delta", {"type": "content_block_delta", "index": index, "delta": delta})

    def feed(self, chunk: dict[str, Any]) -> bytes:
        """The events of one chunk (b"" when it carries nothing Anthropic shows)."""
        out = b"" if self.started else self.start(chunk.get("model"))
        if chunk.get("usage"):
            self.usage = chunk["usage"]
        for choice in chunk.get("choices") or ():
            if choice.get("index", 0) != 0:
                continue
            delta = choice.get("delta") or {}
            reasoning = delta.get("reasoning_content")
            if isinstance(reasoning, str) and reasoning:
                if self.open_kind != "thinking":
                    out += self._open("thinking", {"type": "thinking", "thinking": "", "signature": ""})
                out += self._delta(self.index, {"type": "thinking_delta", "thinking": reasoning})
            text = delta.get("content")
            if isinstance(text, str) and text:
                if self.open_kind != "text":
                    out += self._open("text", {"type": "text", "text": ""})
                self.generated.append(text)
                out += _TEXT_DELTA % (self.index, _json_string(text))
            for call in delta.get("tool_calls") or ():
                out += self._tool_delta(call)
            if choice.get("finish_reason"):
                self.finish = choice["finish_reason"]
        return out

    def feed_raw(self, raw: bytes) -> bytes:
        """The events of one chunk given as its JSON text (as OpenAI-compatible upstreams send it)."""
        literal = text_literal(raw)
        return self.feed(json.loads(raw)) if literal is None else self.feed_text_literal(literal)

    def feed_text_literal(self, literal: bytes) -> bytes:
        """The events of a text-only chunk given as its JSON string literal (`text_literal`)."""
        out = b"" if self.started else self.start()
        if self.open_kind != "text":
            out += self._open("text", {"type": "text", "text": ""})
        self.generated.append(literal)
        return out + _TEXT_DELTA % (self.index, literal)

    def _tool_delta(self, call: dict[str, Any]) -> bytes:
        out = b""
        position = int(call.get("index", 0))
        fn = call.get("function") or {}
        block = self.tool_blocks.get(position)
        if block is None:
            out += self._open("tool", {"type": "tool_use", "id": str(call.get("id") or f"toolu_{uuid.uuid4().hex[:24]}"),
                                       "name": str(fn.get("name") or ""), "input": {}})
            block = self.tool_blocks[position] = self.index
        arguments = fn.get("arguments")
        if isinstance(arguments, str) and arguments:
            self.generated.append(arguments)
            # A delta for an earlier (closed) call keeps its block's index: clients accumulate by index.
            out += self._delta(block, {"type": "input_json_delta", "partial_json": arguments})
        return out

    def close(self) -> bytes:
        """The closing events: the open block's stop, message_delta (stop reason, usage), message_stop."""
        out = b"" if self.started else self.start()
        out += self._close_block()
        self.finished = True
        if self.usage is not None:
            usage: dict[str, Any] = anthropic_usage(self.usage)
        else:
            counted = self.count_output(self.generated_text()) if self.count_output else 0
            usage = {"input_tokens": self.input_tokens, "output_tokens": counted}
        delta = {"stop_reason": stop_reason(self.finish, bool(self.tool_blocks)), "stop_sequence": None}
        return out + sse("message_delta", {"type": "message_delta", "delta": delta, "usage": usage}) \
            + sse("message_stop", {"type": "message_stop"})

    def generated_text(self) -> str:
        return "".join(json.loads(t) if isinstance(t, bytes) else t for t in self.generated)

    def fail(self, error_body: dict[str, Any]) -> bytes:
        """An upstream failure after the stream began: the open block is closed, then `error`."""
        out = b"" if self.started else self.start()
        self.finished = True
        return out + self._close_block() + error_event(error_body)
