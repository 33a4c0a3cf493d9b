"""Responses from an upstream that speaks the Responses API natively, passed on to the client.

The upstream is called with `store: false` and the whole conversation as input (the gateway
keeps conversations itself, whichever deployment served each turn), so its answer is adopted:
the response gets the gateway's id, the client's `previous_response_id`, `store` and
`metadata`. Everything else (output items, reasoning, usage, the event sequence and its
sequence numbers) reaches the client as the upstream sent it; only lifecycle events, which
carry the response object, are re-encoded.
"""
from __future__ import annotations

import json
from typing import Any

from app.providers.base import StreamPiece
from app.translate.chat_stream_to_responses import sse

_dumps = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode
CLIENT_ONLY = ("previous_response_id", "store", "stream", "input")


def upstream_request(request: dict[str, Any], items: list[dict[str, Any]], model: str, stream: bool) -> dict[str, Any]:
    """The Responses body for the upstream: the client's settings, the whole conversation as
    `input`, the deployment's model, nothing stored upstream."""
    body = {k: v for k, v in request.items() if k not in CLIENT_ONLY}
    body.update(model=model, input=items, store=False)
    if stream:
        body["stream"] = True
    return body


def history_for_upstream(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Stored conversation items as input for an upstream that never saw them: without the ids
    and statuses it would look up, without reasoning items (they are only valid upstream)."""
    return [{k: v for k, v in item.items() if k not in ("id", "status")}
            for item in items if item.get("type") != "reasoning"]


def adopt(response: dict[str, Any], request: dict[str, Any], response_id: str) -> dict[str, Any]:
    """The upstream's `response` object as the client's (in place)."""
    response["id"] = response_id
    response["previous_response_id"] = request.get("previous_response_id")
    response["store"] = request.get("store", True) is not False
    response["metadata"] = request.get("metadata") or {}
    return response


class ResponsesPassthrough:
    """Same interface as ChatStreamToResponses (start / feed / finish / fail / .response)."""

    def __init__(self, request: dict[str, Any], response_id: str) -> None:
        self.request = request
        self.response_id = response_id
        self.response: dict[str, Any] = adopt({"object": "response", "status": "in_progress", "output": [],
                                               "model": request.get("model")}, request, response_id)
        self.items: dict[int, dict[str, Any]] = {}
        self.seq = -1

    def start(self) -> list[bytes]:
        return []  # the upstream's own response.created / in_progress follow

    def feed(self, piece: StreamPiece) -> list[bytes]:
        event = piece.chunk if piece.chunk is not None else json.loads(piece.data())
        kind = str(event.get("type"))
        if isinstance(event.get("sequence_number"), int):
            self.seq = event["sequence_number"]
        if isinstance(event.get("response"), dict):
            self.response = adopt(event["response"], self.request, self.response_id)
            return [sse(kind, _dumps(event))]
        if kind == "response.output_item.done" and isinstance(event.get("item"), dict):
            self.items[int(event.get("output_index") or 0)] = event["item"]
        return [sse(kind, piece.data().decode())]

    def finish(self) -> list[bytes]:
        return []  # the terminal event came from the upstream

    def abandon(self, status: str = "incomplete") -> None:
        """The response as far as it got: the output items the upstream had finished."""
        if self.response.get("status") in ("completed", "incomplete"):
            return  # the terminal event came through already
        self.response["output"] = [self.items[i] for i in sorted(self.items)]
        self.response["status"] = status

    def fail(self, message: str, code: str = "server_error") -> list[bytes]:
        self.abandon("failed")
        response = self.response
        response["error"] = {"code": code, "message": message}
        self.seq += 1
        error = sse("error", '{"type":"error","sequence_number":%d,"code":%s,"message":%s,"param":null}'
                    % (self.seq, _dumps(code), _dumps(message)))
        self.seq += 1
        failed = sse("response.failed", '{"type":"response.failed","sequence_number":%d,"response":%s}'
                     % (self.seq, _dumps(response)))
        return [error, failed]
