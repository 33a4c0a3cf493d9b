"""A fake OpenAI upstream: a real HTTP/1.1 server speaking the Chat Completions wire format.

It exists for two jobs:

* tests point gateway deployments at it and pick scripted failures through the request's
  ``model`` field (see ``BEHAVIOURS`` below), then check what the gateway sent with
  ``/_requests``;
* the benchmark uses it as the upstream, on the same 2 cores as the gateway, so it is written
  on plain asyncio protocols with a hand-written HTTP parser (no framework) to cost as little
  CPU per request as possible.

Run it in-process (``FakeOpenAI().start()``, its own asyncio loop in a real OS thread, which
works whether or not gevent has monkey-patched the process) or as a process::

    python -m Testing.fakes.fake_openai --port 9100 [--host 127.0.0.1]

Deterministic answers
---------------------
* content pieces are built from the last user message: ``"Echo:"`` followed by its words,
  cycled, one word per piece; the default is ``DEFAULT_CHUNKS`` (20) pieces;
* ``completion_tokens`` = number of content pieces (= streamed content chunks);
* ``prompt_tokens`` = whitespace-separated words in all message texts + 7
  (:func:`prompt_tokens_for`);
* ``max_tokens`` / ``max_completion_tokens`` cap the number of pieces (finish_reason
  ``"length"`` when they cut the answer short).

Scripted behaviours (substring of ``model``; the flags after ``hang`` can be combined)
-------------------------------------------------------------------------------------
``fail-500``, ``fail-429`` (with ``Retry-After: 1``), ``fail-401``, ``fail-400``,
``context-too-long`` (400 ``context_length_exceeded``), ``hang`` (never answers),
``die-mid-stream`` (5 SSE events, then the socket is closed without the terminating chunk;
a non-streaming request gets the connection closed without any answer), ``slow`` (50 ms
between stream events / before a JSON answer), ``no-usage`` (never any ``usage``), ``tool``
(a ``tool_calls`` answer, arguments streamed in several deltas), ``chunks-N`` (exactly N
content pieces), ``ra-S`` with ``fail-429`` (``Retry-After: S`` instead of 1, S a decimal
number of seconds), ``flaky-N`` (the first N requests naming this exact model fail with 500,
the next ones are answered; counters are forgotten by ``POST /_reset``), ``cached-N``
(``prompt_tokens_details.cached_tokens`` = N), ``reasoning-N`` (N more completion tokens,
reported as ``completion_tokens_details.reasoning_tokens``). A ``tool`` model whose last
message is a tool result answers text instead: ``"Tool said:"`` and the words of that result.
A request with ``response_format`` ``json_schema`` is answered with a JSON object that fits the
schema (:func:`schema_example`), streamed in pieces.

Responses API (``POST /v1/responses``, streamed or not)
-------------------------------------------------------
The same answers in the Responses wire format, as OpenAI documents it: ``input`` a string or
items (message, function_call, function_call_output), ``instructions``; the ``response``
object (message item with an ``output_text`` part, or a ``function_call`` item for ``tool``
models), ``usage`` with ``input_tokens`` / ``output_tokens`` and their details; with
``stream: true`` the event sequence response.created, response.in_progress,
response.output_item.added, response.content_part.added, response.output_text.delta...,
response.output_text.done, response.content_part.done, response.output_item.done (or the
function_call_arguments events), response.completed, each with its ``sequence_number``. The
scripted failures above apply; ``die-mid-stream`` cuts the stream after 5 events.

Embeddings and images (``POST /v1/embeddings``, ``POST /v1/images/generations``): literal vectors,
images and usage described in ``Testing/fakes/fake_media.py``; the scripted failures apply.

Test endpoints: ``GET /_requests`` (last 1000 requests: method, path, query, headers with
lower-cased names, parsed JSON body), ``POST /_reset``, ``GET /_stats`` (requests and TCP
connections accepted so far).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import re
import signal
import sys
import time
from typing import Any, Callable

from Testing.fakes import fake_media

DEFAULT_CHUNKS = 20
PROMPT_TOKEN_OVERHEAD = 7
DIE_AFTER_EVENTS = 5
SLOW_DELAY_S = 0.05
MAX_RECORDED = 1000
MAX_HEADER_BYTES = 64 * 1024
CONTEXT_WINDOW = 128000

_CHUNKS_RE = re.compile(r"chunks-(\d+)")
_RETRY_AFTER_RE = re.compile(r"ra-(\d+(?:\.\d+)?)")
_FLAKY_RE = re.compile(r"flaky-(\d+)")
_dumps = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode
_REASONS = {
    100: "Continue", 200: "OK", 400: "Bad Request", 401: "Unauthorized", 404: "Not Found",
    405: "Method Not Allowed", 411: "Length Required", 429: "Too Many Requests",
    431: "Request Header Fields Too Large", 500: "Internal Server Error",
    501: "Not Implemented",
}
FAKE_MODELS = ["gpt-4o-mini", "gpt-4o", "fake-fail-500", "fake-fail-429", "fake-fail-401",
               "fake-fail-400", "fake-context-too-long", "fake-hang", "fake-die-mid-stream",
               "fake-slow", "fake-no-usage", "fake-tool", "fake-chunks-3"]


# --------------------------------------------------------------------------- answers


def message_text(message: Any) -> str:
    """Text of one chat message: a string content or the text parts of a list content."""
    if not isinstance(message, dict):
        return ""
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(p.get("text", "") for p in content
                        if isinstance(p, dict) and isinstance(p.get("text"), str))
    return ""


def prompt_tokens_for(messages: list[Any]) -> int:
    """The fake's prompt token count: words in all message texts + PROMPT_TOKEN_OVERHEAD."""
    return sum(len(message_text(m).split()) for m in messages) + PROMPT_TOKEN_OVERHEAD


