"""Anthropic Messages API (`POST /v1/messages`), translated to and from OpenAI chat completions.

Request: system/developer messages are lifted to `system`; content parts become text/image
blocks (base64 data URLs or plain URLs); assistant `tool_calls` become `tool_use` blocks and
`tool` messages `tool_result` blocks (consecutive results merged into one user turn);
`max_tokens` is required upstream, so the model's cap from models.json is sent when the client
gave none; `temperature` is capped at 1 (Anthropic's range). `x-api-key` and
`anthropic-version` headers.

Answer: text blocks -> `content`, `tool_use` -> `tool_calls`, `stop_reason` -> `finish_reason`;
usage: prompt = input + cache creation + cache read tokens, with the cache reads also as
`prompt_tokens_details.cached_tokens`. Streams: `message_start`, `content_block_*`,
`message_delta`, `message_stop`, `ping`, `error` events -> OpenAI chunks (tool arguments
streamed as `input_json_delta` become `tool_calls[].function.arguments` deltas).

Errors: `overloaded_error` (529) and `rate_limit_error` (429) are `rate_limited` and retryable,
with Retry-After when sent; "prompt is too long" is `context_too_long`.

Native passthrough (`messages` / `messages_stream`, used by `POST /v1/messages`): the client's
own Messages body is sent with only `model` and `stream` set, and the answer or the events
come back untouched (cache_control, thinking and their token counts survive), with the usage
normalised as above for billing.
"""
from __future__ import annotations

import json
from typing import Any, Iterator

from app.providers.base import (Completion, ProviderBadRequest, ProviderContextTooLong, ProviderError,
                                ProviderRateLimited, ProviderUnavailable, StreamPiece, error_for_status,
                                parse_retry_after, redact, register)
from app.providers.native_http import (ChunkFactory, NativeHTTPProvider, StreamTranslator, choice,
                                       completion_body, content_parts, forced_tool, function_tools,
                                       image_source, json_or_none, openai_usage, parse_arguments,
                                       single_choice_only, sse_batches, stop_sequences, text_of, tool_call)
from app.providers.openai_compatible import transport_error

API_VERSION = "2023-06-01"
# The fields of a Messages request that Anthropic's count_tokens endpoint takes.
COUNTED_FIELDS = ("messages", "system", "tools", "tool_choice", "thinking", "mcp_servers")
FINISH = {"end_turn": "stop", "stop_sequence": "stop", "max_tokens": "length", "tool_use": "tool_calls",
          "refusal": "content_filter", "pause_turn": "stop", "model_context_window_exceeded": "length"}
ERROR_STATUS = {"invalid_request_error": 400, "authentication_error": 401, "billing_error": 402,
                "permission_error": 403, "not_found_error": 404, "request_too_large": 413,
                "rate_limit_error": 429, "api_error": 500, "timeout_error": 504, "overloaded_error": 529}


def anthropic_error(status: int | None, error_type: str | None, message: str,
                    retry_after: float | None = None) -> ProviderError:
    """An Anthropic error (HTTP answer or stream `error` event) on the taxonomy."""
    message = redact(message)
    status = status or ERROR_STATUS.get(error_type or "", 502)
    if error_type == "overloaded_error" or status == 529:
        return ProviderRateLimited(message, upstream_status=status, retry_after=retry_after,
                                   code="overloaded_error")
    if "prompt is too long" in message.lower():
        return ProviderContextTooLong(message, upstream_status=status, code="context_length_exceeded")
    return error_for_status(status, message, code=error_type, retry_after=retry_after)


def _user_blocks(content: Any) -> list[dict[str, Any]]:
    blocks: list[dict[str, Any]] = []
    for part in content_parts(content):
        kind = part.get("type")
        if kind == "text":
            if part.get("text"):
                blocks.append({"type": "text", "text": part["text"]})
        elif kind == "image_url":
            source_type, media, data = image_source(part)
            source = ({"type": "base64", "media_type": media, "data": data} if source_type == "base64"
                      else {"type": "url", "url": data})
            blocks.append({"type": "image", "source": source})
        else:
            raise ProviderBadRequest(f"content parts of type {kind!r} are not supported by the anthropic adapter")
    return blocks


