"""A cached chat answer's two forms: the final `chat.completion` object stored in the response
cache (app/services/response_cache.py), assembled from a stream's chunks as they pass when the
answer was streamed, and the chunks a hit is replayed as when the client streams."""
from __future__ import annotations

import json
import uuid
from typing import Any, Iterator, Optional

from app.providers.base import StreamPiece
from app.services.response_cache import Entry


def complete_answer(body: Any) -> bool:
    """A chat.completion worth storing: choices, each one finished (never a cut answer)."""
    if not isinstance(body, dict):
        return False
    choices = body.get("choices")
    return (isinstance(choices, list) and bool(choices)
            and all(isinstance(c, dict) and c.get("finish_reason") and isinstance(c.get("message"), dict)
                    for c in choices))


class AnswerBuilder:
    """The final chat.completion object of a stream, built from its chunks as they pass (text,
    refusals and tool calls per choice). Gives up (`too_big`) past `max_bytes` of chunks."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.size = 0
        self.too_big = False
        self.head: dict[str, Any] = {}
        self.choices: dict[int, dict[str, Any]] = {}
        self.usage: dict[str, Any] | None = None

    def feed(self, piece: StreamPiece) -> None:
        """Add one chunk. Never raises: a chunk it cannot read makes the answer unusable."""
        if self.too_big:
            return
        raw = piece.raw
        self.size += len(raw) if raw is not None else 256
        try:
            chunk = piece.chunk if piece.chunk is not None else json.loads(raw or b"{}")
        except ValueError:
            chunk = None
        if self.size > self.max_bytes or not isinstance(chunk, dict):
            self.too_big = True
            self.choices.clear()
            return
        try:
            self._chunk(chunk)
        except (AttributeError, TypeError, ValueError):
            self.too_big = True
            self.choices.clear()

    def _chunk(self, chunk: dict[str, Any]) -> None:
        if not self.head:
            self.head = {k: chunk[k] for k in ("id", "created", "model", "system_fingerprint") if k in chunk}
        if isinstance(chunk.get("usage"), dict):
            self.usage = chunk["usage"]
        for choice in chunk.get("choices") or ():
            if isinstance(choice, dict):
                self._choice(choice)

    def _choice(self, choice: dict[str, Any]) -> None:
        index = choice.get("index", 0)
        acc = self.choices.setdefault(index, {"role": "assistant", "content": [], "refusal": [],
                                              "tools": {}, "finish_reason": None})
        delta = choice.get("delta") or {}
        if isinstance(delta.get("role"), str):
            acc["role"] = delta["role"]
        if isinstance(delta.get("content"), str):
            acc["content"].append(delta["content"])
        if isinstance(delta.get("refusal"), str):
            acc["refusal"].append(delta["refusal"])
        for call in delta.get("tool_calls") or ():
            slot = acc["tools"].setdefault(call.get("index", 0), {"id": None, "type": "function",
                                                                 "name": [], "arguments": []})
            if call.get("id"):
                slot["id"] = call["id"]
            function = call.get("function") or {}
            if isinstance(function.get("name"), str):
                slot["name"].append(function["name"])
            if isinstance(function.get("arguments"), str):
                slot["arguments"].append(function["arguments"])
        if choice.get("finish_reason"):
            acc["finish_reason"] = choice["finish_reason"]

    def answer(self, usage: dict[str, Any] | None) -> dict[str, Any] | None:
        """The chat.completion object, or None when it is not a complete answer."""
        if self.too_big or not self.choices:
            return None
        choices = []
        for index in sorted(self.choices):
            acc = self.choices[index]
            message: dict[str, Any] = {"role": acc["role"], "content": "".join(acc["content"]) or None}
            if acc["refusal"]:
                message["refusal"] = "".join(acc["refusal"])
            if acc["tools"]:
                message["tool_calls"] = [
                    {"id": t["id"], "type": t["type"],
                     "function": {"name": "".join(t["name"]), "arguments": "".join(t["arguments"])}}
                    for _, t in sorted(acc["tools"].items())]
            choices.append({"index": index, "message": message, "logprobs": None,
                            "finish_reason": acc["finish_reason"]})
        body = {"id": self.head.get("id"), "object": "chat.completion", "created": self.head.get("created"),
                "model": self.head.get("model"), "choices": choices, "usage": self.usage or usage}
        if self.head.get("system_fingerprint"):
            body["system_fingerprint"] = self.head["system_fingerprint"]
        return body if complete_answer(body) else None


def replay_body(entry: Entry, created: int) -> dict[str, Any]:
    """The stored answer as a new chat.completion (its own id and time)."""
    return {**entry.body, "id": "chatcmpl-" + uuid.uuid4().hex, "created": created}


def replay_pieces(body: dict[str, Any]) -> Iterator[Optional[StreamPiece]]:
    """The answer as the chunks of a stream: per choice its role and whole text (and tool
    calls), then its finish_reason; then a usage chunk (sent only to clients that asked)."""
    head = {"id": body["id"], "object": "chat.completion.chunk", "created": body["created"],
            "model": body.get("model")}
    if body.get("system_fingerprint"):
        head["system_fingerprint"] = body["system_fingerprint"]
    for choice in body["choices"]:
        message = choice.get("message") or {}
        delta: dict[str, Any] = {"role": message.get("role", "assistant"), "content": message.get("content") or ""}
        if message.get("refusal"):
            delta["refusal"] = message["refusal"]
        if message.get("tool_calls"):
            delta["tool_calls"] = [{"index": i, **call} for i, call in enumerate(message["tool_calls"])]
        index = choice.get("index", 0)
        yield StreamPiece(chunk={**head, "choices": [{"index": index, "delta": delta, "finish_reason": None}]},
                          flush=False)
        yield StreamPiece(chunk={**head, "choices": [{"index": index, "delta": {},
                                                      "finish_reason": choice["finish_reason"]}]}, flush=False)
    usage = body.get("usage")
    yield StreamPiece(chunk={**head, "choices": [], "usage": usage}, usage=usage, usage_only=True)
