"""The provider interface, its error taxonomy and the registry of provider types.

Providers know nothing of Flask, keys or billing: they take an OpenAI-shaped request dict
and give back an OpenAI-shaped completion (or a stream of chunks).
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from typing import Any, ClassVar, Iterator

# Re-exported: the providers redact upstream text and register their credentials through base.
from app.utils.redaction import redact, register_secret, register_secret_env  # noqa: F401


class ProviderError(Exception):
    """An upstream failure, classified. `kind` decides retry, fallback and the client status."""

    kind: ClassVar[str] = "unavailable"
    retryable: ClassVar[bool] = True
    client_status: ClassVar[int] = 502

    def __init__(self, message: str, *, upstream_status: int | None = None,
                 retry_after: float | None = None, code: str | None = None) -> None:
        message = redact(message)  # upstream text reaches clients and logs: never a secret
        super().__init__(message)
        self.message = message
        self.upstream_status = upstream_status
        self.retry_after = retry_after
        self.code = code


class ProviderAuthError(ProviderError):
    kind = "auth"
    retryable = False
    client_status = 502  # the operator's upstream key is wrong: not the client's fault


class ProviderRateLimited(ProviderError):
    kind = "rate_limited"
    retryable = True
    client_status = 429


class ProviderBadRequest(ProviderError):
    kind = "bad_request"
    retryable = False
    client_status = 400


class ProviderContextTooLong(ProviderBadRequest):
    kind = "context_too_long"


class ProviderNotFound(ProviderBadRequest):
    kind = "not_found"
    client_status = 404


class ProviderUnavailable(ProviderError):
    kind = "unavailable"
    retryable = True
    client_status = 502


class ProviderTimeout(ProviderError):
    kind = "timeout"
    retryable = True
    client_status = 504


class ProviderNotConfigured(ProviderError):
    """The provider's environment variables (key, base URL, account id) are not set: no call was
    made. Not retryable on this deployment; another deployment of the alias may serve."""
    kind = "not_configured"
    retryable = False
    client_status = 503


def error_for_status(status: int, message: str, *, code: str | None = None,
                     retry_after: float | None = None) -> ProviderError:
    """Map an upstream HTTP status (and OpenAI-style error code) onto the taxonomy."""
    if code == "context_length_exceeded" or "context length" in message.lower():
        cls: type[ProviderError] = ProviderContextTooLong
    elif status in (401, 403):
        cls = ProviderAuthError
    elif status == 404:
        cls = ProviderNotFound
    elif status in (408, 504):
        cls = ProviderTimeout
    elif status == 429 or status == 529:
        cls = ProviderRateLimited if status == 429 else ProviderUnavailable
    elif 400 <= status < 500:
        cls = ProviderBadRequest
    else:
        cls = ProviderUnavailable
    return cls(message, upstream_status=status, retry_after=retry_after, code=code)


def parse_retry_after(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None


@dataclass(slots=True)
class StreamPiece:
    """One element of a provider stream.

    `raw` is the JSON text of an OpenAI chunk when it can be forwarded as it is (no re-encoding
    on the hot path); `chunk` is the parsed dict when the provider built or needed it.
    `usage` is set on the piece that carries the final usage. Slots: a stream keeps up to
    FOLD_BYTES of its pieces (app/services/settlement_service.py), and without a `__dict__`
    each costs about 100 bytes less.
    """
    raw: bytes | None = None
    chunk: dict[str, Any] | None = None
    usage: dict[str, Any] | None = None
    usage_only: bool = False  # an include_usage chunk: forwarded only if the client asked
    # False while more events that arrived in the same upstream read follow: the gateway
    # then sends them to the client in one write (one syscall instead of one per event).
    flush: bool = True

    def data(self) -> bytes:
        if self.raw is not None:
            return self.raw
        return json.dumps(self.chunk, separators=(",", ":")).encode()


@dataclass
class Completion:
    """A non-streaming answer: the body to return (raw JSON bytes or a dict) and its usage."""
    body: dict[str, Any] | None = None
    raw: bytes | None = None
    usage: dict[str, Any] | None = None

    def json_bytes(self) -> bytes:
        if self.raw is not None:
            return self.raw
        return json.dumps(self.body, separators=(",", ":")).encode()


class Provider:
    """Base class of every provider type. Subclasses set `type` and implement both calls;
    those that serve embedding or image models say so in `kinds` and implement `embed` /
    `generate_images`."""

    type: ClassVar[str] = ""
    aliases: ClassVar[tuple[str, ...]] = ()
    kinds: ClassVar[frozenset[str]] = frozenset({"chat"})  # model kinds it serves (models.json `kind`)
    token_input: ClassVar[bool] = False  # embeddings `input` may be token arrays (else text only)

    def __init__(self, name: str, settings: dict[str, Any], defaults: dict[str, Any]) -> None:
        self.name = name
        self.settings = settings
        self.defaults = defaults

    @classmethod
    def validate_settings(cls, name: str, settings: dict[str, Any]) -> None:
        """Raise ValueError naming the bad field of this provider's models.json entry."""

    def complete(self, request: dict[str, Any]) -> Completion:
        raise NotImplementedError

    def stream(self, request: dict[str, Any]) -> Iterator[StreamPiece]:
        raise NotImplementedError

    def embed(self, request: dict[str, Any]) -> Completion:
        """An OpenAI embeddings request (`input` already a list of strings or of token lists)
        -> a Completion whose body is OpenAI's embeddings list (vectors as float lists or
        base64 strings) and whose usage is {"prompt_tokens", "total_tokens"} when the
        provider reported it, else None."""
        raise ProviderBadRequest(f"provider type {self.type!r} does not serve embeddings")

    def generate_images(self, request: dict[str, Any]) -> Completion:
        """An OpenAI images/generations request -> a Completion whose body is OpenAI's images
        answer ({"created", "data": [{"url"} or {"b64_json"}]}); usage as for chat when the
        provider reports tokens, else None."""
        raise ProviderBadRequest(f"provider type {self.type!r} does not generate images")

    def close(self) -> None:
        """Release pooled connections."""

    def missing_configuration(self) -> list[str]:
        """Names of the environment variables this provider needs and that are unset."""
        return []


