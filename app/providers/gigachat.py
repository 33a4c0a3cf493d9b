"""Sber GigaChat (`POST /chat/completions` in its OpenAI-like format), with its OAuth access token.

Token: `POST <auth_url>` with `Authorization: Basic <authorization key>` (the key from the
GigaChat project, base64 of client id and secret, read from `api_key_env`), a fresh `RqUID`
(uuid4) and `scope=<scope>` (form-encoded) answers `{"access_token", "expires_at"}`, the
expiry in milliseconds. The token is cached per provider until `token_refresh_margin_s`
(60 s) before it expires, and fetched again once when the API answers 401.

Chat: GigaChat has `functions`/`function_call` where OpenAI has `tools`/`tool_calls`; its
function call arguments are a JSON object (OpenAI: a string); a function result is a
`function` message with the function's name and JSON content; one call per assistant message
(OpenAI's parallel calls are sent as consecutive call/result pairs). `finish_reason`
"function_call" -> "tool_calls", "blacklist" -> "content_filter". Usage as sent, with
`precached_prompt_tokens` -> `prompt_tokens_details.cached_tokens`. Images are not supported
(GigaChat takes them as uploaded files).
"""
from __future__ import annotations

import json
import threading
import time
import uuid
from typing import Any
from urllib.parse import urlencode, urlsplit

from app.providers.base import (ProviderAuthError, ProviderBadRequest, ProviderContextTooLong,
                                ProviderError, ProviderUnavailable, StreamPiece, error_for_status,
                                parse_retry_after, redact, register, register_secret)
from app.providers.http_pool import PooledResponse
from app.providers.native_http import (ChunkFactory, NativeHTTPProvider, StreamTranslator, choice,
                                       completion_body, content_parts, forced_tool, function_tools,
                                       json_or_none, new_id, openai_usage, parse_arguments,
                                       single_choice_only, sse_batches, text_of, tool_call, tool_call_names)
from app.utils.streaming import DONE

DEFAULT_AUTH_URL = "https://ngw.devices.sberbank.ru:9443/api/v2/oauth"
FINISH = {"stop": "stop", "length": "length", "function_call": "tool_calls", "blacklist": "content_filter"}


def _function_result(content: Any) -> str:
    """GigaChat wants a function result as JSON text: non-JSON text is wrapped."""
    text = text_of(content)
    try:
        json.loads(text)
        return text
    except ValueError:
        return json.dumps({"result": text}, ensure_ascii=False)


def to_gigachat(request: dict[str, Any], stream: bool) -> dict[str, Any]:
    single_choice_only(request, "gigachat")
    names = tool_call_names(request["messages"])
    messages: list[dict[str, Any]] = []
    pending: list[dict[str, Any]] = []  # assistant calls after the first, each sent before its result
    for msg in request["messages"]:
        role = msg.get("role")
        if role in ("tool", "function"):
            call_id = str(msg.get("tool_call_id"))
            name = names.get(call_id) or msg.get("name")
            if not name:
                raise ProviderBadRequest("a tool message must answer a tool_call_id of an earlier "
                                         "assistant message")
            waiting = next((c for c in pending if c["id"] == call_id), None)
            if waiting is not None:
                pending.remove(waiting)
                messages.append(waiting["message"])
            messages.append({"role": "function", "name": name, "content": _function_result(msg.get("content"))})
            continue
        pending.clear()
        if role in ("system", "developer", "user"):
            for part in content_parts(msg.get("content")):
                if part.get("type") != "text":
                    raise ProviderBadRequest("the gigachat adapter takes text content only")
            messages.append({"role": "system" if role == "developer" else role,
                             "content": text_of(msg.get("content"))})
        elif role == "assistant":
            calls = msg.get("tool_calls") or []
            first: dict[str, Any] = {"role": "assistant", "content": text_of(msg.get("content"))}
            for i, call in enumerate(calls):
                fn = call.get("function") or {}
                fc = {"name": str(fn.get("name")), "arguments": parse_arguments(fn.get("arguments"))}
                if i == 0:
                    first["function_call"] = fc
                else:
                    pending.append({"id": str(call.get("id")),
                                    "message": {"role": "assistant", "content": "", "function_call": fc}})
            messages.append(first)
    body: dict[str, Any] = {"model": request["model"], "messages": messages, "stream": stream}
    for name in ("temperature", "top_p", "repetition_penalty", "update_interval"):
        if request.get(name) is not None:
            body[name] = request[name]
    limit = request.get("max_completion_tokens") or request.get("max_tokens")
    if limit:
        body["max_tokens"] = limit
    tools = function_tools(request)
    if tools:
        body["functions"] = [{k: v for k, v in t.items() if k in ("name", "description", "parameters",
                                                                 "few_shot_examples", "return_parameters")}
                             for t in tools]
        tool_choice = request.get("tool_choice")
        forced = forced_tool(tool_choice)
        if forced:
            body["function_call"] = {"name": forced}
        elif tool_choice in ("auto", "none"):
            body["function_call"] = tool_choice
        elif tool_choice == "required":
            body["function_call"] = "auto"  # GigaChat has no "some function, any": the nearest
    return body


