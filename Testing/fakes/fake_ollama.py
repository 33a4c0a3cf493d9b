"""A fake Ollama server (`POST /api/chat`): a real HTTP server speaking Ollama's documented wire
format (streaming is the default; NDJSON lines `{"model", "created_at", "message", "done"}`,
the last with `done_reason`, durations, `prompt_eval_count` and `eval_count`; errors
`{"error": "..."}`; a model that is not pulled is 404 `model "x" not found, try pulling it
first`).

Embeddings (`POST /api/embed`): vectors of Testing/fakes/fake_media.py, `prompt_eval_count` =
words + 7; a "malformed" model answers one vector short.

Answers: "Echo:" + words of the last user text, `DEFAULT_PIECES` pieces; `prompt_eval_count`
= words of all messages + 7, `eval_count` = pieces. Pulled models: any name except those with
the substring "not-found". Scripted by substrings of the model: not-found, fail-400, fail-500,
malformed, malformed-json, stream-error (an error line mid-stream), die-mid-stream, hang,
cached-prompt (no `prompt_eval_count`, as Ollama does when the prompt came from its cache),
tool (`message.tool_calls` with object arguments; "Tool said: ..." after a tool message),
chunks-N.
"""
from __future__ import annotations

import base64
import binascii
import json
import re
from typing import Any

from Testing.fakes import fake_media
from Testing.fakes.http_fake import HANG, FakeHTTPServer, FakeRequest, Reply, Streamed, count_words, echo_words

DEFAULT_PIECES = 8
PROMPT_OVERHEAD = 7
CREATED_AT = "2026-11-23T18:00:00.000000Z"
_CHUNKS = re.compile(r"chunks-(\d+)")
OPTION_FIELDS = {"temperature", "top_p", "top_k", "num_predict", "stop", "seed", "presence_penalty",
                 "frequency_penalty", "num_ctx", "repeat_penalty"}


def line(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj).encode() + b"\n"


