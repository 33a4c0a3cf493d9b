"""POST /v1/messages and /v1/messages/count_tokens: the Anthropic Messages API.

Authenticate (`x-api-key` or `Authorization: Bearer`), validate the Messages body, translate it to
the canonical chat request (app/translate/anthropic_to_chat.py) and run the completion
(app/services/completion.py: admission, routing, the provider call, settlement; the usage row
says endpoint "messages"). A deployment on an `anthropic` provider is called natively with the
client's own body, so cache_control, thinking and their token counts survive; any other
provider gets the chat request, and its answer or chunks are translated back
(app/translate/chat_to_anthropic.py). Errors leave in Anthropic's envelope: the blueprint of
these routes encodes the gateway's one error hierarchy with `anthropic_envelope`.
"""
from __future__ import annotations

import json
import logging
from typing import Any, Iterator

from flask import Response, request

from app.api.auth import authenticate, bearer_token
from app.api.common import JSON, json_response, new_request_id, read_json_object
from app.api.schemas import COUNT_TOKENS_SCHEMA, MESSAGES_SCHEMA
from app.errors import AuthenticationFailed, ModelNotFound, PermissionDenied, anthropic_envelope, from_provider_error
from app.providers.base import Completion, Provider, ProviderBadRequest, ProviderError
from app.providers.catalog import Deployment
from app.runtime import runtime
from app.services.completion import CompletionRun, Pieces
from app.translate.anthropic_to_chat import AnthropicOnly, chat_messages, chat_tools, to_chat_request
from app.translate.chat_to_anthropic import PING, MessageStreamEncoder, error_event, to_message
from app.utils.streaming import FinalChunk
from app.utils.token_counter import count_prompt, count_text

ENDPOINT = "messages"
log = logging.getLogger("gateway.messages")


def api_key() -> Any:
    """The calling key, from `x-api-key` (Anthropic's header) or `Authorization: Bearer`."""
    token = request.headers.get("x-api-key", "").strip() or bearer_token()
    if not token:
        raise AuthenticationFailed("Missing API key. Send it as 'x-api-key: sk-...' "
                                   "(or 'Authorization: Bearer sk-...').")
    return authenticate(token)


def is_native(provider: Provider) -> bool:
    """Providers that speak the Messages API themselves are passed the client's body."""
    return callable(getattr(provider, "messages", None)) and callable(getattr(provider, "messages_stream", None))


def messages() -> Response:
    rt = runtime()
    key = api_key()
    body = read_json_object()
    MESSAGES_SCHEMA.load(body)  # validates; fields not modelled stay in `body` for the native call
    anthropic_only: list[AnthropicOnly] = []  # documents, server tools: for Anthropic deployments only
    canonical = to_chat_request(body, anthropic_only)
    if anthropic_only and not _may_be_native(rt, body["model"]):
        raise anthropic_only[0]
    run = CompletionRun.begin(rt, key, canonical, ENDPOINT, request_id=new_request_id(),
                              body_bytes=request.content_length)
    beta = request.headers.get("anthropic-beta")
    native = {"last": False}  # whether the attempt that answered was a native one

    def call(provider: Provider, deployment: Deployment, stream: bool) -> Any:
        native["last"] = is_native(provider)
        if native["last"]:
            send = provider.messages_stream if stream else provider.messages
            return send(body, deployment.model, beta)
        if anthropic_only:  # a deployment of another kind in an alias that also has Anthropic ones
            raise ProviderBadRequest(anthropic_only[0].message)
        request_body = {**canonical, "model": deployment.model,
                        # Anthropic clients ask for large caps (Claude Code: 32000): at most the model's.
                        "max_tokens": min(canonical["max_tokens"], run.trace.entry.max_output_tokens)}
        return provider.stream(request_body) if stream else provider.complete(request_body)

    with run:
        if run.trace.streamed:
            pieces = run.stream(invoke=lambda p, d: call(p, d, True))
            events = _native_events(pieces) if native["last"] else _translated_events(run, pieces)
            return run.respond(Response(events, mimetype="text/event-stream"))
        result: Completion = run.complete(invoke=lambda p, d: call(p, d, False))
        if native["last"]:
            answer = result.json_bytes()
        else:
            chat = result.body if result.body is not None else json.loads(result.json_bytes())
            answer = json.dumps(to_message(chat, result.usage), separators=(",", ":")).encode()
        return run.respond(Response(answer, mimetype=JSON))


