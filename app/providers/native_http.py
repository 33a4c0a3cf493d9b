"""What the native adapters (Anthropic, Gemini, Ollama, GigaChat) share: the pooled HTTP call with
the error taxonomy, a stream driver, OpenAI-shaped chunk/completion/usage builders and helpers
that read OpenAI request fields.

Each adapter translates an OpenAI request into its provider's wire format and the answer back,
so the chat controller sees the same `Completion` / `StreamPiece` objects as for an
OpenAI-compatible upstream. Whatever the upstream sends that cannot be translated (not JSON,
missing fields, wrong types) is a `ProviderUnavailable` (502), never an exception of ours.
"""
from __future__ import annotations

import json
import mimetypes
import os
import time
import uuid
from contextlib import contextmanager
from typing import Any, Callable, ClassVar, Iterable, Iterator

from app.providers.base import (Completion, Provider, ProviderBadRequest, ProviderError, ProviderUnavailable,
                                StreamPiece, expand_env, not_configured, register_secret_env)
from app.providers.http_pool import HTTPPool, PooledResponse, http_timeouts
from app.providers.openai_compatible import HTTPStream, post_checked, transport_error
from app.utils.streaming import iter_sse_batches

# What translating a malformed upstream answer can raise.
MALFORMED = (KeyError, TypeError, AttributeError, ValueError, IndexError)


class StreamTranslator:
    """Turns the events of one upstream stream into OpenAI chunk pieces.

    `feed` takes one event payload; `done` becomes True on the provider's terminal event;
    `close` is called once at the end (terminal event or end of body) and returns the last
    pieces (the usage chunk), or raises when the stream ended before it was complete."""

    done: bool = False

    def feed(self, data: bytes) -> list[StreamPiece]:
        raise NotImplementedError

    def close(self) -> list[StreamPiece]:
        raise NotImplementedError