def _assistant_blocks(msg: dict[str, Any]) -> list[dict[str, Any]]:
    blocks: list[dict[str, Any]] = []
    text = text_of(msg.get("content"))
    if text:
        blocks.append({"type": "text", "text": text})
    for call in msg.get("tool_calls") or ():
        fn = call.get("function") or {}
        blocks.append({"type": "tool_use", "id": str(call.get("id")), "name": str(fn.get("name")),
                       "input": parse_arguments(fn.get("arguments"))})
    return blocks


def to_anthropic(request: dict[str, Any], max_tokens: int) -> dict[str, Any]:
    """The Messages API body for an OpenAI chat request."""
    single_choice_only(request, "anthropic")
    system: list[str] = []
    messages: list[dict[str, Any]] = []
    for msg in request["messages"]:
        role = msg.get("role")
        if role in ("system", "developer"):
            system.append(text_of(msg.get("content")))
            continue
        if role == "user":
            turn, blocks = "user", _user_blocks(msg.get("content"))
        elif role == "assistant":
            turn, blocks = "assistant", _assistant_blocks(msg)
        else:  # tool (or legacy function) result
            turn = "user"
            blocks = [{"type": "tool_result", "tool_use_id": str(msg.get("tool_call_id") or msg.get("name")),
                       "content": text_of(msg.get("content"))}]
        if not blocks:
            continue
        if messages and messages[-1]["role"] == turn:
            messages[-1]["content"].extend(blocks)  # consecutive turns of one role are merged
        else:
            messages.append({"role": turn, "content": blocks})
    body: dict[str, Any] = {"model": request["model"], "max_tokens": max_tokens, "messages": messages}
    if system:
        body["system"] = "\n\n".join(s for s in system if s)
    if request.get("temperature") is not None:
        body["temperature"] = min(float(request["temperature"]), 1.0)
    if request.get("top_p") is not None:
        body["top_p"] = request["top_p"]
    if request.get("top_k") is not None:
        body["top_k"] = request["top_k"]
    stops = stop_sequences(request)
    if stops:
        body["stop_sequences"] = stops
    tools = function_tools(request)
    if tools:
        body["tools"] = [{"name": t["name"], "description": t.get("description", ""),
                          "input_schema": t.get("parameters") or {"type": "object", "properties": {}}}
                         for t in tools]
    tool_choice = _tool_choice(request)
    if tool_choice is not None and tools:  # Anthropic refuses a tool_choice without tools
        body["tool_choice"] = tool_choice
    if isinstance(request.get("user"), str):
        body["metadata"] = {"user_id": request["user"]}
    return body


def _tool_choice(request: dict[str, Any]) -> dict[str, Any] | None:
    choice_value = request.get("tool_choice")
    name = forced_tool(choice_value)
    if name:
        result: dict[str, Any] = {"type": "tool", "name": name}
    elif choice_value in ("auto", "required", "none"):
        result = {"type": {"auto": "auto", "required": "any", "none": "none"}[choice_value]}
    elif request.get("parallel_tool_calls") is False:
        result = {"type": "auto"}
    else:
        return None
    if request.get("parallel_tool_calls") is False and result["type"] != "none":
        result["disable_parallel_tool_use"] = True
    return result


def usage_from(usage: dict[str, Any]) -> dict[str, Any]:
    """Anthropic usage in OpenAI shape: every input token (fresh, written to and read from the
    cache) counts as prompt; cache reads are also the cached tokens, cache writes are
    `cache_creation_input_tokens` (when there are any), so that each is billed at its price."""
    created = int(usage.get("cache_creation_input_tokens") or 0)
    read = int(usage.get("cache_read_input_tokens") or 0)
    prompt = int(usage.get("input_tokens") or 0) + created + read
    result = openai_usage(prompt, int(usage.get("output_tokens") or 0), cached=read)
    if created:
        result["cache_creation_input_tokens"] = created
    return result


