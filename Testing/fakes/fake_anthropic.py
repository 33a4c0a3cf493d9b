"""A fake Anthropic Messages API (`POST /v1/messages`): a real HTTP server speaking the documented
wire format (request validation, `x-api-key` + `anthropic-version`, JSON answers, the SSE event
sequence message_start / content_block_start / ping / content_block_delta / content_block_stop /
message_delta / message_stop, error bodies `{"type": "error", "error": {"type", "message"}}`).

Answers: text pieces "Echo:" + the words of the last user text (`DEFAULT_PIECES`); usage
`input_tokens` = words of system + all message texts + 7, `output_tokens` = pieces.

Scripted by substrings of `model`: fail-400, fail-401 (the message echoes the key it got, as a
hostile upstream might), fail-429 (retry-after: 7), overloaded (529 overloaded_error),
fail-500, context-too-long, malformed (200 HTML), malformed-json (200 JSON without content),
stream-error (an `error` event after message_start), die-mid-stream (cut after 4 events), hang,
tool (a text block then a tool_use block; answers "Tool said: ..." once a tool_result came
back), cache (11 cache-creation and 100 cache-read input tokens), chunks-N. `POST
/v1/messages/count_tokens` answers words + 7 (+ 1 per tool; fail-500 fails). A request with
`thinking: {"type": "enabled"}` gets a thinking block first (`THINKING`, signed `SIGNATURE`;
streamed as thinking_delta + signature_delta).
"""
from __future__ import annotations

import json
import re
from typing import Any

from Testing.fakes.http_fake import HANG, FakeHTTPServer, FakeRequest, Reply, Streamed, count_words, echo_words, sse

DEFAULT_PIECES = 12
PROMPT_OVERHEAD = 7
CACHE_CREATION, CACHE_READ = 11, 100
THINKING, SIGNATURE = "Pondering the words.", "sig-fake-0001"
_CHUNKS = re.compile(r"chunks-(\d+)")


def block_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    out = []
    for block in content or ():
        if block.get("type") == "text":
            out.append(block["text"])
        elif block.get("type") == "tool_result":
            out.append(block_text(block.get("content")))
    return " ".join(out)


def prompt_tokens(body: dict[str, Any]) -> int:
    system = body.get("system") or ""
    system = system if isinstance(system, str) else block_text(system)
    return count_words(system, *(block_text(m["content"]) for m in body["messages"])) + PROMPT_OVERHEAD


def tool_result_of(body: dict[str, Any]) -> str | None:
    last = body["messages"][-1]
    if last["role"] == "user" and isinstance(last["content"], list):
        results = [b for b in last["content"] if b.get("type") == "tool_result"]
        if results:
            return block_text(results[-1].get("content"))
    return None


def error(status: int, kind: str, message: str, headers: dict[str, str] | None = None) -> Reply:
    return Reply(status, {"type": "error", "error": {"type": kind, "message": message},
                          "request_id": "req_fake0001"}, headers or {})