def usage_from(usage: dict[str, Any]) -> dict[str, Any]:
    cached = usage.get("precached_prompt_tokens")
    return openai_usage(int(usage["prompt_tokens"]), int(usage["completion_tokens"]),
                        cached=int(cached) if isinstance(cached, int) else None,
                        total=int(usage.get("total_tokens") or 0) or None)


def _call_of(message: dict[str, Any]) -> list[dict[str, Any]]:
    fc = message.get("function_call")
    if not isinstance(fc, dict):
        return []
    call_id = "call_" + str(message.get("functions_state_id") or new_id("fn"))
    return [tool_call(call_id, fc["name"], fc.get("arguments") or {})]


def from_gigachat(body: dict[str, Any], model: str) -> dict[str, Any]:
    choices = []
    for i, c in enumerate(body["choices"]):
        calls = _call_of(c["message"])
        finish = FINISH.get(c.get("finish_reason") or "stop", "stop")
        choices.append(choice(str(c["message"].get("content") or ""), calls, finish, index=int(c.get("index", i))))
    usage = usage_from(body["usage"]) if isinstance(body.get("usage"), dict) else None
    return completion_body(body.get("model") or model, choices, usage)


class GigaChatStream(StreamTranslator):
    def __init__(self, model: str) -> None:
        self.chunks = ChunkFactory(model)
        self.started = False
        self.calls = 0
        self.usage: dict[str, Any] | None = None

    def feed(self, data: bytes) -> list[StreamPiece]:
        if data == DONE:
            self.done = True
            return []
        event = json.loads(data)
        if "choices" not in event and event.get("message"):
            raise gigachat_error(int(event.get("status") or 500), str(event["message"]), None)
        if isinstance(event.get("usage"), dict):
            self.usage = usage_from(event["usage"])
        self.chunks.model = event.get("model") or self.chunks.model
        out: list[StreamPiece] = []
        if not self.started:
            self.started = True
            out.append(self.chunks.piece({"role": "assistant", "content": ""}))
        for c in event["choices"]:
            delta = c.get("delta") or {}
            if delta.get("content"):
                out.append(self.chunks.piece({"content": str(delta["content"])}))
            for call in _call_of(delta):
                out.append(self.chunks.piece({"tool_calls": [{"index": self.calls, **call}]}))
                self.calls += 1
            if c.get("finish_reason"):
                out.append(self.chunks.piece({}, FINISH.get(c["finish_reason"], "stop")))
        return out

    def close(self) -> list[StreamPiece]:
        if not self.done:
            raise ProviderUnavailable("the GigaChat stream ended without [DONE]")
        return [self.chunks.usage(self.usage)] if self.usage else []


def gigachat_error(status: int, message: str, headers: Any) -> ProviderError:
    message = redact(message)
    retry_after = parse_retry_after(headers.get("Retry-After")) if headers is not None else None
    low = message.lower()
    if status == 413 or ("token" in low and ("exceed" in low or "too long" in low)):
        return ProviderContextTooLong(message, upstream_status=status, code="context_length_exceeded")
    return error_for_status(status, message, retry_after=retry_after)


