"""POST /api/chat: a message in, the reply out; a thin convenience over the completion run
for scripts and simple web pages (docs/api-chat.md). Same keys, limits, billing and errors
as /v1/chat/completions; the usage row says endpoint "api.chat"."""
from __future__ import annotations

import json
from decimal import Decimal
from typing import Any, Iterator

from flask import Response, request

from app.api.auth import authenticate
from app.api.cache_controller import cache_ask
from app.api.common import json_response, new_request_id, read_json_object
from app.api.schemas import API_CHAT_SCHEMA
from app.errors import from_provider_error
from app.providers.base import ProviderError
from app.runtime import runtime
from app.services import conversation_service
from app.services.completion import CompletionRun, Pieces
from app.services.settlement_service import usage_figures
from app.utils.money import format_money
from app.utils.streaming import KEEPALIVE_EVENT, sse_event


def api_chat() -> Response:
    rt = runtime()
    key = authenticate()
    body = API_CHAT_SCHEMA.load(read_json_object())
    conversation = body.get("conversation")
    history = conversation_service.history(rt.engine, key.tenant_id, conversation) if conversation else []
    user = {"role": "user", "content": body["message"]}
    system = [{"role": "system", "content": body["system"]}] if body.get("system") else []
    canonical: dict[str, Any] = {"model": body.get("model") or rt.settings.API_CHAT_DEFAULT_MODEL or "auto",
                                 "messages": system + history + [user], "stream": bool(body.get("stream"))}
    for name in ("max_tokens", "temperature"):
        if name in body:
            canonical[name] = body[name]
    run = CompletionRun.begin(rt, key, canonical, "api.chat", request_id=new_request_id(),
                              body_bytes=request.content_length, cache=cache_ask())

    def remember(reply: str) -> str:
        exchange = [user, {"role": "assistant", "content": reply}]
        return conversation_service.append(rt.engine, key.tenant_id, key.id, conversation, exchange)

    with run:
        if canonical["stream"]:
            return run.respond(Response(_events(run, run.stream(), remember), mimetype="text/event-stream"))
        result = run.complete()
        answer = result.body if result.body is not None else json.loads(result.raw or b"{}")
        reply = _message_text(answer)
        return run.respond(json_response({"reply": reply, "conversation": remember(reply), **_figures(run)}))


def _figures(run: CompletionRun) -> dict[str, Any]:
    """The model that answered, the usage billed and its cost (as the usage row has them). A
    response cache hit: the answer's usage as it was made, and a cost of 0 (nothing is billed)."""
    trace = run.trace
    if trace.cache == "hit" and trace.body is not None and isinstance(trace.body.get("usage"), dict):
        usage = trace.body["usage"]
        return {"model": trace.entry.alias,
                "usage": {name: usage.get(name) for name in ("prompt_tokens", "completion_tokens", "total_tokens")},
                "cost_usd": format_money(Decimal(0))}
    prompt, completion, _estimated = usage_figures(trace)
    return {"model": trace.entry.alias,
            "usage": {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion},
            "cost_usd": format_money(trace.entry.pricing.cost(prompt, completion))}


def _message_text(answer: dict[str, Any]) -> str:
    choices = answer.get("choices") or [{}]
    return (choices[0].get("message") or {}).get("content") or ""


def _delta_text(chunk: dict[str, Any]) -> str:
    choices = chunk.get("choices") or [{}]
    return (choices[0].get("delta") or {}).get("content") or ""


def _events(run: CompletionRun, pieces: Pieces, remember: Any) -> Iterator[bytes]:
    """`data: {"delta": "..."}` per piece of text, then one `data: {"done": true, ...}` event
    with the reply, conversation, model, usage and cost (or `data: {"error": ...}`)."""
    parts: list[str] = []
    try:
        for piece in pieces:
            if piece is None:
                yield KEEPALIVE_EVENT
                continue
            text = _delta_text(piece.chunk if piece.chunk is not None else json.loads(piece.data()))
            if text:
                parts.append(text)
                yield sse_event(json.dumps({"delta": text}).encode())
    except ProviderError as exc:
        yield sse_event(json.dumps(from_provider_error(exc).body()).encode())
        return
    reply = "".join(parts)
    final = {"done": True, "reply": reply, "conversation": remember(reply), **_figures(run)}
    yield sse_event(json.dumps(final).encode())