def from_anthropic(body: dict[str, Any], model: str) -> dict[str, Any]:
    text, calls = [], []
    for block in body["content"]:
        if block["type"] == "text":
            text.append(block["text"])
        elif block["type"] == "tool_use":
            calls.append(tool_call(block["id"], block["name"], block.get("input") or {}))
    finish = FINISH.get(body.get("stop_reason") or "end_turn", "stop")
    usage = usage_from(body["usage"])
    return completion_body(body.get("model") or model, [choice("".join(text), calls, finish)], usage,
                           cid=body.get("id"))


class AnthropicStream(StreamTranslator):
    def __init__(self, model: str) -> None:
        self.chunks = ChunkFactory(model)
        self.usage: dict[str, Any] = {}
        self.finish = "stop"
        self.tool_index: dict[int, int] = {}  # content block index -> OpenAI tool_calls index
        self.started = False

    def feed(self, data: bytes) -> list[StreamPiece]:
        event = json.loads(data)
        kind = event["type"]
        if kind == "message_start":
            message = event["message"]
            self.usage.update(message.get("usage") or {})
            self.chunks.model = message.get("model") or self.chunks.model
            self.started = True
            return [self.chunks.piece({"role": "assistant", "content": ""})]
        if kind == "content_block_start":
            block = event["content_block"]
            if block["type"] == "tool_use":
                index = self.tool_index[event["index"]] = len(self.tool_index)
                call = {"index": index, "id": block["id"], "type": "function",
                        "function": {"name": block["name"], "arguments": ""}}
                return [self.chunks.piece({"tool_calls": [call]})]
            if block["type"] == "text" and block.get("text"):
                return [self.chunks.piece({"content": block["text"]})]
            return []
        if kind == "content_block_delta":
            delta = event["delta"]
            if delta["type"] == "text_delta":
                return [self.chunks.piece({"content": delta["text"]})]
            if delta["type"] == "input_json_delta" and delta.get("partial_json"):
                index = self.tool_index[event["index"]]
                return [self.chunks.piece({"tool_calls": [{"index": index,
                                                           "function": {"arguments": delta["partial_json"]}}]})]
            return []  # thinking / signature / citation deltas have no OpenAI chunk
        if kind == "message_delta":
            self.usage.update({k: v for k, v in (event.get("usage") or {}).items() if v is not None})
            reason = (event.get("delta") or {}).get("stop_reason")
            if reason:
                self.finish = FINISH.get(reason, "stop")
            return []
        if kind == "message_stop":
            self.done = True
            return []
        if kind == "error":
            err = event.get("error") or {}
            raise anthropic_error(None, err.get("type"), str(err.get("message") or "stream error"))
        return []  # ping, and event types added later

    def close(self) -> list[StreamPiece]:
        if not self.done:
            raise ProviderUnavailable("the Anthropic stream ended before message_stop")
        usage = usage_from(self.usage)
        return [self.chunks.piece({}, self.finish), self.chunks.usage(usage)]


class NativeMessageStream(StreamTranslator):
    """Anthropic's events passed on unchanged (native passthrough of `POST /v1/messages`): each
    piece has the event's JSON text in `raw` and the parsed event in `chunk` (its `type` is the
    SSE event name). The pieces of `message_start` and `message_delta` carry the usage so far in
    OpenAI's shape, so a stream cut short is still billed for what it used. An `error` event
    raises the mapped ProviderError."""

    def __init__(self) -> None:
        self.usage: dict[str, Any] = {}

    def feed(self, data: bytes) -> list[StreamPiece]:
        event = json.loads(data)
        kind = event["type"]
        piece = StreamPiece(raw=data, chunk=event)
        if kind == "message_start":
            self.usage.update(event["message"].get("usage") or {})
            piece.usage = usage_from(self.usage)
        elif kind == "message_delta":
            self.usage.update({k: v for k, v in (event.get("usage") or {}).items() if v is not None})
            piece.usage = usage_from(self.usage)
        elif kind == "message_stop":
            self.done = True
        elif kind == "error":
            err = event.get("error") or {}
            raise anthropic_error(None, err.get("type"), str(err.get("message") or "stream error"))
        return [piece]

    def close(self) -> list[StreamPiece]:
        if not self.done:
            raise ProviderUnavailable("the Anthropic stream ended before message_stop")
        return []