def last_user_text(messages: list[Any]) -> str:
    """Text of the last ``user`` message ('' when there is none)."""
    for m in reversed(messages):
        if isinstance(m, dict) and m.get("role") == "user":
            return message_text(m)
    return ""


def content_pieces(messages: list[Any], n: int) -> list[str]:
    """The n content pieces (one completion token each) of the echo answer."""
    words = ["Echo:"] + last_user_text(messages).split()
    return [(" " if i else "") + words[i % len(words)] for i in range(n)]


def expected_content(messages: list[Any], n: int = DEFAULT_CHUNKS) -> str:
    """The full answer text for ``messages`` with n pieces (for tests)."""
    return "".join(content_pieces(messages, n))


def tool_argument_pieces(messages: list[Any]) -> list[str]:
    """The JSON arguments of the scripted tool call, split into deltas like OpenAI streams them."""
    args = _dumps({"query": last_user_text(messages), "unit": "celsius"})
    size = max(1, -(-len(args) // 6))
    return [args[i:i + size] for i in range(0, len(args), size)]


_CACHED_RE = re.compile(r"cached-(\d+)")
_REASONING_RE = re.compile(r"reasoning-(\d+)")


def scripted_detail(model: str, pattern: re.Pattern) -> int:
    """N of a ``cached-N`` / ``reasoning-N`` model name, else 0."""
    m = pattern.search(model.lower())
    return int(m.group(1)) if m else 0


def tool_result_text(messages: list[Any]) -> str | None:
    """The content of the last message when it is a tool result, else None."""
    last = messages[-1] if messages else None
    if isinstance(last, dict) and last.get("role") == "tool":
        return message_text(last)
    return None


def schema_example(schema: Any) -> Any:
    """A value fitting a JSON schema: objects with every property, "echo" for strings, 1 for
    integers, 1.5 for numbers, true, one-item arrays, the first enum value."""
    if not isinstance(schema, dict):
        return None
    if schema.get("enum"):
        return schema["enum"][0]
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "null")
    if kind == "object" or "properties" in schema:
        return {k: schema_example(v) for k, v in (schema.get("properties") or {}).items()}
    if kind == "array":
        return [schema_example(schema.get("items"))]
    return {"string": "echo", "integer": 1, "number": 1.5, "boolean": True}.get(kind)


def _json_schema(body: dict[str, Any]) -> dict[str, Any] | None:
    fmt = body.get("response_format")
    if isinstance(fmt, dict) and fmt.get("type") == "json_schema":
        return (fmt.get("json_schema") or {}).get("schema") or {}
    return None


def usage_object(prompt_tokens: int, completion_tokens: int, cached: int = 0,
                 reasoning: int = 0) -> dict[str, Any]:
    """An OpenAI ``usage`` object, details included as the real API sends them
    (``completion_tokens`` includes the reasoning tokens)."""
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached, "audio_tokens": 0},
        "completion_tokens_details": {"reasoning_tokens": reasoning, "audio_tokens": 0,
                                      "accepted_prediction_tokens": 0,
                                      "rejected_prediction_tokens": 0},
    }


def error_body(message: str, type_: str, param: str | None = None,
               code: str | None = None) -> bytes:
    """An OpenAI error envelope."""
    return _dumps({"error": {"message": message, "type": type_, "param": param,
                             "code": code}}).encode()


def scripted_error(model: str, messages: list[Any]) -> tuple[int, bytes, list[str]] | None:
    """(status, body, extra headers) for a scripted failure model, else None."""
    if "fail-500" in model:
        return 500, error_body("The server had an error while processing your request. "
                               "Sorry about that!", "server_error"), []
    if "fail-429" in model:
        ra = _RETRY_AFTER_RE.search(model)
        after = ra.group(1) if ra else "1"
        return 429, error_body(f"Rate limit reached for {model} (fake upstream). "
                               f"Please try again in {after}s.", "rate_limit_error", None,
                               "rate_limit_exceeded"), [f"Retry-After: {after}"]
    if "fail-401" in model:
        return 401, error_body("Incorrect API key provided: sk-fake***. You can find your "
                               "API key at https://platform.openai.com/account/api-keys.",
                               "invalid_request_error", None, "invalid_api_key"), []
    if "fail-400" in model:
        return 400, error_body("Invalid request (scripted fail-400 of the fake upstream).",
                               "invalid_request_error", "messages", "invalid_value"), []
    if "context-too-long" in model:
        tokens = max(prompt_tokens_for(messages), CONTEXT_WINDOW + 1)
        return 400, error_body(f"This model's maximum context length is {CONTEXT_WINDOW} "
                               f"tokens. However, your messages resulted in {tokens} tokens. "
                               "Please reduce the length of the messages.",
                               "invalid_request_error", "messages",
                               "context_length_exceeded"), []
    return None