class NativeHTTPProvider(Provider):
    """Base of the adapters that speak a provider's own HTTP protocol.

    An adapter supplies `_post` (its request, sent with `post`), `from_upstream` (its answer
    -> an OpenAI completion), `stream_batches` (how its stream body splits into events) and
    `stream_translator` (its events -> OpenAI chunks); the calls themselves are the same."""

    default_base_url: ClassVar[str] = ""
    key_required: ClassVar[bool] = True  # False: the key variable is optional (local servers)
    from_upstream: ClassVar[Callable[[Any, str], dict[str, Any]]]
    stream_batches: ClassVar[Callable[[Iterator[bytes]], Iterator[list[bytes]]]]
    stream_translator: ClassVar[Callable[[str], StreamTranslator]]

    def __init__(self, name: str, settings: dict[str, Any], defaults: dict[str, Any]) -> None:
        super().__init__(name, settings, defaults)
        base_url, self._missing_url = expand_env(str(settings.get("base_url") or self.default_base_url))
        self.base_url = base_url.rstrip("/")
        self.api_key_env: str | None = settings.get("api_key_env")
        register_secret_env(self.api_key_env)
        # models.json may say whether the key is needed (a provider with an anonymous tier).
        self.key_required = bool(settings.get("key_required", type(self).key_required))
        self.timeouts = http_timeouts(settings, defaults)
        self.pool = self.new_pool(self.base_url if not self._missing_url else "http://unconfigured.invalid")
        self.static_headers = {"Content-Type": "application/json", "Accept": "application/json",
                               **{str(k): str(v) for k, v in (settings.get("headers") or {}).items()}}
        # Output cap of each upstream model (from models.json), for protocols that require one.
        self.model_caps: dict[str, int] = dict(defaults.get("max_output_tokens") or {})

    def new_pool(self, base_url: str) -> HTTPPool:
        return HTTPPool(base_url, maxsize=int(self.defaults.get("pool_maxsize", 64)),
                        ca_file=self.settings.get("ca_file"), **self.timeouts)

    @classmethod
    def validate_settings(cls, name: str, settings: dict[str, Any]) -> None:
        base = settings.get("base_url", cls.default_base_url)
        if not isinstance(base, str) or not base.startswith(("http://", "https://", "${")):
            raise ValueError(f"providers.{name}.base_url: must be an http(s) URL (or ${{VAR}})")
        if "headers" in settings and not isinstance(settings["headers"], dict):
            raise ValueError(f"providers.{name}.headers: must be an object")
        for key in ("api_key_env", "ca_file"):
            if key in settings and not isinstance(settings[key], str):
                raise ValueError(f"providers.{name}.{key}: must be a string")
        for key in ("timeout_s", "connect_timeout_s"):
            value = settings.get(key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                      or value <= 0):
                raise ValueError(f"providers.{name}.{key}: must be a positive number of seconds")

    # -- configuration -------------------------------------------------------------------

    def api_key(self) -> str | None:
        """Read at every call, so a rotated key in the environment is picked up."""
        return os.environ.get(self.api_key_env) or None if self.api_key_env else None

    def missing_configuration(self) -> list[str]:
        missing = list(self._missing_url)
        if self.key_required and self.api_key_env and not self.api_key():
            missing.append(self.api_key_env)
        return missing

    def require_configured(self) -> None:
        missing = self.missing_configuration()
        if missing:
            raise not_configured(self.name, missing)

    def output_cap(self, request: dict[str, Any], fallback: int = 4096) -> int:
        """max_completion_tokens / max_tokens of the request, else the model's cap."""
        value = request.get("max_completion_tokens") or request.get("max_tokens")
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
        return int(self.model_caps.get(str(request.get("model")), self.settings.get("max_tokens", fallback)))

    # -- HTTP ----------------------------------------------------------------------------

    def upstream_error(self, status: int, body: bytes, headers: Any) -> ProviderError:
        """The provider's error answer mapped onto the taxonomy (message redacted)."""
        raise NotImplementedError

    def post(self, path: str, body: bytes, headers: dict[str, str],
             pool: HTTPPool | None = None) -> PooledResponse:
        """POST; an error status raises the mapped ProviderError; transport failures too."""
        return post_checked(pool or self.pool, path, body, headers, self.name, self.upstream_error)

    def read_json(self, resp: PooledResponse) -> Any:
        try:
            data = resp.read()
        except OSError as exc:
            raise transport_error(exc, self.name) from None
        try:
            return json.loads(data)
        except ValueError:
            raise self.malformed("a body that is not JSON") from None

    def malformed(self, what: str = "an answer it cannot be translated") -> ProviderUnavailable:
        return ProviderUnavailable(f"provider {self.name!r} sent {what}", code="upstream_malformed")

    @contextmanager
    def translating(self) -> Iterator[None]:
        """Any error while reading the upstream's answer is the upstream's malformed answer."""
        try:
            yield
        except ProviderError:
            raise
        except MALFORMED:
            raise self.malformed() from None

    def _post(self, request: dict[str, Any], stream: bool) -> PooledResponse:
        raise NotImplementedError

    def complete(self, request: dict[str, Any]) -> Completion:
        data = self.read_json(self._post(request, stream=False))
        with self.translating():
            body = type(self).from_upstream(data, request["model"])
        return Completion(body=body, usage=body.get("usage"))

    def stream(self, request: dict[str, Any]) -> Iterator[StreamPiece]:
        resp = self._post(request, stream=True)
        cls = type(self)
        return self.stream_from(resp, cls.stream_batches, cls.stream_translator(request["model"]))

    def close(self) -> None:
        self.pool.close()

    def stream_from(self, resp: PooledResponse, batches: Callable[[Iterator[bytes]], Iterator[list[bytes]]],
                    translator: StreamTranslator) -> HTTPStream:
        """Drive `translator` over the upstream body: the pieces of one upstream read are sent
        to the client in one write (flush on the last); the connection is reused only when the
        stream was read to its end."""

        def read() -> Iterator[bytes]:
            try:
                yield from resp.iter_chunks()
            except OSError as exc:
                raise transport_error(exc, self.name) from None

        def pieces() -> Iterator[StreamPiece]:
            complete = False
            try:
                for batch in batches(read()):
                    out: list[StreamPiece] = []
                    with self.translating():
                        for data in batch:
                            out.extend(translator.feed(data))
                            if translator.done:
                                break
                        if translator.done:
                            out.extend(translator.close())
                    yield from _flushed(out)
                    if translator.done:
                        complete = True
                        return
                with self.translating():
                    last = translator.close()
                complete = True
                yield from _flushed(last)
            finally:
                if complete:
                    resp.drain()
                else:
                    resp.close()

        return HTTPStream(resp, pieces())


