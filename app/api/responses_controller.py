"""The OpenAI Responses API: `POST /v1/responses` (streamed or not) over the completion run, and
the stored responses (`GET`/`DELETE /v1/responses/<id>`, `GET /v1/responses/<id>/input_items`).

Each request is translated to the canonical chat request (app/translate/responses_to_chat.py)
and runs through the one completion run (admission, routing, retries, fallbacks, settlement
with endpoint "responses"). A deployment whose provider declares `"responses": true` is called
with the Responses body itself; every other one with the chat request, its answer translated
back (app/translate/chat_to_responses.py, chat_stream_to_responses.py). With `store` (the
default) the response and its input are saved after the client has them.
"""
from __future__ import annotations

import json
import logging
import time
from typing import Any, Callable, Iterator

from flask import Response, request

from app.api.auth import authenticate
from app.api.common import json_response, new_request_id, read_json_object
from app.api.responses_schema import RESPONSES_SCHEMA
from app.errors import InvalidRequest, NotFound
from app.providers.base import Completion, ProviderError
from app.providers.openai_compatible import OpenAICompatibleProvider
from app.runtime import runtime
from app.services.completion import CompletionRun
from app.services.response_store import ResponseStore, conversation, input_item_list, new_response_id
from app.translate.chat_stream_to_responses import ChatStreamToResponses
from app.translate.chat_to_responses import response_from_chat
from app.translate.responses_passthrough import (ResponsesPassthrough, adopt, history_for_upstream,
                                                 upstream_request)
from app.translate.responses_to_chat import normalise_input, to_chat
from app.utils.streaming import KEEPALIVE_EVENT, FinalChunk

log = logging.getLogger("gateway.responses")


class ResponseCall:
    """What one `POST /v1/responses` needs once validated: the client's body, the conversation
    (stored history, then this input), the canonical chat request, the new response's id."""

    def __init__(self, body: dict[str, Any], history: list[dict[str, Any]], items: list[dict[str, Any]]) -> None:
        self.body = body
        self.history = history
        self.items = items
        self.chat = to_chat(body, history + items)
        self.stored = body.get("store", True) is not False
        self.stream = bool(body.get("stream"))
        self.response_id = new_response_id(self.stored)
        self.created_at = int(time.time())
        self.native = False  # set per attempt: did the answering deployment speak Responses?

    def invoke(self, provider: Any, deployment: Any) -> Any:
        """The call on one deployment (the completion run's `invoke` hook)."""
        self.native = isinstance(provider, OpenAICompatibleProvider) and provider.speaks_responses
        if self.native:
            items = history_for_upstream(self.history) + self.items
            upstream = upstream_request(self.body, items, deployment.model, self.stream)
            return provider.responses_stream(upstream) if self.stream else provider.responses(upstream)
        chat = {**self.chat, "model": deployment.model}
        return provider.stream(chat) if self.stream else provider.complete(chat)

    def response_body(self, result: Completion) -> dict[str, Any]:
        if self.native:
            return adopt(dict(result.body or {}), self.body, self.response_id)
        chat = result.body if result.body is not None else json.loads(result.json_bytes())
        return response_from_chat(chat, self.body, self.response_id, self.created_at)

    def saver(self, rt: Any, key: Any) -> Callable[[dict[str, Any]], None]:
        """Save the final response (after the client has it); never raises."""
        def save(response: dict[str, Any]) -> None:
            if not self.stored:
                return
            try:
                ResponseStore(rt.engine).save(response, tenant_id=key.tenant_id, api_key_id=key.id,
                                              history=self.history, input_items=input_item_list(self.items))
            except Exception:
                log.exception("response %s could not be stored", self.response_id)
        return save


