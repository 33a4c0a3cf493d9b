"""Google Gemini API (`models/{model}:generateContent`, `:streamGenerateContent?alt=sse`),
translated to and from OpenAI chat completions.

Request: system/developer messages -> `systemInstruction`; user/assistant -> `contents` with
roles `user`/`model`; text parts, images as `inlineData` (data URLs) or `fileData` (URLs);
assistant `tool_calls` -> `functionCall` parts, `tool` messages -> `functionResponse` parts
(the function name is looked up from the call id); `tools` -> `functionDeclarations`,
`tool_choice` -> `toolConfig.functionCallingConfig`; temperature, top_p, max tokens, stop,
n, penalties, seed and `response_format` -> `generationConfig`. The key goes in the
`x-goog-api-key` header, never in the URL.

Answer: text parts -> content (thought parts skipped), `functionCall` -> `tool_calls` (ids
generated: Gemini has none), `finishReason` -> finish_reason (SAFETY, RECITATION, BLOCKLIST,
PROHIBITED_CONTENT, SPII -> `content_filter`; a blocked prompt too); `usageMetadata` -> usage
(prompt includes tool-use prompt tokens, completion includes thinking tokens, cached content
tokens -> `prompt_tokens_details.cached_tokens`).
"""
from __future__ import annotations

import json
import re
from typing import Any
from urllib.parse import quote

from app.providers.base import (Completion, ProviderAuthError, ProviderBadRequest, ProviderContextTooLong,
                                ProviderError, ProviderNotFound, ProviderRateLimited, ProviderUnavailable,
                                StreamPiece, embeddings_body, error_for_status, parse_retry_after, redact,
                                register)
from app.providers.native_http import (ChunkFactory, NativeHTTPProvider, StreamTranslator, choice,
                                       completion_body, content_parts, forced_tool, function_tools,
                                       image_source, json_or_none, new_id, openai_usage, parse_arguments,
                                       sse_batches, stop_sequences, text_of, tool_call, tool_call_names)

FILTERED = {"SAFETY", "RECITATION", "BLOCKLIST", "PROHIBITED_CONTENT", "SPII", "IMAGE_SAFETY"}
_DELAY = re.compile(r"^(\d+(?:\.\d+)?)s$")


def finish_reason(reason: str | None, has_calls: bool) -> str | None:
    if reason is None or reason == "FINISH_REASON_UNSPECIFIED":
        return None
    if reason in FILTERED:
        return "content_filter"
    if reason == "MAX_TOKENS":
        return "length"
    return "tool_calls" if has_calls else "stop"


def _user_parts(content: Any) -> list[dict[str, Any]]:
    parts: list[dict[str, Any]] = []
    for part in content_parts(content):
        kind = part.get("type")
        if kind == "text":
            if part.get("text"):
                parts.append({"text": part["text"]})
        elif kind == "image_url":
            source_type, media, data = image_source(part)
            parts.append({"inlineData": {"mimeType": media, "data": data}} if source_type == "base64"
                         else {"fileData": {"mimeType": media, "fileUri": data}})
        else:
            raise ProviderBadRequest(f"content parts of type {kind!r} are not supported by the gemini adapter")
    return parts


def _response_object(content: Any) -> dict[str, Any]:
    """A tool result as the object `functionResponse.response` must be."""
    text = text_of(content)
    try:
        value = json.loads(text)
    except ValueError:
        return {"content": text}
    return value if isinstance(value, dict) else {"content": value}


def to_gemini(request: dict[str, Any], max_tokens: int | None) -> dict[str, Any]:
    """The generateContent body for an OpenAI chat request."""
    names = tool_call_names(request["messages"])
    system: list[str] = []
    contents: list[dict[str, Any]] = []
    for msg in request["messages"]:
        role = msg.get("role")
        if role in ("system", "developer"):
            system.append(text_of(msg.get("content")))
            continue
        if role == "user":
            turn, parts = "user", _user_parts(msg.get("content"))
        elif role == "assistant":
            turn = "model"
            parts = [{"text": text_of(msg.get("content"))}] if text_of(msg.get("content")) else []
            for call in msg.get("tool_calls") or ():
                fn = call.get("function") or {}
                parts.append({"functionCall": {"name": str(fn.get("name")),
                                               "args": parse_arguments(fn.get("arguments"))}})
        else:
            name = names.get(str(msg.get("tool_call_id"))) or msg.get("name")
            if not name:
                raise ProviderBadRequest("a tool message must answer a tool_call_id of an earlier "
                                         "assistant message")
            turn = "user"
            parts = [{"functionResponse": {"name": name, "response": _response_object(msg.get("content"))}}]
        if not parts:
            continue
        if contents and contents[-1]["role"] == turn:
            contents[-1]["parts"].extend(parts)
        else:
            contents.append({"role": turn, "parts": parts})
    body: dict[str, Any] = {"contents": contents}
    if system:
        body["systemInstruction"] = {"parts": [{"text": "\n\n".join(s for s in system if s)}]}
    config = _generation_config(request, max_tokens)
    if config:
        body["generationConfig"] = config
    tools = function_tools(request)
    if tools:
        body["tools"] = [{"functionDeclarations": [
            {k: v for k, v in (("name", t["name"]), ("description", t.get("description")),
                               ("parameters", t.get("parameters"))) if v is not None} for t in tools]}]
    tool_config = _tool_config(request.get("tool_choice"))
    if tool_config and tools:
        body["toolConfig"] = tool_config
    return body