_REGISTRY: dict[str, type[Provider]] = {}


def register(cls: type[Provider]) -> type[Provider]:
    """Class decorator: make a provider type available to models.json by its `type` name."""
    for name in (cls.type, *cls.aliases):
        _REGISTRY[name] = cls
    return cls


def provider_class(type_name: str) -> type[Provider] | None:
    return _REGISTRY.get(type_name)


def registered_types() -> list[str]:
    return sorted(_REGISTRY)


_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def expand_env(template: str) -> tuple[str, list[str]]:
    """`${VAR}` references of a models.json value replaced from the environment: (the value,
    the names of referenced variables that are unset or empty)."""
    missing: list[str] = []

    def sub(match: re.Match) -> str:
        value = os.environ.get(match.group(1), "")
        if _looks_secret(match.group(1)):
            register_secret_env(match.group(1))
        if not value:
            missing.append(match.group(1))
        return value

    return _ENV_REF.sub(sub, template), missing


def embeddings_body(model: str, vectors: list[Any], prompt_tokens: int | None) -> Completion:
    """OpenAI's embeddings answer for `vectors` (in input order), with usage when known."""
    body: dict[str, Any] = {"object": "list", "model": model,
                            "data": [{"object": "embedding", "index": i, "embedding": v}
                                     for i, v in enumerate(vectors)]}
    usage = None
    if prompt_tokens is not None:
        usage = body["usage"] = {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens}
    return Completion(body=body, usage=usage)


def image_size(size: Any) -> tuple[int, int]:
    """(width, height) of an OpenAI `size` ("1024x1536"); 1024x1024 for none or "auto"."""
    if size in (None, "auto"):
        return 1024, 1024
    try:
        width, height = (int(v) for v in str(size).lower().split("x"))
    except ValueError:
        raise ProviderBadRequest(f"size must be WIDTHxHEIGHT such as 1024x1024, got {size!r}") from None
    if width <= 0 or height <= 0:
        raise ProviderBadRequest(f"size must be WIDTHxHEIGHT such as 1024x1024, got {size!r}")
    return width, height


def not_configured(name: str, missing: list[str]) -> ProviderNotConfigured:
    names = ", ".join(missing)
    return ProviderNotConfigured(f"provider {name!r} is not configured: set {names} in the gateway's "
                                 "environment (or .env)", code="provider_not_configured")


def _looks_secret(env_name: str) -> bool:
    """A `${VAR}` of models.json whose name says it holds a credential (base URLs may carry one)."""
    upper = env_name.upper()
    return any(word in upper for word in ("KEY", "TOKEN", "SECRET", "PASSWORD", "CREDENTIAL"))