def _flushed(pieces: list[StreamPiece]) -> Iterator[StreamPiece]:
    for i, piece in enumerate(pieces):
        piece.flush = i == len(pieces) - 1
        yield piece


def sse_batches(chunks: Iterator[bytes]) -> Iterator[list[bytes]]:
    return iter_sse_batches(chunks)


def ndjson_batches(chunks: Iterable[bytes]) -> Iterator[list[bytes]]:
    """The complete lines of each read (NDJSON), as one batch per read."""
    buf = b""
    for chunk in chunks:
        buf += chunk
        lines = buf.split(b"\n")
        buf = lines.pop()
        batch = [line.strip() for line in lines if line.strip()]
        if batch:
            yield batch
    if buf.strip():
        yield [buf.strip()]


# -- OpenAI shapes ---------------------------------------------------------------------------

def openai_usage(prompt: int, completion: int, *, cached: int | None = None,
                 reasoning: int | None = None, total: int | None = None) -> dict[str, Any]:
    usage: dict[str, Any] = {"prompt_tokens": int(prompt), "completion_tokens": int(completion),
                             "total_tokens": int(total if total is not None else prompt + completion)}
    if cached is not None:
        usage["prompt_tokens_details"] = {"cached_tokens": int(cached)}
    if reasoning is not None:
        usage["completion_tokens_details"] = {"reasoning_tokens": int(reasoning)}
    return usage


def new_id(prefix: str = "chatcmpl") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def completion_body(model: str, choices: list[dict[str, Any]], usage: dict[str, Any] | None,
                    cid: str | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"id": cid or new_id(), "object": "chat.completion", "created": int(time.time()),
                            "model": model, "choices": choices}
    if usage is not None:
        body["usage"] = usage
    return body


def choice(message_text: str | None, tool_calls: list[dict[str, Any]], finish: str | None,
           index: int = 0) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": message_text if message_text or not tool_calls
                               else None}
    if tool_calls:
        message["tool_calls"] = tool_calls
    return {"index": index, "message": message, "logprobs": None, "finish_reason": finish}


def tool_call(call_id: str, name: str, arguments: Any) -> dict[str, Any]:
    args = arguments if isinstance(arguments, str) else json.dumps(arguments if arguments is not None else {},
                                                                    ensure_ascii=False)
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": args}}


class ChunkFactory:
    """OpenAI `chat.completion.chunk` pieces of one stream (one id, one created time)."""

    def __init__(self, model: str) -> None:
        self.id = new_id()
        self.created = int(time.time())
        self.model = model

    def piece(self, delta: dict[str, Any], finish: str | None = None, index: int = 0) -> StreamPiece:
        return StreamPiece(chunk={"id": self.id, "object": "chat.completion.chunk", "created": self.created,
                                  "model": self.model, "choices": [{"index": index, "delta": delta,
                                                                    "logprobs": None, "finish_reason": finish}]})

    def usage(self, usage: dict[str, Any]) -> StreamPiece:
        return StreamPiece(chunk={"id": self.id, "object": "chat.completion.chunk", "created": self.created,
                                  "model": self.model, "choices": [], "usage": usage},
                           usage=usage, usage_only=True)


# -- reading OpenAI requests -----------------------------------------------------------------