def _generation_config(request: dict[str, Any], max_tokens: int | None) -> dict[str, Any]:
    config: dict[str, Any] = {}
    for openai_name, gemini_name in (("temperature", "temperature"), ("top_p", "topP"),
                                     ("top_k", "topK"), ("presence_penalty", "presencePenalty"),
                                     ("frequency_penalty", "frequencyPenalty"), ("seed", "seed"),
                                     ("n", "candidateCount")):
        if request.get(openai_name) is not None:
            config[gemini_name] = request[openai_name]
    if max_tokens:
        config["maxOutputTokens"] = max_tokens
    stops = stop_sequences(request)
    if stops:
        config["stopSequences"] = stops
    fmt = request.get("response_format")
    if isinstance(fmt, dict) and fmt.get("type") in ("json_object", "json_schema"):
        config["responseMimeType"] = "application/json"
        schema = (fmt.get("json_schema") or {}).get("schema") if fmt["type"] == "json_schema" else None
        if isinstance(schema, dict):
            config["responseJsonSchema"] = schema
    return config


def _tool_config(tool_choice: Any) -> dict[str, Any] | None:
    name = forced_tool(tool_choice)
    if name:
        return {"functionCallingConfig": {"mode": "ANY", "allowedFunctionNames": [name]}}
    mode = {"auto": "AUTO", "required": "ANY", "none": "NONE"}.get(tool_choice) if isinstance(tool_choice, str) \
        else None
    return {"functionCallingConfig": {"mode": mode}} if mode else None


def usage_from(meta: dict[str, Any]) -> dict[str, Any]:
    prompt = int(meta.get("promptTokenCount") or 0) + int(meta.get("toolUsePromptTokenCount") or 0)
    thoughts = int(meta.get("thoughtsTokenCount") or 0)
    completion = int(meta.get("candidatesTokenCount") or 0) + thoughts
    total = meta.get("totalTokenCount")
    return openai_usage(prompt, completion, cached=int(meta.get("cachedContentTokenCount") or 0),
                        reasoning=thoughts if thoughts else None,
                        total=int(total) if isinstance(total, int) else None)


def _parts(candidate: dict[str, Any]) -> tuple[str, list[dict[str, Any]]]:
    """(text, function calls) of one candidate; thought summaries are not content."""
    text, calls = [], []
    for part in (candidate.get("content") or {}).get("parts") or ():
        if part.get("thought"):
            continue
        if isinstance(part.get("text"), str):
            text.append(part["text"])
        elif isinstance(part.get("functionCall"), dict):
            call = part["functionCall"]
            calls.append(tool_call(call.get("id") or new_id("call"), call["name"], call.get("args") or {}))
    return "".join(text), calls


def from_gemini(body: dict[str, Any], model: str) -> dict[str, Any]:
    candidates = body.get("candidates") or []
    choices = []
    for i, candidate in enumerate(candidates):
        text, calls = _parts(candidate)
        finish = finish_reason(candidate.get("finishReason"), bool(calls)) or "stop"
        choices.append(choice(text, calls, finish, index=int(candidate.get("index", i))))
    if not choices:
        if not (body.get("promptFeedback") or {}).get("blockReason"):
            raise ValueError("no candidates")
        choices.append(choice("", [], "content_filter"))  # the prompt itself was blocked
    usage = usage_from(body.get("usageMetadata") or {})
    return completion_body(body.get("modelVersion") or model, choices, usage, cid=body.get("responseId"))


class GeminiStream(StreamTranslator):
    """Every event is a GenerateContentResponse; the stream has no terminal event (the body
    ends), so it is complete when a finishReason (or a prompt block) was seen."""

    def __init__(self, model: str) -> None:
        self.chunks = ChunkFactory(model)
        self.meta: dict[str, Any] = {}
        self.finished = False
        self.started: set[int] = set()
        self.tool_counts: dict[int, int] = {}

    def feed(self, data: bytes) -> list[StreamPiece]:
        event = json.loads(data)
        if isinstance(event.get("error"), dict):
            raise gemini_error(int(event["error"].get("code") or 500), event, None)
        if isinstance(event.get("usageMetadata"), dict):
            self.meta = event["usageMetadata"]
        self.chunks.model = event.get("modelVersion") or self.chunks.model
        out: list[StreamPiece] = []
        candidates = event.get("candidates") or []
        if not candidates and (event.get("promptFeedback") or {}).get("blockReason"):
            self.finished = True
            return [self.chunks.piece({"role": "assistant", "content": ""}),
                    self.chunks.piece({}, "content_filter")]
        for i, candidate in enumerate(candidates):
            index = int(candidate.get("index", i))
            if index not in self.started:
                self.started.add(index)
                out.append(self.chunks.piece({"role": "assistant", "content": ""}, index=index))
            text, calls = _parts(candidate)
            if text:
                out.append(self.chunks.piece({"content": text}, index=index))
            for call in calls:
                n = self.tool_counts.get(index, 0)
                self.tool_counts[index] = n + 1
                out.append(self.chunks.piece({"tool_calls": [{"index": n, **call}]}, index=index))
            finish = finish_reason(candidate.get("finishReason"), bool(self.tool_counts.get(index)))
            if finish:
                self.finished = True
                out.append(self.chunks.piece({}, finish, index=index))
        return out

    def close(self) -> list[StreamPiece]:
        if not self.finished:
            raise ProviderUnavailable("the Gemini stream ended without a finishReason")
        return [self.chunks.usage(usage_from(self.meta))]


