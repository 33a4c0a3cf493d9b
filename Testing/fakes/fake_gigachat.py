"""A fake GigaChat API: its OAuth endpoint (`POST /api/v2/oauth`: `Authorization: Basic <key>`,
a uuid4 `RqUID`, form body `scope=GIGACHAT_API_PERS|B2B|CORP` -> `{"access_token",
"expires_at"}` in milliseconds) and chat completions (`POST /api/v1/chat/completions` with the
Bearer access token; GigaChat's OpenAI-like format with `functions`/`function_call`, function
call arguments as objects, `functions_state_id`, `finish_reason: "function_call"`, usage with
`precached_prompt_tokens`; SSE streams ending with `data: [DONE]`; errors
`{"status", "message"}`).

Answers: "Echo:" + words of the last user text (`DEFAULT_PIECES`); prompt_tokens = words of
all messages + 7, completion_tokens = pieces. Scripted by substrings of the model: fail-400,
fail-422, fail-429 (Retry-After: 3), fail-500, context-too-long (413), malformed,
malformed-json, die-mid-stream, hang, tool (a function_call; "Tool said: ..." after a function
message), cache (precached_prompt_tokens 4), chunks-N.

`revoke_tokens()` invalidates the issued tokens (the API then answers 401 until a new one is
fetched); `token_requests` counts OAuth calls; `token_ttl_ms` sets the lifetime of new tokens.
"""
from __future__ import annotations

import json
import re
import time
import uuid
from typing import Any
from urllib.parse import parse_qs

from Testing.fakes.http_fake import HANG, FakeHTTPServer, FakeRequest, Reply, Streamed, count_words, echo_words

DEFAULT_PIECES = 9
PROMPT_OVERHEAD = 7
PRECACHED = 4
_CHUNKS = re.compile(r"chunks-(\d+)")
SCOPES = ("GIGACHAT_API_PERS", "GIGACHAT_API_B2B", "GIGACHAT_API_CORP")


def error(status: int, message: str, headers: dict[str, str] | None = None) -> Reply:
    return Reply(status, {"status": status, "message": message}, headers or {})


def sse(obj: Any) -> bytes:
    return b"data: " + json.dumps(obj, ensure_ascii=False).encode() + b"\n\n"


