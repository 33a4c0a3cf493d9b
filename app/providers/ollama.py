"""Ollama's native chat API (`POST /api/chat`, NDJSON streaming), translated to and from OpenAI
chat completions.

Request: messages keep their roles (developer -> system); images as base64 `images` (Ollama
takes no URLs); assistant `tool_calls` with arguments as objects; tool results with
`tool_name`; `tools` pass as they are (Ollama takes OpenAI's tool format); temperature,
top_p, max tokens (`num_predict`), stop, seed and penalties -> `options` (a client's own
`options` object is merged in); `response_format` -> `format`. No key is needed for a local
server; `api_key_env` (optional) is sent as a Bearer token for a hosted one.

Answer: `prompt_eval_count`/`eval_count` -> usage (Ollama omits `prompt_eval_count` when the
whole prompt came from its cache: the gateway then counts with tiktoken instead of billing 0);
`done_reason` "length" -> "length", tool calls -> "tool_calls". A model that is not pulled is
a 404 `not_found` naming the model.
"""
from __future__ import annotations

import json
from typing import Any

from app.providers.base import (Completion, ProviderBadRequest, ProviderError, ProviderNotFound,
                                ProviderUnavailable, StreamPiece, embeddings_body, error_for_status,
                                parse_retry_after, redact, register)
from app.providers.native_http import (ChunkFactory, NativeHTTPProvider, StreamTranslator, choice,
                                       completion_body, content_parts, image_source, json_or_none, new_id,
                                       ndjson_batches, openai_usage, parse_arguments, single_choice_only,
                                       stop_sequences, text_of, tool_call, tool_call_names)

OPTIONS = (("temperature", "temperature"), ("top_p", "top_p"), ("top_k", "top_k"), ("seed", "seed"),
           ("presence_penalty", "presence_penalty"), ("frequency_penalty", "frequency_penalty"))


def _user_message(role: str, content: Any) -> dict[str, Any]:
    text, images = [], []
    for part in content_parts(content):
        if part.get("type") == "text":
            text.append(part.get("text") or "")
        elif part.get("type") == "image_url":
            source_type, _, data = image_source(part)
            if source_type != "base64":
                raise ProviderBadRequest("the ollama adapter takes images only as base64 data URLs")
            images.append(data)
        else:
            raise ProviderBadRequest(f"content parts of type {part.get('type')!r} are not supported by ollama")
    msg: dict[str, Any] = {"role": role, "content": "".join(text)}
    if images:
        msg["images"] = images
    return msg


def to_ollama(request: dict[str, Any], max_tokens: int | None, stream: bool) -> dict[str, Any]:
    single_choice_only(request, "ollama")
    names = tool_call_names(request["messages"])
    messages: list[dict[str, Any]] = []
    for msg in request["messages"]:
        role = msg.get("role")
        if role in ("system", "developer", "user"):
            messages.append(_user_message("system" if role == "developer" else role, msg.get("content")))
        elif role == "assistant":
            out: dict[str, Any] = {"role": "assistant", "content": text_of(msg.get("content"))}
            calls = [{"function": {"name": str((c.get("function") or {}).get("name")),
                                   "arguments": parse_arguments((c.get("function") or {}).get("arguments"))}}
                     for c in msg.get("tool_calls") or ()]
            if calls:
                out["tool_calls"] = calls
            messages.append(out)
        else:
            out = {"role": "tool", "content": text_of(msg.get("content"))}
            name = names.get(str(msg.get("tool_call_id"))) or msg.get("name")
            if name:
                out["tool_name"] = name
            messages.append(out)
    body: dict[str, Any] = {"model": request["model"], "messages": messages, "stream": stream}
    options = {ollama: request[name] for name, ollama in OPTIONS if request.get(name) is not None}
    if max_tokens:
        options["num_predict"] = max_tokens
    stops = stop_sequences(request)
    if stops:
        options["stop"] = stops
    if isinstance(request.get("options"), dict):
        options.update(request["options"])
    if options:
        body["options"] = options
    if request.get("tools"):
        body["tools"] = request["tools"]
    fmt = request.get("response_format")
    if isinstance(fmt, dict) and fmt.get("type") == "json_object":
        body["format"] = "json"
    elif isinstance(fmt, dict) and fmt.get("type") == "json_schema":
        body["format"] = (fmt.get("json_schema") or {}).get("schema") or "json"
    if request.get("keep_alive") is not None:
        body["keep_alive"] = request["keep_alive"]
    return body


def usage_from(answer: dict[str, Any]) -> dict[str, Any] | None:
    prompt, completion = answer.get("prompt_eval_count"), answer.get("eval_count")
    if not isinstance(prompt, int) or not isinstance(completion, int):
        return None  # no exact figures: the gateway counts with tiktoken
    return openai_usage(prompt, completion)