@register
class GigaChatProvider(NativeHTTPProvider):
    type = "gigachat"
    from_upstream = staticmethod(from_gigachat)
    stream_batches = staticmethod(sse_batches)
    stream_translator = GigaChatStream
    default_base_url = "https://gigachat.devices.sberbank.ru/api/v1"

    def __init__(self, name: str, settings: dict[str, Any], defaults: dict[str, Any]) -> None:
        super().__init__(name, settings, defaults)
        auth_url = str(settings.get("auth_url") or DEFAULT_AUTH_URL)
        parts = urlsplit(auth_url)
        self.auth_path = parts.path or "/"
        self.auth_pool = self.new_pool(f"{parts.scheme}://{parts.netloc}")
        self.scope = str(settings.get("scope") or "GIGACHAT_API_PERS")
        self.refresh_margin_s = float(settings.get("token_refresh_margin_s", 60))
        self._token: tuple[str, float] | None = None  # (access token, expiry as time.time())
        self._lock = threading.Lock()

    @classmethod
    def validate_settings(cls, name: str, settings: dict[str, Any]) -> None:
        super().validate_settings(name, settings)
        auth = settings.get("auth_url", DEFAULT_AUTH_URL)
        if not isinstance(auth, str) or not auth.startswith(("http://", "https://")):
            raise ValueError(f"providers.{name}.auth_url: must be an http(s) URL")

    # -- access token ----------------------------------------------------------------------

    def access_token(self, refresh: bool = False) -> str:
        with self._lock:
            token = self._token
            if token is not None and not refresh and token[1] - self.refresh_margin_s > time.time():
                return token[0]
            self._token = None
        fresh = self._fetch_token()
        with self._lock:
            self._token = fresh
        return fresh[0]

    def _fetch_token(self) -> tuple[str, float]:
        headers = {"Authorization": f"Basic {self.api_key()}", "RqUID": str(uuid.uuid4()),
                   "Content-Type": "application/x-www-form-urlencoded", "Accept": "application/json"}
        try:
            resp = self.post(self.auth_path, urlencode({"scope": self.scope}).encode(), headers,
                             pool=self.auth_pool)
        except ProviderError as exc:
            if exc.kind in ("bad_request", "not_found", "auth"):
                # A refused authorization key or scope is the operator's configuration.
                raise ProviderAuthError(f"GigaChat OAuth refused the authorization key: {exc.message}",
                                        upstream_status=exc.upstream_status) from None
            raise
        data = self.read_json(resp)
        with self.translating():
            token, expires_ms = data["access_token"], data["expires_at"]
            if not isinstance(token, str) or not token or isinstance(expires_ms, bool):
                raise ValueError("token")
            register_secret(token)  # an upstream echoing it in an error must not show it
            return token, float(expires_ms) / 1000.0

    # -- chat ------------------------------------------------------------------------------

    def upstream_error(self, status: int, body: bytes, headers: Any) -> ProviderError:
        parsed = json_or_none(body)
        message = str(parsed.get("message")) if isinstance(parsed, dict) and parsed.get("message") else \
            f"GigaChat answered HTTP {status}"
        return gigachat_error(status, message, headers)

    def _post(self, request: dict[str, Any], stream: bool) -> PooledResponse:
        self.require_configured()
        body = json.dumps(to_gigachat(request, stream), separators=(",", ":"), ensure_ascii=False).encode()
        for attempt in (0, 1):
            token = self.access_token(refresh=attempt > 0)
            headers = {**self.static_headers, "Authorization": f"Bearer {token}"}
            if stream:
                headers["Accept"] = "text/event-stream"
            try:
                return self.post("/chat/completions", body, headers)
            except ProviderAuthError:
                if attempt == 0:
                    continue  # the token expired or was revoked early: one fresh token
                raise
        raise ProviderUnavailable("unreachable")  # pragma: no cover



    def close(self) -> None:
        super().close()
        self.auth_pool.close()