class ChatPlan:
    """Everything needed to answer one valid chat request, decided from its body."""

    __slots__ = ("model", "messages", "stream", "include_usage", "usage", "slow", "die",
                 "tool", "tool_result", "tool_name", "pieces", "finish_reason", "prompt_tokens", "cid",
                 "created")

    def __init__(self, body: dict[str, Any], cid: str) -> None:
        model = body["model"]
        low = model.lower()
        self.model: str = model
        self.messages: list[Any] = body["messages"]
        self.stream = body.get("stream") is True
        opts = body.get("stream_options")
        self.usage = "no-usage" not in low
        self.include_usage = (self.usage and isinstance(opts, dict)
                              and opts.get("include_usage") is True)
        self.slow = "slow" in low
        self.die = "die-mid-stream" in low
        self.tool_result = tool_result_text(self.messages) if "tool" in low else None
        self.tool = "tool" in low and self.tool_result is None
        self.tool_name = _first_tool_name(body.get("tools"))
        self.cid = cid
        self.created = int(time.time())
        self.prompt_tokens = prompt_tokens_for(self.messages)
        self._plan_pieces(low, body)

    def _plan_pieces(self, low: str, body: dict[str, Any]) -> None:
        m = _CHUNKS_RE.search(low)
        if self.tool:
            pieces = tool_argument_pieces(self.messages)
        elif self.tool_result is not None:
            words = ["Tool", "said:"] + self.tool_result.split()
            pieces = [(" " if i else "") + w for i, w in enumerate(words)]
        elif _json_schema(body) is not None:
            text = _dumps(schema_example(_json_schema(body)))
            pieces = [text[i:i + 8] for i in range(0, len(text), 8)]
        else:
            pieces = content_pieces(self.messages, int(m.group(1)) if m else DEFAULT_CHUNKS)
        cap = body.get("max_completion_tokens", body.get("max_tokens"))
        finish = "tool_calls" if self.tool else "stop"
        if isinstance(cap, int) and not isinstance(cap, bool) and 0 <= cap < len(pieces):
            pieces, finish = pieces[:cap], "length"
        self.pieces = pieces
        self.finish_reason = finish

    def usage_dict(self) -> dict[str, Any]:
        reasoning = scripted_detail(self.model, _REASONING_RE)
        return usage_object(self.prompt_tokens, len(self.pieces) + reasoning,
                            scripted_detail(self.model, _CACHED_RE), reasoning)

    def completion_body(self) -> bytes:
        """The non-streaming ``chat.completion`` JSON."""
        if self.tool:
            message: dict[str, Any] = {
                "role": "assistant", "content": None, "refusal": None, "annotations": [],
                "tool_calls": [{"id": self._call_id(), "type": "function",
                                "function": {"name": self.tool_name,
                                             "arguments": "".join(self.pieces)}}]}
        else:
            message = {"role": "assistant", "content": "".join(self.pieces),
                       "refusal": None, "annotations": []}
        obj: dict[str, Any] = {
            "id": self.cid, "object": "chat.completion", "created": self.created,
            "model": self.model,
            "choices": [{"index": 0, "message": message, "logprobs": None,
                         "finish_reason": self.finish_reason}],
        }
        if self.usage:
            obj["usage"] = self.usage_dict()
        obj["service_tier"] = "default"
        obj["system_fingerprint"] = "fp_fake"
        return _dumps(obj).encode()

    def _call_id(self) -> str:
        return "call_" + self.cid.rsplit("-", 1)[-1]

    def stream_events(self) -> list[bytes]:
        """All SSE payloads of the stream (``data: ...\\n\\n``), [DONE] included."""
        head = ('data: {"id":%s,"object":"chat.completion.chunk","created":%d,"model":%s,'
                '"service_tier":"default","system_fingerprint":"fp_fake","choices":'
                % (_dumps(self.cid), self.created, _dumps(self.model)))
        tail = ',"usage":null}\n\n' if self.include_usage else "}\n\n"

        def event(delta: str, finish: str = "null") -> bytes:
            # Hand-assembled: dumping a dict per chunk would double the fake's CPU per stream.
            return ('%s[{"index":0,"delta":%s,"logprobs":null,"finish_reason":%s}]%s'
                    % (head, delta, finish, tail)).encode()

        if self.tool:
            first = {"role": "assistant", "content": None, "refusal": None, "tool_calls": [
                {"index": 0, "id": self._call_id(), "type": "function",
                 "function": {"name": self.tool_name, "arguments": ""}}]}
            events = [event(_dumps(first))]
            events += [event('{"tool_calls":[{"index":0,"function":{"arguments":%s}}]}'
                             % _dumps(p)) for p in self.pieces]
        else:
            events = [event('{"role":"assistant","content":"","refusal":null}')]
            events += [event('{"content":%s}' % _dumps(p)) for p in self.pieces]
        events.append(event("{}", _dumps(self.finish_reason)))
        if self.include_usage:
            events.append((head + '[],"usage":' + _dumps(self.usage_dict()) + "}\n\n").encode())
        events.append(b"data: [DONE]\n\n")
        return events