def _calls(message: dict[str, Any]) -> list[dict[str, Any]]:
    return [tool_call(c.get("id") or new_id("call"), c["function"]["name"], c["function"].get("arguments"))
            for c in message.get("tool_calls") or ()]


def _finish(answer: dict[str, Any], has_calls: bool) -> str:
    if answer.get("done_reason") == "length":
        return "length"
    return "tool_calls" if has_calls else "stop"


def from_ollama(answer: dict[str, Any], model: str) -> dict[str, Any]:
    if "error" in answer:
        raise ProviderUnavailable(redact(str(answer["error"])))
    message = answer["message"]
    calls = _calls(message)
    content = message.get("content") or ""
    if not isinstance(content, str):
        raise TypeError("content")
    return completion_body(answer.get("model") or model, [choice(content, calls, _finish(answer, bool(calls)))],
                           usage_from(answer))


class OllamaStream(StreamTranslator):
    def __init__(self, model: str) -> None:
        self.chunks = ChunkFactory(model)
        self.started = False
        self.calls = 0
        self.usage: dict[str, Any] | None = None

    def feed(self, data: bytes) -> list[StreamPiece]:
        line = json.loads(data)
        if "error" in line:
            raise ProviderUnavailable(redact(str(line["error"])))
        out: list[StreamPiece] = []
        if not self.started:
            self.started = True
            out.append(self.chunks.piece({"role": "assistant", "content": ""}))
        message = line.get("message") or {}
        if message.get("content"):
            out.append(self.chunks.piece({"content": str(message["content"])}))
        for call in _calls(message):
            out.append(self.chunks.piece({"tool_calls": [{"index": self.calls, **call}]}))
            self.calls += 1
        if line.get("done") is True:
            self.done = True
            self.usage = usage_from(line)
            out.append(self.chunks.piece({}, _finish(line, self.calls > 0)))
        return out

    def close(self) -> list[StreamPiece]:
        if not self.done:
            raise ProviderUnavailable("the Ollama stream ended before its done line")
        return [self.chunks.usage(self.usage)] if self.usage else []


@register
class OllamaProvider(NativeHTTPProvider):
    type = "ollama"
    kinds = frozenset({"chat", "embedding"})
    from_upstream = staticmethod(from_ollama)
    stream_batches = staticmethod(ndjson_batches)
    stream_translator = OllamaStream
    default_base_url = "http://127.0.0.1:11434"
    key_required = False

    def headers(self, stream: bool) -> dict[str, str]:
        headers = dict(self.static_headers)
        key = self.api_key()
        if key:
            headers["Authorization"] = f"Bearer {key}"
        if stream:
            headers["Accept"] = "application/x-ndjson"
        return headers

    def upstream_error(self, status: int, body: bytes, headers: Any) -> ProviderError:
        parsed = json_or_none(body)
        message = redact(str(parsed.get("error"))) if isinstance(parsed, dict) and parsed.get("error") \
            else f"Ollama answered HTTP {status}"
        if status == 404 or "not found" in message and "pull" in message:
            return ProviderNotFound(f"{message} (run `ollama pull <model>` on the Ollama host)",
                                    upstream_status=status, code="model_not_found")
        return error_for_status(status, message, retry_after=parse_retry_after(headers.get("Retry-After")))

    def embed(self, request: dict[str, Any]) -> Completion:
        """`POST /api/embed` with every input at once (text only); `dimensions` passed on;
        `prompt_eval_count` is the usage."""
        self.require_configured()
        body: dict[str, Any] = {"model": request["model"], "input": request["input"]}
        if request.get("dimensions") is not None:
            body["dimensions"] = request["dimensions"]
        answer = self.read_json(self.post("/api/embed", json.dumps(body, separators=(",", ":")).encode(),
                                          self.headers(False)))
        with self.translating():
            if "error" in answer:
                raise ProviderUnavailable(redact(str(answer["error"])))
            vectors = answer["embeddings"]
            if not isinstance(vectors, list) or len(vectors) != len(request["input"]):
                raise ValueError("one embedding per input")
            prompt = answer.get("prompt_eval_count")
            return embeddings_body(str(answer.get("model") or request["model"]), vectors,
                                   prompt if isinstance(prompt, int) else None)

    def _post(self, request: dict[str, Any], stream: bool):
        self.require_configured()
        explicit = request.get("max_completion_tokens") or request.get("max_tokens")
        body = to_ollama(request, self.output_cap(request) if explicit else None, stream)
        return self.post("/api/chat", json.dumps(body, separators=(",", ":")).encode(), self.headers(stream))