class FakeAnthropic(FakeHTTPServer):
    name = "fake-anthropic"

    def __init__(self, api_key: str) -> None:
        super().__init__()
        self.api_key = api_key
        self._ids = 0

    @property
    def base_url(self) -> str:
        return self.url + "/v1"

    def handle(self, req: FakeRequest) -> Any:
        if req.path == "/v1/messages/count_tokens" and req.method == "POST":
            return self._count_tokens(req)
        if req.path != "/v1/messages" or req.method != "POST":
            return error(404, "not_found_error", f"Not found: {req.method} {req.path}")
        if req.headers.get("x-api-key") != self.api_key:
            return error(401, "authentication_error", "invalid x-api-key")
        if not req.headers.get("anthropic-version"):
            return error(400, "invalid_request_error", "anthropic-version: header is required")
        body = req.json
        problem = self._invalid(body)
        if problem:
            return error(400, "invalid_request_error", problem)
        model = body["model"]
        if "fail-400" in model:
            return error(400, "invalid_request_error", "messages.0: scripted fail-400 of the fake")
        if "fail-401" in model:
            return error(401, "authentication_error", f"invalid x-api-key: {req.headers.get('x-api-key')}")
        if "fail-429" in model:
            return error(429, "rate_limit_error", "Number of requests has exceeded your rate limit",
                         {"retry-after": "7"})
        if "overloaded" in model:
            return error(529, "overloaded_error", "Overloaded")
        if "fail-500" in model:
            return error(500, "api_error", "Internal server error")
        if "context-too-long" in model:
            return error(400, "invalid_request_error", "prompt is too long: 200001 tokens > 200000 maximum")
        if "hang" in model:
            return HANG
        if "malformed-json" in model:
            return Reply(200, {"id": "msg_x", "type": "message"})
        if "malformed" in model:
            return Reply(200, b"<html>502 Bad Gateway</html>", content_type="text/html")
        self._ids += 1
        plan = self._plan(body, f"msg_fake{self._ids:06d}")
        if body.get("stream") is True:
            return self._stream(plan, model)
        return Reply(200, self._message(plan))

    def _count_tokens(self, req: FakeRequest) -> Reply:
        """`{"input_tokens": words + 7}` (the prompt_tokens of an answer), + 1 per tool."""
        if req.headers.get("x-api-key") != self.api_key:
            return error(401, "authentication_error", "invalid x-api-key")
        body = req.json
        if not isinstance(body, dict) or "max_tokens" in body or not isinstance(body.get("messages"), list):
            return error(400, "invalid_request_error", "count_tokens takes model, messages, system, tools")
        if "fail-500" in str(body.get("model")):
            return error(500, "api_error", "Internal server error")
        return Reply(200, {"input_tokens": prompt_tokens(body) + len(body.get("tools") or [])})

    @staticmethod
    def _invalid(body: Any) -> str | None:
        if not isinstance(body, dict):
            return "body: not a JSON object"
        if not isinstance(body.get("max_tokens"), int):
            return "max_tokens: Field required"
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            return "messages: at least one message is required"
        for i, m in enumerate(messages):
            if m.get("role") not in ("user", "assistant"):
                return f"messages.{i}.role: Input should be 'user' or 'assistant'"
            if not isinstance(m.get("content"), (str, list)):
                return f"messages.{i}.content: Input should be a valid list"
            for block in m["content"] if isinstance(m["content"], list) else ():
                if block.get("type") not in ("text", "image", "tool_use", "tool_result", "document", "thinking",
                                             "redacted_thinking"):
                    return f"messages.{i}.content: unknown block type {block.get('type')!r}"
        if "system" in body and not isinstance(body["system"], (str, list)):
            return "system: Input should be a valid string"
        return None

    def _plan(self, body: dict[str, Any], mid: str) -> dict[str, Any]:
        model = body["model"]
        result = tool_result_of(body)
        tools = body.get("tools") or []
        m = _CHUNKS.search(model)
        plan: dict[str, Any] = {"id": mid, "model": model, "tool": None, "stop": "end_turn",
                                "thinking": (body.get("thinking") or {}).get("type") == "enabled"}
        if "tool" in model and result is None and tools:
            args = json.dumps({"query": block_text(body["messages"][-1]["content"]), "unit": "celsius"})
            plan["pieces"] = ["Let me check."]
            plan["tool"] = {"id": "toolu_" + mid[-6:], "name": tools[0]["name"],
                            "json_pieces": [args[i:i + 7] for i in range(0, len(args), 7)]}
            plan["stop"] = "tool_use"
        else:
            text = f"Tool said: {result}" if result is not None else block_text(body["messages"][-1]["content"])
            n = int(m.group(1)) if m else DEFAULT_PIECES
            pieces = echo_words(text, n)
            if body["max_tokens"] < len(pieces):
                pieces, plan["stop"] = pieces[:body["max_tokens"]], "max_tokens"
            plan["pieces"] = pieces
        output = len(plan["pieces"]) + (len(plan["tool"]["json_pieces"]) if plan["tool"] else 0)
        cached = "cache" in model
        plan["usage"] = {"input_tokens": prompt_tokens(body),
                         "cache_creation_input_tokens": CACHE_CREATION if cached else 0,
                         "cache_read_input_tokens": CACHE_READ if cached else 0,
                         "output_tokens": output}
        return plan

    @staticmethod
    def _message(plan: dict[str, Any]) -> dict[str, Any]:
        content: list[dict[str, Any]] = [{"type": "text", "text": "".join(plan["pieces"])}]
        if plan["thinking"]:
            content.insert(0, {"type": "thinking", "thinking": THINKING, "signature": SIGNATURE})
        if plan["tool"]:
            t = plan["tool"]
            content.append({"type": "tool_use", "id": t["id"], "name": t["name"],
                            "input": json.loads("".join(t["json_pieces"]))})
        return {"id": plan["id"], "type": "message", "role": "assistant", "model": plan["model"],
                "content": content, "stop_reason": plan["stop"], "stop_sequence": None, "usage": plan["usage"]}

    @staticmethod
    def _stream(plan: dict[str, Any], model: str) -> Streamed:
        usage = dict(plan["usage"])
        start_usage = {**usage, "output_tokens": 1}
        events = [sse({"type": "message_start", "message": {
            "id": plan["id"], "type": "message", "role": "assistant", "model": plan["model"], "content": [],
            "stop_reason": None, "stop_sequence": None, "usage": start_usage}}, "message_start")]
        if "stream-error" in model:
            events.append(sse({"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}},
                              "error"))
            return Streamed(events)
        text = 0
        if plan["thinking"]:
            text = 1
            events.append(sse({"type": "content_block_start", "index": 0, "content_block": {
                "type": "thinking", "thinking": "", "signature": ""}}, "content_block_start"))
            events.append(sse({"type": "content_block_delta", "index": 0,
                               "delta": {"type": "thinking_delta", "thinking": THINKING}}, "content_block_delta"))
            events.append(sse({"type": "content_block_delta", "index": 0,
                               "delta": {"type": "signature_delta", "signature": SIGNATURE}}, "content_block_delta"))
            events.append(sse({"type": "content_block_stop", "index": 0}, "content_block_stop"))
        events.append(sse({"type": "content_block_start", "index": text, "content_block": {"type": "text", "text": ""}},
                          "content_block_start"))
        events.append(sse({"type": "ping"}, "ping"))
        for piece in plan["pieces"]:
            events.append(sse({"type": "content_block_delta", "index": text,
                               "delta": {"type": "text_delta", "text": piece}}, "content_block_delta"))
        events.append(sse({"type": "content_block_stop", "index": text}, "content_block_stop"))
        if plan["tool"]:
            t, index = plan["tool"], text + 1
            events.append(sse({"type": "content_block_start", "index": index, "content_block": {
                "type": "tool_use", "id": t["id"], "name": t["name"], "input": {}}}, "content_block_start"))
            events.append(sse({"type": "content_block_delta", "index": index,
                               "delta": {"type": "input_json_delta", "partial_json": ""}}, "content_block_delta"))
            for piece in t["json_pieces"]:
                events.append(sse({"type": "content_block_delta", "index": index,
                                   "delta": {"type": "input_json_delta", "partial_json": piece}},
                                  "content_block_delta"))
            events.append(sse({"type": "content_block_stop", "index": index}, "content_block_stop"))
        events.append(sse({"type": "message_delta", "delta": {"stop_reason": plan["stop"], "stop_sequence": None},
                           "usage": {"output_tokens": usage["output_tokens"]}}, "message_delta"))
        events.append(sse({"type": "message_stop"}, "message_stop"))
        return Streamed(events, die_after=4 if "die-mid-stream" in model else None)


def expected_usage(plan_input: int, output: int, cached: bool = False) -> dict[str, int]:
    """The OpenAI usage the gateway must report for a fake answer."""
    extra = CACHE_CREATION + CACHE_READ if cached else 0
    return {"prompt_tokens": plan_input + extra, "completion_tokens": output,
            "total_tokens": plan_input + extra + output}
