"""OpenAI-compatible upstreams (OpenAI, Groq, OpenRouter, DeepSeek, vLLM, ...) over urllib3.

urllib3 rather than httpx or requests: under gevent it has the lowest per-request overhead
and its pool does not collapse under concurrency (measured in TRAPS.md).
"""
from __future__ import annotations

import json
import os
from typing import Any, Iterator

import urllib3
from urllib3.exceptions import (ConnectTimeoutError, HTTPError, NewConnectionError, ProtocolError,
                                ReadTimeoutError)

from app.providers.base import (Completion, Provider, ProviderError, ProviderTimeout,
                                ProviderUnavailable, StreamPiece, error_for_status,
                                parse_retry_after, redact, register)
from app.utils.streaming import DONE, iter_sse_data


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


def transport_error(exc: Exception, name: str) -> ProviderError:
    # NewConnectionError subclasses ConnectTimeoutError in urllib3 2: test it first.
    if isinstance(exc, NewConnectionError):
        return ProviderUnavailable(f"provider {name!r} refused the connection")
    if isinstance(exc, (ReadTimeoutError, ConnectTimeoutError)):
        return ProviderTimeout(f"provider {name!r} timed out")
    if isinstance(exc, ProtocolError):
        return ProviderUnavailable(f"provider {name!r} closed the connection")
    return ProviderUnavailable(f"provider {name!r} failed: {type(exc).__name__}")


class HTTPStream:
    """An upstream stream that can be aborted from another greenlet (closing the socket)."""

    def __init__(self, response: urllib3.BaseHTTPResponse, pieces: Iterator[StreamPiece]) -> None:
        self._response = response
        self._pieces = pieces

    def __iter__(self) -> "HTTPStream":
        return self

    def __next__(self) -> StreamPiece:
        return next(self._pieces)

    def abort(self) -> None:
        try:
            self._response.shutdown()  # unblocks a read in progress
        except Exception:
            pass
        self._response.release_conn()


@register
class OpenAICompatibleProvider(Provider):
    type = "openai"
    aliases = ("openai_compatible",)

    def __init__(self, name: str, settings: dict[str, Any], defaults: dict[str, Any]) -> None:
        super().__init__(name, settings, defaults)
        self.base_url = str(settings["base_url"]).rstrip("/")
        self.api_key_env = settings.get("api_key_env")
        self.timeout = urllib3.Timeout(
            connect=float(settings.get("connect_timeout_s", defaults.get("connect_timeout_s", 10))),
            read=float(settings.get("timeout_s", defaults.get("read_timeout_s", 600))))
        self.pool = urllib3.PoolManager(num_pools=4, maxsize=int(defaults.get("pool_maxsize", 64)),
                                        block=False, retries=False)
        self.static_headers = {"Content-Type": "application/json", "Accept": "application/json",
                               **{str(k): str(v) for k, v in (settings.get("headers") or {}).items()}}

    @classmethod
    def validate_settings(cls, name: str, settings: dict[str, Any]) -> None:
        base = settings.get("base_url")
        if not isinstance(base, str) or not base.startswith(("http://", "https://")):
            raise ValueError(f"providers.{name}.base_url: must be an http(s) URL")
        if "headers" in settings and not isinstance(settings["headers"], dict):
            raise ValueError(f"providers.{name}.headers: must be an object")

    def headers(self) -> dict[str, str]:
        headers = dict(self.static_headers)
        key = os.environ.get(self.api_key_env) if self.api_key_env else None
        if key:
            headers["Authorization"] = f"Bearer {key}"
        return headers

    def _post(self, payload: dict[str, Any], stream: bool) -> urllib3.BaseHTTPResponse:
        body = json.dumps(payload, separators=(",", ":")).encode()
        headers = self.headers()
        if stream:
            headers["Accept"] = "text/event-stream"
        try:
            resp = self.pool.request("POST", self.base_url + "/chat/completions", body=body,
                                     headers=headers, timeout=self.timeout,
                                     preload_content=not stream, redirect=False)
        except HTTPError as exc:
            raise transport_error(exc, self.name) from None
        if resp.status >= 400:
            try:
                data = resp.data if not stream else resp.read()
            except HTTPError:
                data = b""
            finally:
                resp.release_conn()
            raise upstream_error(resp.status, data, resp.headers)
        return resp

    def complete(self, request: dict[str, Any]) -> Completion:
        resp = self._post(request, stream=False)
        data = resp.data
        try:
            body = json.loads(data)
        except ValueError:
            raise ProviderUnavailable(f"provider {self.name!r} sent a body that is not JSON") from None
        if not isinstance(body, dict) or "choices" not in body:
            raise ProviderUnavailable(f"provider {self.name!r} sent no choices")
        usage = body.get("usage") if isinstance(body.get("usage"), dict) else None
        return Completion(body=body, raw=data, usage=usage)

    def stream(self, request: dict[str, Any]) -> HTTPStream:
        payload = dict(request)
        payload["stream"] = True
        # Always ask for the usage chunk: it is what bills the request. The gateway forwards
        # it only when the client asked for it.
        payload["stream_options"] = {**(request.get("stream_options") or {}), "include_usage": True}
        resp = self._post(payload, stream=True)
        return HTTPStream(resp, self._pieces(resp))

    def _pieces(self, resp: urllib3.BaseHTTPResponse) -> Iterator[StreamPiece]:
        finished = False
        try:
            for data in iter_sse_data(self._read(resp)):
                if data == DONE:
                    finished = True
                    return
                if b'"usage"' in data or b'"error"' in data:
                    yield self._parsed_piece(data)
                else:
                    yield StreamPiece(raw=data)
            raise ProviderUnavailable(f"provider {self.name!r} ended the stream without [DONE]")
        finally:
            if finished:
                # Read the body to its end (the terminating chunk) before the connection goes
                # back to the pool, or its next request reads this one's leftovers.
                try:
                    resp.drain_conn()
                    resp.release_conn()
                except Exception:
                    resp.close()
            else:
                resp.close()  # aborted or broken mid-body: never reuse this connection

    def _read(self, resp: urllib3.BaseHTTPResponse) -> Iterator[bytes]:
        try:
            while True:
                chunk = resp.read1(65536)
                if not chunk:
                    return
                yield chunk
        except (HTTPError, OSError) as exc:
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
        self.pool.clear()