def create_response() -> Response:
    rt = runtime()
    key = authenticate()
    body = read_json_object()
    RESPONSES_SCHEMA.load(body)
    history: list[dict[str, Any]] = []
    previous = body.get("previous_response_id")
    if previous:
        row = ResponseStore(rt.engine).get(previous, key.tenant_id)
        if row is None:
            raise InvalidRequest(f"Previous response with id '{previous}' not found.",
                                 param="previous_response_id", code="previous_response_not_found")
        history = conversation(row)
    items = normalise_input(body["input"]) if body.get("input") is not None else []
    call = ResponseCall(body, history, items)
    save = call.saver(rt, key)
    with CompletionRun.begin(rt, key, call.chat, endpoint="responses", request_id=new_request_id(),
                             body_bytes=request.content_length) as run:
        if call.stream:
            return _stream(run, call, save)
        result = run.complete(invoke=call.invoke)
        response = call.response_body(result)
        resp = run.respond(json_response(response))
        resp.call_on_close(lambda: save(response))
        return resp


def _stream(run: CompletionRun, call: ResponseCall, save: Callable[[dict[str, Any]], None]) -> Response:
    pieces = run.stream(invoke=call.invoke)
    encoder: Any = (ResponsesPassthrough(call.body, call.response_id) if call.native else
                    ChatStreamToResponses(call.body, call.response_id, call.created_at, call.body["model"]))

    def events() -> Iterator[bytes]:
        pending: list[bytes] = list(encoder.start())
        finished = False
        try:
            for piece in pieces:
                if piece is None:
                    pending.append(KEEPALIVE_EVENT)
                else:
                    pending.extend(encoder.feed(piece))
                if pending and (piece is None or piece.flush):
                    yield b"".join(pending)
                    pending.clear()
            pending.extend(encoder.finish())
            finished = True
            yield FinalChunk(b"".join(pending))
        except ProviderError as exc:
            pending.extend(encoder.fail(exc.message))
            finished = True
            yield FinalChunk(b"".join(pending))
        finally:
            if not finished:  # the client left: keep what it saw, marked incomplete
                encoder.abandon()
            save(encoder.response)  # after the last bytes went out

    return run.respond(Response(events(), mimetype="text/event-stream"))


def _owned(response_id: str) -> Any:
    key = authenticate()
    row = ResponseStore(runtime().engine).get(response_id, key.tenant_id)
    if row is None:
        raise NotFound(f"Response with id '{response_id}' not found.", param="response_id")
    return row


def get_response(response_id: str) -> Response:
    return json_response(_owned(response_id).body)


def delete_response(response_id: str) -> Response:
    key = authenticate()
    if not ResponseStore(runtime().engine).delete(response_id, key.tenant_id):
        raise NotFound(f"Response with id '{response_id}' not found.", param="response_id")
    return json_response({"id": response_id, "object": "response.deleted", "deleted": True})


def list_input_items(response_id: str) -> Response:
    """OpenAI's list object: `order` desc (default) or asc, `limit` 1..100 (20), `after` an item id."""
    row = _owned(response_id)
    args = request.args
    order = args.get("order", "desc")
    if order not in ("asc", "desc"):
        raise InvalidRequest("'order' must be 'asc' or 'desc'.", param="order", code="invalid_value")
    try:
        limit = int(args.get("limit", 20))
    except ValueError:
        limit = 0
    if not 1 <= limit <= 100:
        raise InvalidRequest("'limit' must be an integer from 1 to 100.", param="limit", code="invalid_value")
    items = list(row.input_items)
    if order == "desc":
        items.reverse()
    after = args.get("after")
    if after:
        ids = [item.get("id") for item in items]
        if after not in ids:
            raise InvalidRequest(f"No input item with id '{after}' in this response.", param="after",
                                 code="invalid_value")
        items = items[ids.index(after) + 1:]
    page = items[:limit]
    return json_response({"object": "list", "data": page,
                          "first_id": page[0]["id"] if page else None,
                          "last_id": page[-1]["id"] if page else None,
                          "has_more": len(items) > limit})
