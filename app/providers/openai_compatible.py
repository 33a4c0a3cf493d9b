"""OpenAI-compatible upstreams (OpenAI, Groq, OpenRouter, DeepSeek, vLLM, ...).

A provider entry with `"responses": true` also speaks OpenAI's Responses API (`POST
/responses`): the gateway's `/v1/responses` then calls it with the Responses body as it is
(`responses()` / `responses_stream()`) instead of translating to chat completions; its usage is
normalised to the chat usage the completion run bills.

HTTP goes through `http_pool.HTTPPool` (http.client keep-alive connections): the cheapest
client measured under gevent, see that module.
"""
from __future__ import annotations

import json
import os
from typing import Any, Callable, Iterator


from app.providers.base import (Completion, Provider, ProviderError, ProviderTimeout,
                                ProviderUnavailable, StreamPiece, error_for_status, expand_env,
                                not_configured, parse_retry_after, redact, register,
                                register_secret_env)
from app.providers.http_pool import (HTTPPool, PooledResponse, UpstreamConnectError, http_timeouts,
                                     UpstreamTimeoutError)
from app.translate.responses_usage import chat_usage
from app.utils.streaming import DONE, iter_sse_batches

# Responses stream events after which the upstream sends nothing more.
RESPONSES_TERMINAL = frozenset({"response.completed", "response.incomplete"})


def upstream_error(status: int, body: bytes, headers: Any) -> ProviderError:
    """Turn an upstream error answer into the taxonomy, keeping its message (redacted)."""
    message, code = f"upstream answered HTTP {status}", None
    try:
        err = json.loads(body).get("error")
        if isinstance(err, dict):
            message = str(err.get("message") or message)
            code = err.get("code") or err.get("type")
        elif isinstance(err, str):
            message = err
    except (ValueError, AttributeError):
        pass
    return error_for_status(status, redact(message), code=code if isinstance(code, str) else None,
                            retry_after=parse_retry_after(headers.get("Retry-After")))


def _needs_parsing(data: bytes) -> bool:
    """Only a chunk with a usage object or an error needs parsing; the others are forwarded
    as they are. OpenAI puts `"usage":null` on every chunk when usage is requested."""
    if b'"error"' in data:
        return True
    return b'"usage"' in data and b'"usage":null' not in data and b'"usage": null' not in data


def transport_error(exc: Exception, name: str) -> ProviderError:
    if isinstance(exc, UpstreamTimeoutError):
        return ProviderTimeout(f"provider {name!r} timed out")
    if isinstance(exc, UpstreamConnectError):
        return ProviderUnavailable(f"provider {name!r} refused the connection")
    return ProviderUnavailable(f"provider {name!r} closed the connection")


def post_checked(pool: HTTPPool, path: str, body: bytes, headers: dict[str, str], name: str,
                 to_error: Callable[[int, bytes, Any], ProviderError]) -> PooledResponse:
    """POST through the pool; a transport failure or an error status (>= 400, its body mapped
    by `to_error`) raises the ProviderError of the taxonomy."""
    try:
        resp = pool.post(path, body, headers)
    except OSError as exc:
        raise transport_error(exc, name) from None
    if resp.status >= 400:
        try:
            data = resp.read()
        except OSError:
            data = b""
        raise to_error(resp.status, data, resp.headers)
    return resp


class HTTPStream:
    """An upstream stream that can be aborted from another greenlet (closing the socket)."""

    def __init__(self, response: PooledResponse, pieces: Iterator[StreamPiece]) -> None:
        self._response = response
        self._pieces = pieces

    def __iter__(self) -> "HTTPStream":
        return self

    def __next__(self) -> StreamPiece:
        return next(self._pieces)

    def abort(self) -> None:
        self._response.abort()  # unblocks a read in progress; the connection is not reused