@register
class AnthropicProvider(NativeHTTPProvider):
    type = "anthropic"
    from_upstream = staticmethod(from_anthropic)
    stream_batches = staticmethod(sse_batches)
    stream_translator = AnthropicStream
    default_base_url = "https://api.anthropic.com/v1"

    def headers(self, stream: bool) -> dict[str, str]:
        headers = {"anthropic-version": str(self.settings.get("anthropic_version", API_VERSION)),
                   **self.static_headers}
        key = self.api_key()
        if key:
            headers["x-api-key"] = key
        if stream:
            headers["Accept"] = "text/event-stream"
        return headers

    def upstream_error(self, status: int, body: bytes, headers: Any) -> ProviderError:
        parsed = json_or_none(body)
        err = parsed.get("error") if isinstance(parsed, dict) else None
        error_type = err.get("type") if isinstance(err, dict) else None
        message = str(err.get("message")) if isinstance(err, dict) and err.get("message") else \
            f"Anthropic answered HTTP {status}"
        return anthropic_error(status, error_type if isinstance(error_type, str) else None, message,
                               parse_retry_after(headers.get("Retry-After")))

    # -- native passthrough of the Messages API (nothing translated, nothing lost) -----------

    def messages(self, body: dict[str, Any], model: str, beta: str | None = None) -> Completion:
        """`POST /messages` with the client's own Messages body (cache_control, thinking and
        every other field kept): the answer as Anthropic sent it, usage in OpenAI's shape."""
        resp = self._post_native(body, model, False, beta)
        try:
            raw = resp.read()
        except OSError as exc:
            raise transport_error(exc, self.name) from None
        with self.translating():
            data = json.loads(raw)
            usage = usage_from(data["usage"])
        return Completion(body=data, raw=raw, usage=usage)

    def messages_stream(self, body: dict[str, Any], model: str, beta: str | None = None) -> Iterator[StreamPiece]:
        """The streamed `POST /messages`: Anthropic's events, one piece each (`NativeMessageStream`)."""
        return self.stream_from(self._post_native(body, model, True, beta), sse_batches, NativeMessageStream())

    def count_tokens(self, body: dict[str, Any], model: str, beta: str | None = None) -> int:
        """`POST /messages/count_tokens`: Anthropic's own count of a Messages request's input."""
        self.require_configured()
        fields = {k: v for k, v in body.items() if k in COUNTED_FIELDS}
        headers = self.headers(False)
        if beta:
            headers["anthropic-beta"] = beta
        resp = self.post("/messages/count_tokens", json.dumps({**fields, "model": model}).encode(), headers)
        with self.translating():
            count = self.read_json(resp)["input_tokens"]
            if not isinstance(count, int):
                raise ValueError("input_tokens is not an integer")
        return count

    def _post_native(self, body: dict[str, Any], model: str, stream: bool, beta: str | None):
        self.require_configured()
        payload = {**body, "model": model, "stream": stream}
        headers = self.headers(stream)
        if beta:
            headers["anthropic-beta"] = beta
        return self.post("/messages", json.dumps(payload, separators=(",", ":")).encode(), headers)

    def _post(self, request: dict[str, Any], stream: bool):
        self.require_configured()
        body = to_anthropic(request, self.output_cap(request))
        if stream:
            body["stream"] = True
        return self.post("/messages", json.dumps(body, separators=(",", ":")).encode(), self.headers(stream))