class FakeOllama(FakeHTTPServer):
    name = "fake-ollama"

    @property
    def base_url(self) -> str:
        return self.url

    def handle(self, req: FakeRequest) -> Any:
        if req.path == "/api/embed" and req.method == "POST":
            return self._embed(req.json)
        if req.path != "/api/chat" or req.method != "POST":
            return Reply(404, b"404 page not found", content_type="text/plain")
        body = req.json
        problem = self._invalid(body)
        if problem:
            return Reply(400, {"error": problem})
        model = body["model"]
        if "not-found" in model:
            return Reply(404, {"error": f"model \"{model}\" not found, try pulling it first"})
        if "fail-400" in model:
            return Reply(400, {"error": "scripted fail-400 of the fake"})
        if "fail-500" in model:
            return Reply(500, {"error": "llama runner process has terminated: exit status 2"})
        if "hang" in model:
            return HANG
        if "malformed-json" in model:
            return Reply(200, {"model": model, "done": True})
        if "malformed" in model:
            return Reply(200, b"not json at all", content_type="text/plain")
        plan = self._plan(body)
        if body.get("stream", True):
            return self._stream(plan)
        return Reply(200, self._final(plan, {"role": "assistant", "content": "".join(plan["pieces"]),
                                             **({"tool_calls": plan["calls"]} if plan["calls"] else {})}))

    @staticmethod
    def _embed(body: Any) -> Reply:
        """`/api/embed`: `embeddings` (vectors of Testing/fakes/fake_media.py, `dimensions`
        honoured), `prompt_eval_count` = words + 7."""
        if not isinstance(body, dict) or not isinstance(body.get("model"), str):
            return Reply(400, {"error": "model is required"})
        model, inputs = body["model"], body.get("input")
        if "not-found" in model:
            return Reply(404, {"error": f"model \"{model}\" not found, try pulling it first"})
        if isinstance(inputs, str):
            inputs = [inputs]
        if not isinstance(inputs, list) or not inputs or not all(isinstance(i, str) for i in inputs):
            return Reply(400, {"error": "invalid input type"})
        if set(body) - {"model", "input", "truncate", "dimensions", "keep_alive", "options"}:
            return Reply(400, {"error": f"unknown field {sorted(set(body) - {'model', 'input'})[0]}"})
        vectors = [fake_media.fake_vector(i, text, body.get("dimensions")) for i, text in enumerate(inputs)]
        if "malformed" in model:
            vectors = vectors[:-1]  # one vector short
        return Reply(200, {"model": model, "embeddings": vectors, "total_duration": 14143917,
                           "load_duration": 1019500, "prompt_eval_count": fake_media.prompt_tokens(inputs)})

    @staticmethod
    def _invalid(body: Any) -> str | None:
        if not isinstance(body, dict) or not isinstance(body.get("model"), str):
            return "model is required"
        if not isinstance(body.get("messages"), list):
            return "messages is required"
        for m in body["messages"]:
            if m.get("role") not in ("system", "user", "assistant", "tool"):
                return f"invalid role {m.get('role')!r}"
            if not isinstance(m.get("content", ""), str):
                return "json: cannot unmarshal array into Go struct field Message.messages.content of type string"
            for image in m.get("images") or ():
                try:
                    base64.b64decode(image, validate=True)
                except (binascii.Error, ValueError):
                    return "illegal base64 data in images"
            for call in m.get("tool_calls") or ():
                if not isinstance(call.get("function", {}).get("arguments"), dict):
                    return "tool_calls arguments must be an object"
        unknown = set(body.get("options") or {}) - OPTION_FIELDS
        if unknown:
            return f"invalid option provided: {sorted(unknown)[0]}"
        return None

    @staticmethod
    def _plan(body: dict[str, Any]) -> dict[str, Any]:
        model = body["model"]
        messages = body["messages"]
        last = messages[-1]
        prompt = count_words(*(m.get("content", "") for m in messages)) + PROMPT_OVERHEAD
        plan: dict[str, Any] = {"model": model, "prompt": prompt, "calls": [], "done_reason": "stop"}
        if "tool" in model and last["role"] != "tool" and body.get("tools"):
            name = body["tools"][0]["function"]["name"]
            plan["calls"] = [{"function": {"name": name, "arguments": {"query": last.get("content", ""),
                                                                        "unit": "celsius"}}}]
            plan["pieces"] = []
            plan["output"] = 4
        else:
            text = f"Tool said: {last['content']}" if last["role"] == "tool" else last.get("content", "")
            m = _CHUNKS.search(model)
            pieces = echo_words(text, int(m.group(1)) if m else DEFAULT_PIECES)
            cap = (body.get("options") or {}).get("num_predict")
            if isinstance(cap, int) and 0 < cap < len(pieces):
                pieces, plan["done_reason"] = pieces[:cap], "length"
            plan["pieces"] = pieces
            plan["output"] = len(pieces)
        return plan

    @staticmethod
    def _final(plan: dict[str, Any], message: dict[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = {"model": plan["model"], "created_at": CREATED_AT, "message": message, "done": True,
                               "done_reason": plan["done_reason"], "total_duration": 5191566416,
                               "load_duration": 2154458, "prompt_eval_duration": 383809000,
                               "eval_count": plan["output"], "eval_duration": 4799921000}
        if "cached-prompt" not in plan["model"]:
            out["prompt_eval_count"] = plan["prompt"]
        return out

    def _stream(self, plan: dict[str, Any]) -> Streamed:
        model = plan["model"]
        lines = [line({"model": model, "created_at": CREATED_AT,
                       "message": {"role": "assistant", "content": piece}, "done": False})
                 for piece in plan["pieces"]]
        if plan["calls"]:
            lines.append(line({"model": model, "created_at": CREATED_AT, "done": False,
                               "message": {"role": "assistant", "content": "", "tool_calls": plan["calls"]}}))
        if "stream-error" in model:
            lines.insert(2, line({"error": "an error was encountered while running the model"}))
        lines.append(line(self._final(plan, {"role": "assistant", "content": ""})))
        return Streamed(lines, content_type="application/x-ndjson",
                        die_after=3 if "die-mid-stream" in model else None)