def _retry_delay(err: dict[str, Any]) -> float | None:
    """google.rpc.RetryInfo.retryDelay ("37s") of a RESOURCE_EXHAUSTED error."""
    for detail in err.get("details") or ():
        if isinstance(detail, dict) and isinstance(detail.get("retryDelay"), str):
            match = _DELAY.match(detail["retryDelay"])
            if match:
                return float(match.group(1))
    return None


def gemini_error(status: int, parsed: Any, headers: Any) -> ProviderError:
    err = parsed.get("error") if isinstance(parsed, dict) else None
    err = err if isinstance(err, dict) else {}
    message = redact(str(err.get("message") or f"Gemini answered HTTP {status}"))
    grpc_status = str(err.get("status") or "")
    reasons = {str(d.get("reason")) for d in err.get("details") or () if isinstance(d, dict)}
    retry_after = parse_retry_after(headers.get("Retry-After")) if headers is not None else None
    if retry_after is None:
        retry_after = _retry_delay(err)
    kw: dict[str, Any] = {"upstream_status": status, "code": grpc_status or None}
    if "API_KEY_INVALID" in reasons or grpc_status in ("UNAUTHENTICATED", "PERMISSION_DENIED"):
        return ProviderAuthError(message, **kw)  # Gemini answers a bad key with 400 INVALID_ARGUMENT
    if status == 429 or grpc_status == "RESOURCE_EXHAUSTED":
        return ProviderRateLimited(message, retry_after=retry_after, **kw)
    if "exceeds the maximum number of tokens" in message or ("token count" in message and "exceeds" in message):
        return ProviderContextTooLong(message, upstream_status=status, code="context_length_exceeded")
    if grpc_status == "NOT_FOUND":
        return ProviderNotFound(message, **kw)
    return error_for_status(status, message, code=grpc_status or None, retry_after=retry_after)


@register
class GeminiProvider(NativeHTTPProvider):
    type = "gemini"
    kinds = frozenset({"chat", "embedding"})
    from_upstream = staticmethod(from_gemini)
    stream_batches = staticmethod(sse_batches)
    stream_translator = GeminiStream
    default_base_url = "https://generativelanguage.googleapis.com/v1beta"

    def headers(self, stream: bool) -> dict[str, str]:
        headers = dict(self.static_headers)
        key = self.api_key()
        if key:
            headers["x-goog-api-key"] = key
        if stream:
            headers["Accept"] = "text/event-stream"
        return headers

    def upstream_error(self, status: int, body: bytes, headers: Any) -> ProviderError:
        return gemini_error(status, json_or_none(body), headers)

    def embed(self, request: dict[str, Any]) -> Completion:
        """`models/{model}:batchEmbedContents`, one EmbedContentRequest per input (text only);
        `dimensions` -> `outputDimensionality`. The Gemini API reports no token usage for
        embeddings (the gateway counts them) unless the answer has `usageMetadata`."""
        self.require_configured()
        model = str(request["model"]).removeprefix("models/")
        one: dict[str, Any] = {"model": f"models/{model}"}
        if request.get("dimensions") is not None:
            one["outputDimensionality"] = request["dimensions"]
        body = {"requests": [{**one, "content": {"parts": [{"text": text}]}} for text in request["input"]]}
        path = f"/models/{quote(model, safe='-._~')}:batchEmbedContents"
        answer = self.read_json(self.post(path, json.dumps(body, separators=(",", ":")).encode(),
                                          self.headers(False)))
        with self.translating():
            vectors = [e["values"] for e in answer["embeddings"]]
            if len(vectors) != len(request["input"]):
                raise ValueError("one embedding per input")
            meta = answer.get("usageMetadata")
            prompt = meta.get("promptTokenCount") if isinstance(meta, dict) else None
            return embeddings_body(model, vectors, prompt if isinstance(prompt, int) else None)

    def _post(self, request: dict[str, Any], stream: bool):
        self.require_configured()
        explicit = request.get("max_completion_tokens") or request.get("max_tokens")
        body = to_gemini(request, self.output_cap(request) if explicit or self.settings.get("max_tokens")
                         else None)
        model = quote(str(request["model"]).removeprefix("models/"), safe="-._~")
        path = f"/models/{model}:streamGenerateContent?alt=sse" if stream else f"/models/{model}:generateContent"
        return self.post(path, json.dumps(body, separators=(",", ":")).encode(), self.headers(stream))