def _may_be_native(rt: Any, alias: str) -> bool:
    """Whether a deployment of `alias` may pass the request natively (a category alias: maybe)."""
    entry = rt.providers.catalog.get(alias)
    return entry is None or any(is_native(rt.providers.provider(d.provider)) for d in entry.deployments)


def _error_body(exc: ProviderError) -> dict[str, Any]:
    """An upstream failure after the first byte, as the body of Anthropic's `error` event."""
    return anthropic_envelope(from_provider_error(exc))[1]


def _native_events(pieces: Pieces) -> Iterator[bytes]:
    """Anthropic's own events passed on as they came (keep-alive ticks become `ping`); the
    events of one upstream read go out in one write."""
    pending: list[bytes] = []
    try:
        for piece in pieces:
            if piece is None:
                pending.append(PING)
            else:
                pending.append(b"event: " + piece.chunk["type"].encode() + b"\ndata: " + piece.data() + b"\n\n")
            if piece is None or piece.flush:
                yield b"".join(pending)
                pending.clear()
    except ProviderError as exc:
        pending.append(error_event(_error_body(exc)))
    yield FinalChunk(b"".join(pending))


def _translated_events(run: CompletionRun, pieces: Pieces) -> Iterator[bytes]:
    """OpenAI chunks as Anthropic's events. `message_start` carries the prompt as we counted it
    (the upstream's own figure arrives with its last chunk and goes into `message_delta`)."""
    trace = run.trace
    if trace.prompt_estimate is None:
        trace.prompt_estimate = count_prompt(trace.request, trace.entry.tokenizer)
    tokenizer = trace.entry.tokenizer
    encoder = MessageStreamEncoder(trace.request["model"], trace.prompt_estimate,
                                   count_output=lambda text: count_text(text, tokenizer))
    pending: list[bytes] = []
    try:
        for piece in pieces:
            if piece is None:
                pending.append(PING if encoder.started else encoder.start())
            else:
                pending.append(encoder.feed(piece.chunk) if piece.chunk is not None else encoder.feed_raw(piece.data()))
            if piece is None or piece.flush:
                yield b"".join(pending)
                pending.clear()
        pending.append(encoder.close())
    except ProviderError as exc:
        pending.append(encoder.fail(_error_body(exc)))
    yield FinalChunk(b"".join(pending))


def count_tokens() -> Response:
    """`{"input_tokens": N}`: Anthropic's own count for a model served by Anthropic, else the
    prompt (system, messages, tools) counted with the model's tokenizer, as the gateway counts it
    for admission. Nothing is billed."""
    rt = runtime()
    key = api_key()
    new_request_id()
    body = read_json_object()
    COUNT_TOKENS_SCHEMA.load(body)
    alias = body["model"]
    entry = rt.providers.catalog.get(alias)
    if entry is None:
        raise ModelNotFound(f"The model '{alias}' does not exist on this gateway. "
                            "GET /v1/models lists the available models.", param="model")
    if not key.may_use(alias):
        raise PermissionDenied(f"This API key may not use the model '{alias}'.", param="model",
                               code="model_not_allowed")
    counted = _upstream_count(rt, entry, body)
    if counted is None:
        chat = {"messages": chat_messages(body), "tools": chat_tools(body["tools"]) if body.get("tools") else None}
        counted = count_prompt(chat, entry.tokenizer)
    return json_response({"input_tokens": counted})


def _upstream_count(rt: Any, entry: Any, body: dict[str, Any]) -> int | None:
    """Anthropic's own count when the model's first configured deployment is an Anthropic one
    (its tokenizer is not ours); None otherwise or when that call fails (we count then)."""
    for deployment in entry.deployments:
        provider = rt.providers.provider(deployment.provider)
        if provider.missing_configuration():
            continue
        if not callable(getattr(provider, "count_tokens", None)):
            return None
        try:
            return provider.count_tokens(body, deployment.model, request.headers.get("anthropic-beta"))
        except ProviderError as exc:
            log.warning("count_tokens of %s failed (%s): counted by the gateway", deployment.provider, exc.kind)
            return None
    return None