def _first_tool_name(tools: Any) -> str:
    if isinstance(tools, list):
        for t in tools:
            if isinstance(t, dict) and isinstance(t.get("function"), dict):
                name = t["function"].get("name")
                if isinstance(name, str) and name:
                    return name
    return "get_weather"


def validate_chat(body: Any) -> bytes | None:
    """An OpenAI 400 error body when the request cannot be answered, else None."""
    if not isinstance(body, dict):
        return error_body("We could not parse the JSON body of your request. (HINT: This "
                          "likely means you aren't using your HTTP library correctly.)",
                          "invalid_request_error")
    if not isinstance(body.get("model"), str) or not body["model"]:
        return error_body("you must provide a model parameter", "invalid_request_error")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        return error_body("Missing required parameter: 'messages'.", "invalid_request_error",
                          "messages", "missing_required_parameter")
    return None


# --------------------------------------------------------------------------- Responses API


def responses_messages(body: dict[str, Any]) -> list[dict[str, Any]]:
    """The Responses ``instructions`` and ``input`` as chat-like messages (for the echo and the
    token count): text parts joined, function_call_output items as tool messages."""
    messages: list[dict[str, Any]] = []
    if isinstance(body.get("instructions"), str):
        messages.append({"role": "system", "content": body["instructions"]})
    items = body.get("input")
    if isinstance(items, str):
        return messages + [{"role": "user", "content": items}]
    for item in items or ():
        kind = item.get("type", "message")
        if kind == "message":
            content = item.get("content")
            if isinstance(content, list):
                content = " ".join(p.get("text", "") for p in content if isinstance(p, dict)
                                   and isinstance(p.get("text"), str))
            messages.append({"role": item.get("role"), "content": content or ""})
        elif kind == "function_call_output":
            output = item.get("output")
            messages.append({"role": "tool", "content": output if isinstance(output, str) else ""})
    return messages


def validate_responses(body: Any) -> bytes | None:
    if not isinstance(body, dict):
        return error_body("We could not parse the JSON body of your request.", "invalid_request_error")
    if not isinstance(body.get("model"), str) or not body["model"]:
        return error_body("Missing required parameter: 'model'.", "invalid_request_error", "model",
                          "missing_required_parameter")
    if not isinstance(body.get("input"), (str, list)):
        return error_body("Missing required parameter: 'input'.", "invalid_request_error", "input",
                          "missing_required_parameter")
    if body.get("previous_response_id") is not None:
        return error_body(f"Previous response with id '{body['previous_response_id']}' not found.",
                          "invalid_request_error", "previous_response_id", "previous_response_not_found")
    return None


