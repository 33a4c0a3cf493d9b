"""A chat-completions stream -> the Responses API event stream.

One `ChatStreamToResponses` per request consumes the completion run's `StreamPiece`s (OpenAI
`chat.completion.chunk`s) and returns the SSE bytes of OpenAI's Responses events, numbered by
`sequence_number`:

    response.created, response.in_progress,
    per reasoning text (DeepSeek's `reasoning_content`): response.output_item.added (reasoning),
                      response.reasoning_text.delta..., .done, response.output_item.done
    per text answer:  response.output_item.added (message), response.content_part.added,
                      response.output_text.delta..., response.output_text.done,
                      response.content_part.done, response.output_item.done
    per tool call:    response.output_item.added (function_call),
                      response.function_call_arguments.delta..., .done, response.output_item.done
                      (a custom tool's call: custom_tool_call, its whole input in one
                      response.custom_tool_call_input.delta, then .done: the input is only
                      known once its JSON stand-in `{"input": ...}` is complete)
    response.completed (or response.incomplete when the answer was cut by max_output_tokens or
    a content filter) carrying the whole response with its usage;
    on an upstream failure mid-stream: error, then response.failed.

It also assembles the final `response` object (`.response`), which is what gets stored. Events
are formatted from templates (the payloads are small and fixed; only strings go through
json.dumps), and a plain text-delta chunk forwarded unparsed by the OpenAI-compatible adapter
has its text read without parsing the whole chunk: this runs once per upstream chunk on the
hot path (see bench/README.md for its measured cost).
"""
from __future__ import annotations

import json
from json.encoder import encode_basestring
from typing import Any

from app.providers.base import StreamPiece
from app.translate.chat_to_responses import base_response, custom_tool_input, finish, new_item_id, reasoning_of
from app.translate.responses_to_chat import custom_tool_names

_dumps = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode
_CONTENT = b'"delta":{"content":"'
# An output_text.delta event: sequence number, item id, `_delta_tail` (output index), JSON-escaped text.
_DELTA = (b'event: response.output_text.delta\ndata: {"type":"response.output_text.delta",'
          b'"sequence_number":%d,"item_id":"%s%s%s","logprobs":[]}\n\n')


def plain_text_delta(data: bytes) -> bytes | None:
    """The text of a chunk whose only choice's delta is `{"content": "..."}` and that finishes
    nothing (the bulk of a stream), as it is escaped in the chunk's JSON (so it is copied into
    the event as it is, never decoded and encoded again); None for any other chunk."""
    i = data.find(_CONTENT)
    if i < 0:
        return None
    start = i + len(_CONTENT)
    end = data.find(b'"', start)
    while end > 0 and data[end - 1] == 0x5C:  # a backslash before it: escaped if their count is odd
        k = end - 1
        while data[k - 1] == 0x5C:
            k -= 1
        if (end - k) % 2 == 0:
            break
        end = data.find(b'"', end + 1)
    if end < 0:
        return None
    rest = end + 1
    if not data.startswith(b"}", rest) or data.find(b'"finish_reason":null', rest) < 0 \
            or data.find(b'"delta":', rest) >= 0:
        return None
    return data[start:end]


def _escaped(text: str) -> bytes:
    """`text` as the inside of a JSON string."""
    return encode_basestring(text)[1:-1].encode()


def _unescaped(parts: list[bytes]) -> str:
    joined = b"".join(parts)
    try:
        return json.loads(b'"' + joined + b'"')
    except ValueError:  # an upstream that sent broken escapes: keep what can be read
        return joined.decode(errors="replace")


def sse(kind: str, data: str) -> bytes:
    """One Responses SSE event (OpenAI sends the type both as `event:` and in the data)."""
    return f"event: {kind}\ndata: {data}\n\n".encode()


