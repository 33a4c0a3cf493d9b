"""POST /v1/chat/completions: authenticate, validate, run the completion
(app/services/completion.py: admission, routing, the provider call, settlement) and encode its
answer as OpenAI's chat.completion object or its server-sent events."""
from __future__ import annotations

import json
from typing import Iterator

from flask import Response, request

from app.api.auth import authenticate
from app.api.cache_controller import cache_ask
from app.api.common import JSON, new_request_id, read_json_object
from app.api.schemas import validate_chat
from app.errors import from_provider_error
from app.providers.base import ProviderError
from app.runtime import runtime
from app.services.completion import CompletionRun, Pieces
from app.utils.streaming import DONE_EVENT, KEEPALIVE_EVENT, FinalChunk, sse_event


def chat_completions() -> Response:
    rt = runtime()
    key = authenticate()
    body = read_json_object()
    validate_chat(body)  # unknown fields stay in `body` and pass through
    run = CompletionRun.begin(rt, key, body, "chat.completions", request_id=new_request_id(),
                              body_bytes=request.content_length, cache=cache_ask())
    with run:
        if run.trace.streamed:
            wants_usage = bool((body.get("stream_options") or {}).get("include_usage"))
            return run.respond(Response(_events(run.stream(), wants_usage), mimetype="text/event-stream"))
        return run.respond(Response(run.complete().json_bytes(), mimetype=JSON))


def _events(pieces: Pieces, wants_usage: bool) -> Iterator[bytes]:
    """The pieces as SSE events; the events of one upstream read go out in one write. An
    upstream failure after the first byte ends the stream with an error event."""
    pending: list[bytes] = []
    try:
        for piece in pieces:
            if piece is None:
                pending.append(KEEPALIVE_EVENT)
            elif not (piece.usage_only and not wants_usage):
                pending.append(sse_event(piece.data()))
            if pending and (piece is None or piece.flush):
                yield b"".join(pending)
                pending.clear()
    except ProviderError as exc:
        pending.append(sse_event(json.dumps(from_provider_error(exc).body()).encode()))
    pending.append(DONE_EVENT)
    yield FinalChunk(b"".join(pending))