class ResponsesPlan:
    """One Responses request answered with the chat answer of the same conversation."""

    def __init__(self, body: dict[str, Any], rid: str) -> None:
        self.body = body
        self.rid = rid
        chat = {"model": body["model"], "messages": responses_messages(body), "stream": body.get("stream"),
                "tools": [{"type": "function", "function": t} for t in body.get("tools") or ()
                          if isinstance(t, dict)]}
        if isinstance(body.get("max_output_tokens"), int):
            chat["max_completion_tokens"] = body["max_output_tokens"]
        fmt = (body.get("text") or {}).get("format") or {}
        if fmt.get("type") == "json_schema":
            chat["response_format"] = {"type": "json_schema", "json_schema": {"schema": fmt.get("schema")}}
        self.chat = ChatPlan(chat, rid)
        self.item_id = ("fc_" if self.chat.tool else "msg_") + rid[len("resp_"):]
        self.seq = -1

    def usage(self) -> dict[str, Any]:
        u = self.chat.usage_dict()
        return {"input_tokens": u["prompt_tokens"],
                "input_tokens_details": {"cached_tokens": u["prompt_tokens_details"]["cached_tokens"],
                                         "cache_write_tokens": 0},
                "output_tokens": u["completion_tokens"],
                "output_tokens_details": {"reasoning_tokens": u["completion_tokens_details"]["reasoning_tokens"]},
                "total_tokens": u["total_tokens"]}

    def item(self, status: str) -> dict[str, Any]:
        done = status == "completed"
        if self.chat.tool:
            return {"id": self.item_id, "type": "function_call", "status": status,
                    "arguments": "".join(self.chat.pieces) if done else "",
                    "call_id": "call_" + self.rid[-8:], "name": self.chat.tool_name}
        return {"id": self.item_id, "type": "message", "status": status, "role": "assistant",
                "content": [self.part()] if done else []}

    def part(self, text: str | None = None) -> dict[str, Any]:
        return {"type": "output_text", "annotations": [], "logprobs": [],
                "text": "".join(self.chat.pieces) if text is None else text}

    def response(self, status: str) -> dict[str, Any]:
        done = status == "completed"
        cut = done and self.chat.finish_reason == "length"
        return {"id": self.rid, "object": "response", "created_at": self.chat.created,
                "status": "incomplete" if cut else status, "error": None,
                "incomplete_details": {"reason": "max_output_tokens"} if cut else None,
                "instructions": self.body.get("instructions"), "max_output_tokens": self.body.get("max_output_tokens"),
                "model": self.body["model"], "output": [self.item("completed")] if done else [],
                "parallel_tool_calls": True, "previous_response_id": None, "store": self.body.get("store", True),
                "temperature": 1.0, "text": {"format": {"type": "text"}}, "tool_choice": "auto",
                "tools": self.body.get("tools") or [], "top_p": 1.0, "truncation": "disabled",
                "usage": self.usage() if done and self.chat.usage else None, "user": None, "metadata": {}}

    def event(self, kind: str, **fields: Any) -> bytes:
        self.seq += 1
        return ("event: %s\ndata: %s\n\n" % (kind, _dumps({"type": kind, "sequence_number": self.seq,
                                                            **fields}))).encode()

    def stream_events(self) -> list[bytes]:
        at = {"output_index": 0, "item_id": self.item_id}
        events = [self.event("response.created", response=self.response("in_progress")),
                  self.event("response.in_progress", response=self.response("in_progress")),
                  self.event("response.output_item.added", output_index=0, item=self.item("in_progress"))]
        if self.chat.tool:
            events += [self.event("response.function_call_arguments.delta", delta=p, **at)
                       for p in self.chat.pieces]
            events.append(self.event("response.function_call_arguments.done",
                                     arguments="".join(self.chat.pieces), **at))
        else:
            events.append(self.event("response.content_part.added", content_index=0, part=self.part(""), **at))
            events += [self.event("response.output_text.delta", content_index=0, delta=p, logprobs=[], **at)
                       for p in self.chat.pieces]
            events.append(self.event("response.output_text.done", content_index=0,
                                     text="".join(self.chat.pieces), logprobs=[], **at))
            events.append(self.event("response.content_part.done", content_index=0, part=self.part(), **at))
        events.append(self.event("response.output_item.done", output_index=0, item=self.item("completed")))
        final = self.response("completed")
        kind = "response.incomplete" if final["status"] == "incomplete" else "response.completed"
        events.append(self.event(kind, response=final))
        return events


# --------------------------------------------------------------------------- server state


class FakeState:
    """Recorded requests and counters, shared by all connections of one server."""

    def __init__(self, lock_factory: Callable[[], Any]) -> None:
        self._lock = lock_factory()  # readers may live on another OS thread
        self.recorded: collections.deque[dict[str, Any]] = collections.deque(
            maxlen=MAX_RECORDED)
        self.total = 0
        self.by_authorization: dict[str, int] = {}
        self.connections_total = 0  # accepted TCP connections: shows a client's pool reuse
        self.answers_cut = 0  # answers the client hung up on before reading them whole
        self.closed_with_partial_request = 0  # peer closed mid-request (headers/body unread)
        self._ids = 0
        self.flaky_seen: dict[str, int] = {}  # model -> requests seen (``flaky-N``)
        self.connections: set[HttpConnection] = set()  # touched on the loop thread only

    def record(self, entry: dict[str, Any]) -> None:
        with self._lock:
            self.recorded.append(entry)
            self.total += 1
            auth = entry.get("headers", {}).get("authorization")
            if auth:  # who called: the benchmark tells the gateway's calls from its own by key
                self.by_authorization[auth] = self.by_authorization.get(auth, 0) + 1

    def snapshot(self) -> list[dict[str, Any]]:
        with self._lock:
            return list(self.recorded)

    def reset(self) -> None:
        with self._lock:
            self.recorded.clear()
            self.flaky_seen.clear()

    def flaky_failure(self, model: str) -> bool:
        """True while a ``flaky-N`` model has been asked fewer than N + 1 times."""
        m = _FLAKY_RE.search(model)
        if m is None:
            return False
        with self._lock:
            seen = self.flaky_seen.get(model, 0)
            self.flaky_seen[model] = seen + 1
        return seen < int(m.group(1))

    def next_id(self) -> str:
        self._ids += 1
        return "chatcmpl-fake%08d" % self._ids


class Request:
    __slots__ = ("method", "target", "path", "query", "headers", "raw_body", "keep_alive")

    def __init__(self, method: str, target: str, headers: dict[str, str], raw_body: bytes,
                 keep_alive: bool) -> None:
        self.method = method
        self.target = target
        self.path, _, self.query = target.partition("?")
        self.headers = headers
        self.raw_body = raw_body
        self.keep_alive = keep_alive


def response_bytes(status: int, body: bytes, keep_alive: bool,
                   content_type: str = "application/json",
                   extra: list[str] | None = None) -> bytes:
    """A complete HTTP/1.1 response with Content-Length."""
    lines = ["HTTP/1.1 %d %s" % (status, _REASONS.get(status, "Unknown")),
             "Content-Type: " + content_type, "Content-Length: %d" % len(body)]
    if extra:
        lines += extra
    if not keep_alive:
        lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def chunk_frame(payload: bytes) -> bytes:
    """One HTTP/1.1 chunk of a ``Transfer-Encoding: chunked`` body."""
    return b"%x\r\n%s\r\n" % (len(payload), payload)