class FakeGigaChat(FakeHTTPServer):
    name = "fake-gigachat"

    def __init__(self, auth_key: str, token_ttl_ms: int = 30 * 60 * 1000) -> None:
        super().__init__()
        self.auth_key = auth_key
        self.token_ttl_ms = token_ttl_ms
        self.tokens: dict[str, float] = {}  # token -> expiry (ms)
        self.token_requests = 0

    @property
    def base_url(self) -> str:
        return self.url + "/api/v1"

    @property
    def auth_url(self) -> str:
        return self.url + "/api/v2/oauth"

    def revoke_tokens(self) -> None:
        self.tokens.clear()

    def handle(self, req: FakeRequest) -> Any:
        if req.method == "POST" and req.path == "/api/v2/oauth":
            return self._oauth(req)
        if req.method == "POST" and req.path == "/api/v1/chat/completions":
            return self._chat(req)
        return error(404, f"Not found: {req.path}")

    def _oauth(self, req: FakeRequest) -> Reply:
        self.token_requests += 1
        try:
            uuid.UUID(req.headers.get("rquid", ""), version=4)
        except ValueError:
            return Reply(400, {"code": 4, "message": "Invalid RqUID: must be uuid4"})
        if req.headers.get("authorization") != f"Basic {self.auth_key}":
            return Reply(401, {"code": 6, "message": "credentials doesn't match db data"})
        if not req.headers.get("content-type", "").startswith("application/x-www-form-urlencoded"):
            return Reply(400, {"code": 5, "message": "scope is empty"})
        scope = parse_qs(req.raw_body.decode()).get("scope", [""])[0]
        if scope not in SCOPES:
            return Reply(400, {"code": 7, "message": "scope from db not fully includes consumed scope"})
        token = "tok-" + uuid.uuid4().hex
        expires = time.time() * 1000 + self.token_ttl_ms
        self.tokens[token] = expires
        return Reply(200, {"access_token": token, "expires_at": int(expires)})

    def _chat(self, req: FakeRequest) -> Any:
        auth = req.headers.get("authorization", "")
        token = auth[7:] if auth.startswith("Bearer ") else ""
        if self.tokens.get(token, 0) < time.time() * 1000:
            return error(401, "Unauthorized")
        body = req.json
        problem = self._invalid(body)
        if problem:
            return error(422, problem)
        model = body["model"]
        scripted = {"fail-400": (400, "Bad request: scripted fail-400"),
                    "fail-422": (422, "Invalid params: repetition_penalty must be in range (0, +inf)"),
                    "fail-500": (500, "Internal Server Error"),
                    "context-too-long": (413, "Payload too large: prompt exceeds the maximum number of tokens")}
        for name, (status, message) in scripted.items():
            if name in model:
                return error(status, message)
        if "fail-429" in model:
            return error(429, "Too Many Requests", {"Retry-After": "3"})
        if "hang" in model:
            return HANG
        if "malformed-json" in model:
            return Reply(200, {"choices": [{"message": None}]})
        if "malformed" in model:
            return Reply(200, b"<html>oops</html>", content_type="text/html")
        plan = self._plan(body)
        if body.get("stream") is True:
            return self._stream(plan)
        message: dict[str, Any] = {"role": "assistant", "content": "".join(plan["pieces"])}
        if plan["call"]:
            message.update(function_call=plan["call"], functions_state_id=plan["state"])
        return Reply(200, {"choices": [{"message": message, "index": 0, "finish_reason": plan["finish"]}],
                           "created": int(time.time()), "model": "GigaChat:2.0.28.2", "object": "chat.completion",
                           "usage": plan["usage"]})

    @staticmethod
    def _invalid(body: Any) -> str | None:
        if not isinstance(body, dict) or not isinstance(body.get("model"), str):
            return "model: field required"
        if not isinstance(body.get("messages"), list) or not body["messages"]:
            return "messages: field required"
        for i, m in enumerate(body["messages"]):
            if m.get("role") not in ("system", "user", "assistant", "function"):
                return f"messages[{i}].role: invalid role"
            if not isinstance(m.get("content", ""), str):
                return f"messages[{i}].content: str type expected"
            if m["role"] == "function":
                if not m.get("name"):
                    return f"messages[{i}].name: required for function messages"
                try:
                    json.loads(m["content"])
                except ValueError:
                    return f"messages[{i}].content: function result must be valid JSON"
            fc = m.get("function_call")
            if fc is not None and not isinstance(fc.get("arguments"), dict):
                return f"messages[{i}].function_call.arguments: dict type expected"
        for f in body.get("functions") or ():
            if not f.get("name"):
                return "functions: name required"
        return None

    @staticmethod
    def _plan(body: dict[str, Any]) -> dict[str, Any]:
        model, messages = body["model"], body["messages"]
        last = messages[-1]
        prompt = count_words(*(m.get("content", "") for m in messages)) + PROMPT_OVERHEAD
        plan: dict[str, Any] = {"call": None, "finish": "stop", "state": str(uuid.uuid4())}
        if "tool" in model and last["role"] != "function" and body.get("functions"):
            plan["pieces"] = []
            plan["call"] = {"name": body["functions"][0]["name"],
                            "arguments": {"query": last.get("content", ""), "unit": "celsius"}}
            plan["finish"] = "function_call"
            output = 5
        else:
            text = f"Tool said: {last['content']}" if last["role"] == "function" else last.get("content", "")
            m = _CHUNKS.search(model)
            pieces = echo_words(text, int(m.group(1)) if m else DEFAULT_PIECES)
            cap = body.get("max_tokens")
            if isinstance(cap, int) and cap < len(pieces):
                pieces, plan["finish"] = pieces[:cap], "length"
            plan["pieces"] = pieces
            output = len(pieces)
        plan["usage"] = {"prompt_tokens": prompt, "completion_tokens": output, "total_tokens": prompt + output,
                         "precached_prompt_tokens": PRECACHED if "cache" in model else 0}
        plan["model"] = model
        return plan

    @staticmethod
    def _stream(plan: dict[str, Any]) -> Streamed:
        created = int(time.time())

        def chunk(delta: dict[str, Any], finish: str | None = None, usage: bool = False) -> bytes:
            c: dict[str, Any] = {"delta": delta, "index": 0}
            if finish:
                c["finish_reason"] = finish
            obj: dict[str, Any] = {"choices": [c], "created": created, "model": "GigaChat:2.0.28.2",
                                   "object": "chat.completion"}
            if usage:
                obj["usage"] = plan["usage"]
            return sse(obj)

        events = [chunk({"content": p, "role": "assistant"}) for p in plan["pieces"]]
        if plan["call"]:
            events.append(chunk({"content": "", "role": "assistant", "function_call": plan["call"],
                                 "functions_state_id": plan["state"]}, plan["finish"], usage=True))
        else:
            events.append(chunk({"content": ""}, plan["finish"], usage=True))
        events.append(b"data: [DONE]\n\n")
        return Streamed(events, die_after=3 if "die-mid-stream" in plan["model"] else None)