class ChatStreamToResponses:
    def __init__(self, request: dict[str, Any], response_id: str, created_at: int, model: str) -> None:
        self.response = base_response(request, response_id, created_at, model)
        self.items: list[dict[str, Any]] = []
        self.seq = -1
        self._open: dict[str, Any] | None = None   # the message item receiving text deltas
        self._text: list[bytes] = []  # the open message's text, JSON-escaped pieces
        self._calls: dict[int, dict[str, Any]] = {}  # chat tool-call index -> its item
        self._args: dict[int, list[str]] = {}
        self._call_open: int | None = None            # chat index of the call receiving deltas
        self.finish_reason: str | None = None
        self.usage: dict[str, Any] | None = None
        self._custom = custom_tool_names(request)
        self._reasoning: dict[str, Any] | None = None  # the reasoning item receiving deltas
        self._reasoning_text: list[str] = []

    def _next(self) -> int:
        self.seq += 1
        return self.seq

    def _lifecycle(self, kind: str, body: str | None = None) -> bytes:
        return sse(kind, '{"type":"%s","sequence_number":%d,"response":%s}'
                   % (kind, self._next(), body if body is not None else _dumps(self.response)))

    def _item_event(self, kind: str, item: dict[str, Any]) -> bytes:
        return sse(kind, '{"type":"%s","sequence_number":%d,"output_index":%d,"item":%s}'
                   % (kind, self._next(), item["_index"], _dumps(_public(item))))

    def start(self) -> list[bytes]:
        """response.created and response.in_progress."""
        body = _dumps(self.response)
        return [self._lifecycle("response.created", body), self._lifecycle("response.in_progress", body)]

    def feed(self, piece: StreamPiece) -> list[bytes]:
        """The events of one upstream piece (often none: role-only and usage chunks)."""
        if piece.usage is not None:
            self.usage = piece.usage
        out: list[bytes] = []
        if piece.chunk is None and piece.raw is not None:
            escaped = plain_text_delta(piece.raw)
            if escaped is not None:
                if escaped and self._open is not None and self._call_open is None:  # the bulk of a stream
                    self._text.append(escaped)
                    self.seq += 1
                    return [_DELTA % (self.seq, self._delta_id, self._delta_tail, escaped)]
                if escaped:
                    self._text_delta(escaped, out)
                return out
        chunk = piece.chunk if piece.chunk is not None else json.loads(piece.data())
        if chunk.get("model"):
            self.response["model"] = chunk["model"]
        for choice in chunk.get("choices") or ():
            if choice.get("index", 0) != 0:
                continue
            delta = choice.get("delta") or {}
            reasoning = reasoning_of(delta)
            if reasoning:
                self._reasoning_delta(reasoning, out)
            text = delta.get("content")
            if text:
                self._text_delta(_escaped(text), out)
            for call in delta.get("tool_calls") or ():
                self._call_delta(call, out)
            if choice.get("finish_reason"):
                self.finish_reason = choice["finish_reason"]
        return out

    def _add(self, item: dict[str, Any], out: list[bytes]) -> dict[str, Any]:
        item["_index"] = len(self.items)
        self.items.append(item)
        out.append(self._item_event("response.output_item.added", item))
        return item

    def _reasoning_delta(self, text: str, out: list[bytes]) -> None:
        item = self._reasoning
        if item is None:
            self._close_text(out)
            self._close_call(out)
            item = self._reasoning = self._add({"id": new_item_id("rs"), "type": "reasoning", "summary": [],
                                                "content": [], "status": "in_progress"}, out)
            self._reasoning_text = []
        self._reasoning_text.append(text)
        out.append(sse("response.reasoning_text.delta",
                       '{"type":"response.reasoning_text.delta","sequence_number":%d,"item_id":"%s",'
                       '"output_index":%d,"content_index":0,"delta":%s}'
                       % (self._next(), item["id"], item["_index"], encode_basestring(text))))

    def _close_reasoning(self, out: list[bytes], status: str = "completed") -> None:
        item = self._reasoning
        if item is None:
            return
        self._reasoning = None
        text = "".join(self._reasoning_text)
        item["content"], item["status"] = [{"type": "reasoning_text", "text": text}], status
        out.append(sse("response.reasoning_text.done",
                       '{"type":"response.reasoning_text.done","sequence_number":%d,"item_id":"%s",'
                       '"output_index":%d,"content_index":0,"text":%s}'
                       % (self._next(), item["id"], item["_index"], encode_basestring(text))))
        out.append(self._item_event("response.output_item.done", item))

    def _text_delta(self, escaped: bytes, out: list[bytes]) -> None:
        if self._reasoning is not None:
            self._close_reasoning(out)
        if self._call_open is not None:
            self._close_call(out)
        item = self._open
        if item is None:
            item = self._open = self._add({"id": new_item_id("msg"), "type": "message", "status": "in_progress",
                                           "role": "assistant", "content": []}, out)
            self._text = []
            out.append(sse("response.content_part.added",
                           '{"type":"response.content_part.added","sequence_number":%d,"item_id":"%s",'
                           '"output_index":%d,"content_index":0,"part":{"type":"output_text","text":"",'
                           '"annotations":[],"logprobs":[]}}' % (self._next(), item["id"], item["_index"])))
            # The delta events of this item differ only in sequence number and text.
            self._delta_tail = ('","output_index":%d,"content_index":0,"delta":"' % item["_index"]).encode()
            self._delta_id = item["id"].encode()
        self._text.append(escaped)
        self.seq += 1
        out.append(_DELTA % (self.seq, self._delta_id, self._delta_tail, escaped))

    def _close_text(self, out: list[bytes], status: str = "completed") -> None:
        item = self._open
        if item is None:
            return
        self._open = None
        text = _unescaped(self._text)
        part = {"type": "output_text", "text": text, "annotations": [], "logprobs": []}
        item["content"], item["status"] = [part], status
        out.append(sse("response.output_text.done",
                       '{"type":"response.output_text.done","sequence_number":%d,"item_id":"%s",'
                       '"output_index":%d,"content_index":0,"text":%s,"logprobs":[]}'
                       % (self._next(), item["id"], item["_index"], encode_basestring(text))))
        out.append(sse("response.content_part.done",
                       '{"type":"response.content_part.done","sequence_number":%d,"item_id":"%s",'
                       '"output_index":%d,"content_index":0,"part":%s}'
                       % (self._next(), item["id"], item["_index"], _dumps(part))))
        out.append(self._item_event("response.output_item.done", item))

    def _call_delta(self, call: dict[str, Any], out: list[bytes]) -> None:
        index = call.get("index", 0)
        function = call.get("function") or {}
        item = self._calls.get(index)
        if item is None:
            self._close_reasoning(out)
            self._close_text(out)
            self._close_call(out)
            name, call_id = function.get("name") or "", call.get("id") or new_item_id("call")
            if name in self._custom:
                item = {"id": new_item_id("ctc"), "type": "custom_tool_call", "status": "in_progress",
                        "call_id": call_id, "name": name, "input": ""}
            else:
                item = {"id": new_item_id("fc"), "type": "function_call", "status": "in_progress", "arguments": "",
                        "call_id": call_id, "name": name}
            item = self._calls[index] = self._add(item, out)
            self._args[index] = []
            self._call_open = index
        elif function.get("name") and not item["name"]:
            item["name"] = function["name"]
        arguments = function.get("arguments")
        if arguments:
            self._args[index].append(arguments)
            if self._call_open == index and item["type"] == "function_call":
                out.append(sse("response.function_call_arguments.delta",
                               '{"type":"response.function_call_arguments.delta","sequence_number":%d,'
                               '"item_id":"%s","output_index":%d,"delta":%s}'
                               % (self._next(), item["id"], item["_index"], encode_basestring(arguments))))

    def _close_call(self, out: list[bytes], status: str = "completed") -> None:
        if self._call_open is None:
            return
        index, self._call_open = self._call_open, None
        item = self._calls[index]
        item["status"] = status
        self._set_arguments(index, item)
        if item["type"] == "custom_tool_call":
            head = '"sequence_number":%d,"item_id":"%s","output_index":%d'
            out.append(sse("response.custom_tool_call_input.delta",
                           ('{"type":"response.custom_tool_call_input.delta",' + head + ',"delta":%s}')
                           % (self._next(), item["id"], item["_index"], _dumps(item["input"]))))
            out.append(sse("response.custom_tool_call_input.done",
                           ('{"type":"response.custom_tool_call_input.done",' + head + ',"input":%s}')
                           % (self._next(), item["id"], item["_index"], _dumps(item["input"]))))
            out.append(self._item_event("response.output_item.done", item))
            return
        out.append(sse("response.function_call_arguments.done",
                       '{"type":"response.function_call_arguments.done","sequence_number":%d,"item_id":"%s",'
                       '"output_index":%d,"name":%s,"arguments":%s}'
                       % (self._next(), item["id"], item["_index"], _dumps(item["name"]),
                          _dumps(item["arguments"]))))
        out.append(self._item_event("response.output_item.done", item))

    def _set_arguments(self, index: int, item: dict[str, Any]) -> None:
        arguments = "".join(self._args[index])
        if item["type"] == "custom_tool_call":
            item["input"] = custom_tool_input(arguments)
        else:
            item["arguments"] = arguments

    def finish(self) -> list[bytes]:
        """Close the open items, then response.completed (or response.incomplete)."""
        out: list[bytes] = []
        status = "incomplete" if self.finish_reason in ("length", "content_filter") else "completed"
        self._close_reasoning(out, status)
        self._close_text(out, status)
        self._close_call(out, status)
        for index, item in self._calls.items():  # deltas that came after their call was closed
            self._set_arguments(index, item)
        self.response["output"] = [_public(item) for item in self.items]
        finish(self.response, self.finish_reason, self.usage)
        kind = "response.completed" if self.response["status"] == "completed" else "response.incomplete"
        out.append(self._lifecycle(kind))
        return out

    def fail(self, message: str, code: str = "server_error") -> list[bytes]:
        """The upstream failed after the stream began: `error`, then `response.failed` with what
        was produced so far (items left open are marked incomplete)."""
        self.abandon("failed")
        self.response["error"] = {"code": code, "message": message}
        error = sse("error", '{"type":"error","sequence_number":%d,"code":%s,"message":%s,"param":null}'
                    % (self._next(), _dumps(code), _dumps(message)))
        return [error, self._lifecycle("response.failed")]

    def abandon(self, status: str = "incomplete") -> None:
        """The response as far as it got (the client left, or the upstream failed): output so
        far, items left open marked incomplete, the usage if it came."""
        for item in self.items:
            if item["status"] == "in_progress":
                item["status"] = "incomplete"
                if item["type"] == "reasoning":
                    item["content"] = [{"type": "reasoning_text", "text": "".join(self._reasoning_text)}]
                if item["type"] == "message":
                    item["content"] = [{"type": "output_text", "text": _unescaped(self._text),
                                        "annotations": [], "logprobs": []}]
        for index, item in self._calls.items():
            self._set_arguments(index, item)
        self.response["output"] = [_public(item) for item in self.items]
        self.response["status"] = status
        self.response["usage"] = finish({}, None, self.usage)["usage"]


def _public(item: dict[str, Any]) -> dict[str, Any]:
    """The item without the encoder's bookkeeping."""
    return {k: v for k, v in item.items() if k != "_index"}