STREAM_HEADERS = (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream; charset=utf-8\r\n"
                  b"Transfer-Encoding: chunked\r\nCache-Control: no-cache\r\n")
LAST_CHUNK = b"0\r\n\r\n"


class HttpConnection(asyncio.Protocol):
    """One client connection: parses requests one at a time (keep-alive, pipelining safe).

    Fast answers are written synchronously from ``data_received``; answers that wait
    (slow, hang) run as a task and hold back the next request of this connection.
    """

    def __init__(self, state: FakeState) -> None:
        self.state = state
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.busy = False
        self.closed = False
        self.sent_continue = False
        self.cut = False  # this connection already counted in answers_cut
        self.task: asyncio.Task[None] | None = None

    # -- asyncio callbacks
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.state.connections.add(self)
        self.state.connections_total += 1

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.state.connections.discard(self)
        if self.buf.strip():
            self.state.closed_with_partial_request += 1
        elif self.busy and self.task is not None and not self.task.done() and not self.cut:
            self.cut = True  # a slow answer was still being written
            self.state.answers_cut += 1
        if self.task is not None and not self.task.done():
            self.task.cancel()

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if not self.busy:
            self._process()

    # -- parsing
    def _process(self) -> None:
        while not self.busy and not self.closed:
            req = self._parse_one()
            if req is None:
                return
            self._dispatch(req)

    def _parse_one(self) -> Request | None:
        buf = self.buf
        end = buf.find(b"\r\n\r\n")
        if end < 0:
            if len(buf) > MAX_HEADER_BYTES:
                self._fail(431, "Request headers too large")
            return None
        lines = bytes(buf[:end]).decode("latin-1").split("\r\n")
        parts = lines[0].split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            self._fail(400, "Malformed request line")
            return None
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        if "transfer-encoding" in headers:
            self._fail(501, "Chunked request bodies are not supported by the fake")
            return None
        try:
            length = int(headers.get("content-length", "0"))
        except ValueError:
            self._fail(400, "Bad Content-Length")
            return None
        start = end + 4
        if len(buf) < start + length:
            self._maybe_continue(headers)
            return None
        body = bytes(buf[start:start + length])
        del buf[:start + length]
        self.sent_continue = False
        conn = headers.get("connection", "").lower()
        keep = conn != "close" if parts[2] == "HTTP/1.1" else conn == "keep-alive"
        return Request(parts[0], parts[1], headers, body, keep)

    def _maybe_continue(self, headers: dict[str, str]) -> None:
        if headers.get("expect", "").lower() == "100-continue" and not self.sent_continue:
            self.sent_continue = True
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")  # type: ignore[union-attr]

    def _fail(self, status: int, message: str) -> None:
        self.write(response_bytes(status, error_body(message, "invalid_request_error"), False))
        self.close()

    # -- output helpers
    def write(self, data: bytes) -> None:
        # is_closing(): a failed send closes the transport before connection_lost runs;
        # writing on would only make asyncio log "socket.send() raised exception".
        if not self.closed and not self.transport.is_closing():  # type: ignore[union-attr]
            self.transport.write(data)  # type: ignore[union-attr]
        elif not self.cut:
            self.cut = True
            self.state.answers_cut += 1

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.transport.close()  # type: ignore[union-attr]

    def respond(self, req: Request, status: int, body: bytes,
                extra: list[str] | None = None) -> None:
        self.write(response_bytes(status, body, req.keep_alive, extra=extra))
        if not req.keep_alive:
            self.close()

    # -- routing
    def _dispatch(self, req: Request) -> None:
        path, method = req.path, req.method
        if path in ("/v1/chat/completions", "/chat/completions"):
            if method != "POST":
                return self._method_not_allowed(req)
            return self._chat(req)
        if path in ("/v1/embeddings", "/v1/images/generations") and method == "POST":
            return self._media(req)
        if path in ("/v1/responses", "/responses"):
            if method != "POST":
                return self._method_not_allowed(req)
            return self._responses(req)
        if not path.startswith("/_"):
            self._record(req, None)
        if path in ("/v1/models", "/models"):
            if method != "GET":
                return self._method_not_allowed(req)
            return self.respond(req, 200, models_body())
        if path == "/_requests" and method == "GET":
            return self.respond(req, 200, _dumps(self.state.snapshot()).encode())
        if path == "/_reset" and method == "POST":
            self.state.reset()
            return self.respond(req, 200, b'{"ok":true}')
        if path == "/_stats" and method == "GET":
            return self.respond(req, 200, _dumps({
                "requests_total": self.state.total,
                "requests_by_authorization": dict(self.state.by_authorization),
                "connections_total": self.state.connections_total,
                "connections_open": len(self.state.connections),
                "answers_cut": self.state.answers_cut,
                "closed_with_partial_request": self.state.closed_with_partial_request,
            }).encode())
        self.respond(req, 404, error_body(f"Invalid URL ({method} {path})",
                                          "invalid_request_error"))

    def _method_not_allowed(self, req: Request) -> None:
        self._record(req, None)
        self.respond(req, 405, error_body(f"Method {req.method} not allowed for {req.path}",
                                          "invalid_request_error"))

    def _record(self, req: Request, body: Any) -> None:
        if body is None and req.raw_body:
            body = req.raw_body.decode("utf-8", "replace")
        self.state.record({"method": req.method, "path": req.path, "query": req.query,
                           "headers": req.headers, "body": body, "time": time.time()})

    def _recorded_json(self, req: Request) -> Any:
        """The request's JSON body (None when it is not JSON), the request recorded."""
        try:
            body: Any = json.loads(req.raw_body) if req.raw_body else None
        except ValueError:
            body = None
        self._record(req, body)
        return body

    # -- chat completions
    def _chat(self, req: Request) -> None:
        body = self._recorded_json(req)
        problem = validate_chat(body)
        if problem is not None:
            return self.respond(req, 400, problem)
        failure = scripted_error(body["model"].lower(), body["messages"])
        if failure is None and self.state.flaky_failure(body["model"]):
            failure = (500, error_body("Scripted flaky failure of the fake upstream.", "server_error"), [])
        if failure is not None:
            return self.respond(req, failure[0], failure[1], failure[2])
        if "hang" in body["model"].lower():
            self.busy = True  # never answer; the next request on this connection waits too
            return None
        plan = ChatPlan(body, self.state.next_id())
        if plan.slow:
            self._spawn(self._answer_later(req, plan))
        elif plan.stream:
            self._stream_now(req, plan)
        elif plan.die:
            self.close()
        else:
            self.respond(req, 200, plan.completion_body(), ["x-request-id: req_" + plan.cid])

    def _media(self, req: Request) -> None:
        """Embeddings and image generations (answers: Testing/fakes/fake_media.py); the
        scripted failures of the model apply."""
        try:
            body: Any = json.loads(req.raw_body) if req.raw_body else None
        except ValueError:
            body = None
        self._record(req, body)
        model = str(body.get("model") or "").lower() if isinstance(body, dict) else ""
        failure = scripted_error(model, [])
        if failure is not None:
            return self.respond(req, failure[0], failure[1], failure[2])
        if req.path.endswith("/embeddings"):
            status, answer = fake_media.openai_embeddings(body)
        else:
            status, answer = fake_media.openai_images(body, self.state.next_id())
        self.respond(req, status, _dumps(answer).encode())
    # -- Responses API
    def _responses(self, req: Request) -> None:
        body = self._recorded_json(req)
        problem = validate_responses(body)
        if problem is not None:
            return self.respond(req, 400, problem)
        plan = ResponsesPlan(body, "resp_fake%08d" % int(self.state.next_id()[-8:]))
        failure = scripted_error(body["model"].lower(), plan.chat.messages)
        if failure is not None:
            return self.respond(req, failure[0], failure[1], failure[2])
        if "hang" in body["model"].lower():
            self.busy = True
            return None
        if not plan.chat.stream:
            if plan.chat.die:
                return self.close()
            return self.respond(req, 200, _dumps(plan.response("completed")).encode())
        events = plan.stream_events()
        if plan.chat.die:
            events = events[:DIE_AFTER_EVENTS]
        head = STREAM_HEADERS + (b"" if req.keep_alive else b"Connection: close\r\n")
        frames = [head + b"\r\n" + chunk_frame(events[0])] + [chunk_frame(e) for e in events[1:]]
        if not plan.chat.die:
            frames[-1] += LAST_CHUNK
        for frame in frames:
            self.write(frame)
        if plan.chat.die or not req.keep_alive:
            self.close()

    def _stream_frames(self, req: Request, plan: ChatPlan) -> list[bytes]:
        """Header block + one chunk frame per SSE event (+ terminator unless dying)."""
        events = plan.stream_events()
        if plan.die:
            events = events[:DIE_AFTER_EVENTS]
        head = STREAM_HEADERS + b"x-request-id: req_" + plan.cid.encode() + b"\r\n"
        if not req.keep_alive:
            head += b"Connection: close\r\n"
        frames = [head + b"\r\n" + chunk_frame(events[0])]
        frames += [chunk_frame(e) for e in events[1:]]
        if not plan.die:
            frames[-1] += LAST_CHUNK
        return frames

    def _stream_now(self, req: Request, plan: ChatPlan) -> None:
        # One write per event: each SSE event leaves as its own send, like a real upstream.
        for frame in self._stream_frames(req, plan):
            self.write(frame)
        if plan.die or not req.keep_alive:
            self.close()

    async def _answer_later(self, req: Request, plan: ChatPlan) -> None:
        if not plan.stream:
            await asyncio.sleep(SLOW_DELAY_S)
            if plan.die:
                self.close()
            else:
                self.respond(req, 200, plan.completion_body(),
                             ["x-request-id: req_" + plan.cid])
            return
        for i, frame in enumerate(self._stream_frames(req, plan)):
            if i:
                await asyncio.sleep(SLOW_DELAY_S)
            if self.closed:
                return
            self.write(frame)
        if plan.die or not req.keep_alive:
            self.close()

    def _spawn(self, coro: Any) -> None:
        self.busy = True
        self.task = asyncio.get_running_loop().create_task(coro)
        self.task.add_done_callback(self._task_done)

    def _task_done(self, _task: asyncio.Task[None]) -> None:
        self.task = None
        self.busy = False
        if not self.closed and self.buf:
            self._process()