@register
class OpenAICompatibleProvider(Provider):
    type = "openai"
    aliases = ("openai_compatible",)
    kinds = frozenset({"chat", "embedding", "image"})
    token_input = True

    def __init__(self, name: str, settings: dict[str, Any], defaults: dict[str, Any]) -> None:
        super().__init__(name, settings, defaults)
        # `${VAR}` in base_url (a local server's address, Cloudflare's account id) comes from
        # the environment; unset, the provider is not configured and makes no call.
        base_url, self._missing_url = expand_env(str(settings["base_url"]))
        self.base_url = base_url.rstrip("/") if not self._missing_url else "http://unconfigured.invalid"
        self.api_key_env = settings.get("api_key_env")
        register_secret_env(self.api_key_env)
        # False for servers whose key is optional (local servers): the key is sent when set.
        self.key_required = bool(settings.get("key_required", True))
        self.pool = HTTPPool(self.base_url, maxsize=int(defaults.get("pool_maxsize", 64)),
                             **http_timeouts(settings, defaults))
        self.static_headers = {"Content-Type": "application/json", "Accept": "application/json",
                               **{str(k): str(v) for k, v in (settings.get("headers") or {}).items()}}

    @classmethod
    def validate_settings(cls, name: str, settings: dict[str, Any]) -> None:
        base = settings.get("base_url")
        if not isinstance(base, str) or not base.startswith(("http://", "https://", "${")):
            raise ValueError(f"providers.{name}.base_url: must be an http(s) URL (or ${{VAR}})")
        if "headers" in settings and not isinstance(settings["headers"], dict):
            raise ValueError(f"providers.{name}.headers: must be an object")
        if "responses" in settings and not isinstance(settings["responses"], bool):
            raise ValueError(f"providers.{name}.responses: must be true or false")

    @property
    def speaks_responses(self) -> bool:
        """True when this upstream serves the Responses API natively (`"responses": true`)."""
        return self.settings.get("responses") is True

    def headers(self) -> dict[str, str]:
        headers = dict(self.static_headers)
        key = os.environ.get(self.api_key_env) if self.api_key_env else None
        if key:
            headers["Authorization"] = f"Bearer {key}"
        return headers

    def missing_configuration(self) -> list[str]:
        missing = list(self._missing_url)
        if self.key_required and self.api_key_env and not os.environ.get(self.api_key_env):
            missing.append(self.api_key_env)
        return missing

    def _post(self, payload: dict[str, Any], stream: bool, path: str = "/chat/completions") -> PooledResponse:
        missing = self.missing_configuration()
        if missing:
            raise not_configured(self.name, missing)
        body = json.dumps(payload, separators=(",", ":")).encode()
        headers = self.headers()
        if stream:
            headers["Accept"] = "text/event-stream"
        return post_checked(self.pool, path, body, headers, self.name, upstream_error)

    def _json_answer(self, resp: PooledResponse) -> tuple[bytes, Any]:
        try:
            data = resp.read()
        except OSError as exc:
            raise transport_error(exc, self.name) from None
        try:
            return data, json.loads(data)
        except ValueError:
            raise ProviderUnavailable(f"provider {self.name!r} sent a body that is not JSON") from None

    def _answer(self, payload: dict[str, Any], path: str, field: str) -> tuple[bytes, dict[str, Any]]:
        """POST `payload` to `path`; the answer's bytes and JSON object, which must have `field`."""
        data, body = self._json_answer(self._post(payload, stream=False, path=path))
        if not isinstance(body, dict) or field not in body:
            raise ProviderUnavailable(f"provider {self.name!r} sent no {field}")
        return data, body

    def complete(self, request: dict[str, Any]) -> Completion:
        data, body = self._answer(request, "/chat/completions", "choices")
        usage = body.get("usage") if isinstance(body.get("usage"), dict) else None
        return Completion(body=body, raw=data, usage=usage)

    def embed(self, request: dict[str, Any]) -> Completion:
        """POST {base}/embeddings as it is (token arrays, dimensions, encoding_format, user)."""
        _, body = self._answer(request, "/embeddings", "data")
        usage = body.get("usage")
        return Completion(body=body, usage=usage if isinstance(usage, dict) else None)

    def generate_images(self, request: dict[str, Any]) -> Completion:
        """POST {base}/images/generations as it is. gpt-image models report token usage
        (input_tokens/output_tokens), kept as prompt/completion tokens."""
        _, body = self._answer(request, "/images/generations", "data")
        usage = body.get("usage")
        if isinstance(usage, dict) and isinstance(usage.get("input_tokens"), int):
            usage = {"prompt_tokens": usage["input_tokens"],
                     "completion_tokens": int(usage.get("output_tokens") or 0),
                     "total_tokens": int(usage.get("total_tokens") or 0)}
        return Completion(body=body, usage=usage if isinstance(usage, dict) else None)

    def responses(self, request: dict[str, Any]) -> Completion:
        """A Responses API call (`POST /responses`, not streamed): the `response` object in
        `body`, its usage as chat usage in `usage`."""
        data, body = self._json_answer(self._post({**request, "stream": False}, stream=False, path="/responses"))
        if not isinstance(body, dict) or not isinstance(body.get("output"), list):
            raise ProviderUnavailable(f"provider {self.name!r} sent no response output")
        if body.get("status") == "failed":
            raise ProviderUnavailable(redact(str((body.get("error") or {}).get("message") or "response failed")))
        return Completion(body=body, raw=data, usage=chat_usage(body.get("usage")))

    def responses_stream(self, request: dict[str, Any]) -> HTTPStream:
        """A streamed Responses API call: one StreamPiece per event (`chunk` = the parsed event);
        the terminal event's piece carries the usage. An `error` or `response.failed` event
        raises ProviderUnavailable, like a broken stream."""
        resp = self._post({**request, "stream": True}, stream=True, path="/responses")
        return HTTPStream(resp, self._sse_pieces(resp, self._response_event,
                                                 "ended the stream before response.completed"))

    def _response_event(self, data: bytes) -> tuple[StreamPiece | None, bool]:
        if data == DONE:
            return None, True
        event = self._event_json(data)
        kind = event.get("type") if isinstance(event, dict) else None
        if kind in ("error", "response.failed"):
            error = event.get("error") or (event.get("response") or {}).get("error") or event
            raise ProviderUnavailable(redact(str(error.get("message") or "response failed")))
        piece = StreamPiece(raw=data, chunk=event)
        if kind in RESPONSES_TERMINAL:
            piece.usage = chat_usage((event.get("response") or {}).get("usage"))
            return piece, True
        return piece, False

    def stream(self, request: dict[str, Any]) -> HTTPStream:
        payload = dict(request)
        payload["stream"] = True
        # Always ask for the usage chunk: it is what bills the request. The gateway forwards
        # it only when the client asked for it.
        payload["stream_options"] = {**(request.get("stream_options") or {}), "include_usage": True}
        resp = self._post(payload, stream=True)
        return HTTPStream(resp, self._sse_pieces(resp, self._chunk, "ended the stream without [DONE]"))

    def _chunk(self, data: bytes) -> tuple[StreamPiece | None, bool]:
        if data == DONE:
            return None, True
        return (self._parsed_piece(data) if _needs_parsing(data) else StreamPiece(raw=data)), False

    def _sse_pieces(self, resp: PooledResponse, parse: Callable[[bytes], tuple[StreamPiece | None, bool]],
                    unfinished: str) -> Iterator[StreamPiece]:
        """The pieces of an SSE body, `parse(data)` giving each event's piece (or None) and
        whether it is the last; `flush` is False while more events of the same read follow. A
        body that ends before its last event is ProviderUnavailable(`unfinished`)."""
        finished = False
        try:
            for batch in iter_sse_batches(self._read(resp)):
                last = len(batch) - 1
                for i, data in enumerate(batch):
                    piece, finished = parse(data)
                    if piece is not None:
                        piece.flush = finished or i == last
                        yield piece
                    if finished:
                        return
            raise ProviderUnavailable(f"provider {self.name!r} {unfinished}")
        finally:
            if finished:
                resp.drain()  # past the last event to the end of the body: the connection is reused
            else:
                resp.close()  # aborted or broken mid-body: never reuse this connection

    def _read(self, resp: PooledResponse) -> Iterator[bytes]:
        try:
            yield from resp.iter_chunks()
        except OSError as exc:
            raise transport_error(exc, self.name) from None

    def _event_json(self, data: bytes) -> Any:
        try:
            return json.loads(data)
        except ValueError:
            raise ProviderUnavailable(f"provider {self.name!r} sent an event that is not JSON") from None

    def _parsed_piece(self, data: bytes) -> StreamPiece:
        chunk = self._event_json(data)
        if isinstance(chunk.get("error"), (dict, str)):
            err = chunk["error"]
            message = err.get("message", "stream error") if isinstance(err, dict) else err
            raise ProviderUnavailable(redact(str(message)))
        usage = chunk.get("usage")
        if isinstance(usage, dict):
            return StreamPiece(raw=data, chunk=chunk, usage=usage, usage_only=not chunk.get("choices"))
        return StreamPiece(raw=data)

    def close(self) -> None:
        self.pool.close()
