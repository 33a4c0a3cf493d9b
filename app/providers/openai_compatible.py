"""OpenAI-compatible upstreams (OpenAI, Groq, OpenRouter, DeepSeek, vLLM, ...).

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
from app.utils.streaming import DONE, iter_sse_batches


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

    def _answer(self, payload: dict[str, Any], path: str, field: str) -> tuple[bytes, dict[str, Any]]:
        """POST `payload` to `path`; the answer's bytes and JSON object, which must have `field`."""
        resp = self._post(payload, stream=False, path=path)
        try:
            data = resp.read()
        except OSError as exc:
            raise transport_error(exc, self.name) from None
        try:
            body = json.loads(data)
        except ValueError:
            raise ProviderUnavailable(f"provider {self.name!r} sent a body that is not JSON") from None
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

    def stream(self, request: dict[str, Any]) -> HTTPStream:
        payload = dict(request)
        payload["stream"] = True
        # Always ask for the usage chunk: it is what bills the request. The gateway forwards
        # it only when the client asked for it.
        payload["stream_options"] = {**(request.get("stream_options") or {}), "include_usage": True}
        resp = self._post(payload, stream=True)
        return HTTPStream(resp, self._pieces(resp))

    def _pieces(self, resp: PooledResponse) -> Iterator[StreamPiece]:
        finished = False
        try:
            for batch in iter_sse_batches(self._read(resp)):
                last = len(batch) - 1
                for i, data in enumerate(batch):
                    if data == DONE:
                        finished = True
                        return
                    piece = self._parsed_piece(data) if _needs_parsing(data) else StreamPiece(raw=data)
                    piece.flush = i == last
                    yield piece
            raise ProviderUnavailable(f"provider {self.name!r} ended the stream without [DONE]")
        finally:
            if finished:
                resp.drain()  # past [DONE] to the end of the body: the connection is reused
            else:
                resp.close()  # aborted or broken mid-body: never reuse this connection

    def _read(self, resp: PooledResponse) -> Iterator[bytes]:
        try:
            yield from resp.iter_chunks()
        except OSError as exc:
            raise transport_error(exc, self.name) from None

    def _parsed_piece(self, data: bytes) -> StreamPiece:
        try:
            chunk = json.loads(data)
        except ValueError:
            raise ProviderUnavailable(f"provider {self.name!r} sent an event that is not JSON") from None
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