def models_body() -> bytes:
    created = 1700000000
    return _dumps({"object": "list", "data": [
        {"id": m, "object": "model", "created": created, "owned_by": "fake-openai"}
        for m in FAKE_MODELS]}).encode()


async def start_server(state: FakeState, host: str, port: int) -> asyncio.Server:
    """Listen on host:port (0 = a free port) with the fake's protocol."""
    loop = asyncio.get_running_loop()
    return await loop.create_server(lambda: HttpConnection(state), host, port,
                                    backlog=2048, reuse_address=True)


# --------------------------------------------------------------------------- in-process use


def _original(module: str, name: str) -> Any:
    """The unpatched object even when gevent monkey-patched the process (without importing
    gevent when it is not loaded): the fake needs a real OS thread and a real selector."""
    if "gevent.monkey" in sys.modules:
        from gevent import monkey  # noqa: PLC0415
        return monkey.get_original(module, name)
    return getattr(__import__(module), name)


def _new_loop() -> asyncio.AbstractEventLoop:
    try:
        selector_cls = _original("selectors", "EpollSelector")
    except (AttributeError, ImportError):
        selector_cls = None
    if selector_cls is None:
        return asyncio.new_event_loop()
    return asyncio.SelectorEventLoop(selector_cls())


class FakeOpenAI:
    """The fake upstream on its own asyncio loop in a background OS thread.

    >>> with FakeOpenAI() as fake:
    ...     client = openai.OpenAI(base_url=fake.base_url, api_key="sk-test")
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self.host = host
        self._want_port = port
        self.port: int = 0
        self._state = FakeState(_original("_thread", "allocate_lock"))
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.Server | None = None
        self._stopped = _original("_thread", "allocate_lock")()
        self._error: BaseException | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def base_url(self) -> str:
        return self.url + "/v1"

    def start(self, timeout: float = 10.0) -> "FakeOpenAI":
        """Start listening; returns once the socket is bound and accepting."""
        if self._loop is not None:
            raise RuntimeError("FakeOpenAI already started")
        ready = _original("_thread", "allocate_lock")()
        ready.acquire()
        self._stopped.acquire()
        _original("_thread", "start_new_thread")(self._run, (ready,))
        if not ready.acquire(True, timeout):
            raise RuntimeError("FakeOpenAI did not start in time")
        if self._error is not None:
            raise RuntimeError(f"FakeOpenAI failed to start: {self._error!r}") from self._error
        return self

    def _run(self, ready: Any) -> None:
        loop = _new_loop()
        self._loop = loop
        try:
            asyncio.set_event_loop(loop)
            self._server = loop.run_until_complete(
                start_server(self._state, self.host, self._want_port))
            self.port = self._server.sockets[0].getsockname()[1]
        except BaseException as exc:  # noqa: BLE001 - handed to start()
            self._error = exc
            ready.release()
            loop.close()
            self._stopped.release()
            return
        ready.release()
        try:
            loop.run_forever()
        finally:
            self._server.close()
            for task in asyncio.all_tasks(loop):
                task.cancel()
            loop.run_until_complete(asyncio.sleep(0))
            loop.close()
            self._stopped.release()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the server and its thread (open connections are dropped)."""
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        loop.call_soon_threadsafe(self._shutdown)
        self._stopped.acquire(True, timeout)

    def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
        for conn in list(self._state.connections):
            if conn.transport is not None:
                conn.transport.abort()
        asyncio.get_running_loop().stop()

    def requests(self) -> list[dict[str, Any]]:
        """The last 1000 requests received (oldest first)."""
        return self._state.snapshot()

    def chat_requests(self) -> list[dict[str, Any]]:
        """Only the chat completion requests."""
        return [r for r in self.requests() if r["path"].endswith("/chat/completions")]

    def responses_requests(self) -> list[dict[str, Any]]:
        """Only the Responses API requests."""
        return [r for r in self.requests() if r["path"].endswith("/responses")]

    def reset(self) -> None:
        """Forget the recorded requests."""
        self._state.reset()

    def __enter__(self) -> "FakeOpenAI":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# --------------------------------------------------------------------------- process use


async def _serve(host: str, port: int) -> None:
    import threading  # noqa: PLC0415 - not patched in a process started for this
    state = FakeState(threading.Lock)
    server = await start_server(state, host, port)
    bound = server.sockets[0].getsockname()[1]
    print(f"fake-openai listening on http://{host}:{bound}/v1", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with server:
        await stop.wait()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Fake OpenAI Chat Completions upstream")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9100, help="0 picks a free port")
    args = parser.parse_args(argv)
    asyncio.run(_serve(args.host, args.port))


if __name__ == "__main__":
    main()