def text_of(content: Any) -> str:
    """A message's text: the string, or its text parts joined (other parts are skipped)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content
                       if isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str))
    raise ProviderBadRequest("message content must be a string or a list of content parts")


def content_parts(content: Any) -> list[dict[str, Any]]:
    """Content as a list of OpenAI parts (a string becomes one text part)."""
    if content is None:
        return []
    if isinstance(content, str):
        return [{"type": "text", "text": content}] if content else []
    if isinstance(content, list):
        return [p for p in content if isinstance(p, dict)]
    raise ProviderBadRequest("message content must be a string or a list of content parts")


def image_source(part: dict[str, Any]) -> tuple[str, str, str]:
    """An `image_url` part as ("base64", media type, data) for a data: URL, else ("url", guessed
    media type, url)."""
    image = part.get("image_url")
    url = image.get("url") if isinstance(image, dict) else image
    if not isinstance(url, str) or not url:
        raise ProviderBadRequest("an image_url part needs image_url.url")
    if url.startswith("data:"):
        header, _, data = url.partition(",")
        media = header[5:].split(";")[0] or "image/png"
        if ";base64" not in header or not data:
            raise ProviderBadRequest("image data URLs must be base64 (data:<type>;base64,<data>)")
        return "base64", media, data
    media = mimetypes.guess_type(url.split("?")[0])[0] or "image/jpeg"
    return "url", media, url


def tool_call_names(messages: list[dict[str, Any]]) -> dict[str, str]:
    """tool_call_id -> function name, from the assistant messages' tool_calls."""
    names: dict[str, str] = {}
    for msg in messages:
        for call in msg.get("tool_calls") or ():
            if isinstance(call, dict) and isinstance(call.get("function"), dict):
                names[str(call.get("id"))] = str(call["function"].get("name", ""))
    return names


def parse_arguments(arguments: Any) -> dict[str, Any]:
    """OpenAI tool-call arguments (a JSON string) as an object."""
    if isinstance(arguments, dict):
        return arguments
    if arguments in (None, ""):
        return {}
    try:
        value = json.loads(arguments)
    except (TypeError, ValueError):
        raise ProviderBadRequest("tool_calls[].function.arguments must be a JSON object string") from None
    if not isinstance(value, dict):
        raise ProviderBadRequest("tool_calls[].function.arguments must be a JSON object")
    return value


def function_tools(request: dict[str, Any]) -> list[dict[str, Any]]:
    """The `function` objects of the request's tools (other tool types are rejected)."""
    tools = request.get("tools")
    if tools is None:
        return []
    if not isinstance(tools, list):
        raise ProviderBadRequest("tools must be a list")
    out = []
    for tool in tools:
        if not isinstance(tool, dict) or tool.get("type", "function") != "function" \
                or not isinstance(tool.get("function"), dict) or not tool["function"].get("name"):
            raise ProviderBadRequest("only tools of type 'function' with a name are supported by this provider")
        out.append(tool["function"])
    return out


def forced_tool(tool_choice: Any) -> str | None:
    """The function name of `tool_choice: {"type": "function", "function": {"name": ...}}`."""
    if isinstance(tool_choice, dict) and isinstance(tool_choice.get("function"), dict):
        name = tool_choice["function"].get("name")
        if isinstance(name, str) and name:
            return name
    return None


def stop_sequences(request: dict[str, Any]) -> list[str] | None:
    stop = request.get("stop")
    if stop is None:
        return None
    if isinstance(stop, str):
        return [stop]
    if isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        return stop
    raise ProviderBadRequest("stop must be a string or a list of strings")


def single_choice_only(request: dict[str, Any], provider: str) -> None:
    n = request.get("n")
    if isinstance(n, int) and n > 1:
        raise ProviderBadRequest(f"n > 1 is not supported by the {provider} adapter")


def json_or_none(body: bytes) -> Any:
    try:
        return json.loads(body)
    except ValueError:
        return None
