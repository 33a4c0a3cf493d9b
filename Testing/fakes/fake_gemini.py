"""A fake Google Gemini API (`POST /v1beta/models/{model}:generateContent` and
`:streamGenerateContent?alt=sse`): a real HTTP server speaking the documented wire format
(`x-goog-api-key`, `contents`/`parts`, `systemInstruction`, `generationConfig` with unknown
fields rejected like the real API, GenerateContentResponse with `candidates`, `finishReason`,
`usageMetadata`; SSE events without a terminator; errors `{"error": {"code", "message",
"status", "details"}}`).

Answers: text pieces "Echo:" + words of the last user text (`DEFAULT_PIECES`);
`promptTokenCount` = words of system + all texts + 7, `candidatesTokenCount` = pieces.

Embeddings (`:batchEmbedContents`): vectors of Testing/fakes/fake_media.py, no usage (as
documented) unless the model name has "usage".

Scripted by substrings of the model: bad-key (400 INVALID_ARGUMENT with reason
API_KEY_INVALID, how Gemini answers a wrong key; the message echoes the key), fail-403,
fail-429 (RESOURCE_EXHAUSTED with RetryInfo retryDelay "37s"), fail-500, fail-503,
context-too-long, not-found, safety (finishReason SAFETY), blocked-prompt (promptFeedback
blockReason), malformed, malformed-json, die-mid-stream, no-finish (stream ends without a
finishReason), hang, tool (a functionCall; "Tool said: ..." once a functionResponse came),
cache (cachedContentTokenCount 5), think (thoughtsTokenCount 5), chunks-N.
"""
from __future__ import annotations

import re
from typing import Any

from Testing.fakes import fake_media
from Testing.fakes.http_fake import HANG, FakeHTTPServer, FakeRequest, Reply, Streamed, count_words, echo_words, sse

DEFAULT_PIECES = 10
PROMPT_OVERHEAD = 7
CACHED, THOUGHTS = 5, 5
_PATH = re.compile(r"^/v1beta/models/([^/:]+):(generateContent|streamGenerateContent|batchEmbedContents)$")
_CHUNKS = re.compile(r"chunks-(\d+)")
CONFIG_FIELDS = {"temperature", "topP", "topK", "candidateCount", "maxOutputTokens", "stopSequences",
                 "presencePenalty", "frequencyPenalty", "seed", "responseMimeType", "responseSchema",
                 "responseJsonSchema", "thinkingConfig"}
PART_FIELDS = {"text", "inlineData", "fileData", "functionCall", "functionResponse", "thought"}


def error(code: int, status: str, message: str, details: list | None = None) -> Reply:
    err: dict[str, Any] = {"code": code, "message": message, "status": status}
    if details:
        err["details"] = details
    return Reply(code, {"error": err})


def parts_text(parts: list[dict[str, Any]]) -> str:
    return " ".join(p["text"] for p in parts if isinstance(p.get("text"), str))


class FakeGemini(FakeHTTPServer):
    name = "fake-gemini"

    def __init__(self, api_key: str) -> None:
        super().__init__()
        self.api_key = api_key

    @property
    def base_url(self) -> str:
        return self.url + "/v1beta"

    def handle(self, req: FakeRequest) -> Any:
        match = _PATH.match(req.path)
        if req.method != "POST" or not match:
            return error(404, "NOT_FOUND", f"Method not found: {req.path}")
        model, method = match.group(1), match.group(2)
        key = req.headers.get("x-goog-api-key")
        if key != self.api_key or "bad-key" in model:
            return error(400, "INVALID_ARGUMENT", f"API key not valid ({key}). Please pass a valid API key.",
                         [{"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": "API_KEY_INVALID",
                           "domain": "googleapis.com"}])
        if method == "batchEmbedContents":
            return self._scripted(model) or self._embed(req.json, model)
        stream = method == "streamGenerateContent"
        if stream and req.query.get("alt") != "sse":
            return error(400, "INVALID_ARGUMENT", "this fake streams only with alt=sse")
        body = req.json
        problem = self._invalid(body)
        if problem:
            return error(400, "INVALID_ARGUMENT", problem)
        scripted = self._scripted(model)
        if scripted is not None:
            return scripted
        plan = self._plan(body, model)
        if stream:
            return self._stream(plan, model)
        return Reply(200, self._response(plan, plan["pieces"], plan["finish"], len(plan["pieces"])))

    @staticmethod
    def _embed(body: Any, model: str) -> Reply:
        """BatchEmbedContentsResponse: one ContentEmbedding per request (vectors of
        Testing/fakes/fake_media.py). The documented answer has no usage; models named
        "*usage*" add `usageMetadata.promptTokenCount` (words + 7)."""
        requests = body.get("requests") if isinstance(body, dict) else None
        if not isinstance(requests, list) or not requests:
            return error(400, "INVALID_ARGUMENT", "* BatchEmbedContentsRequest.requests: requests is not specified")
        texts = []
        for i, one in enumerate(requests):
            if one.get("model") != f"models/{model}":
                return error(400, "INVALID_ARGUMENT", f"* BatchEmbedContentsRequest.requests[{i}].model: "
                                                      "must match the model of the batch request")
            if set(one) - {"model", "content", "taskType", "title", "outputDimensionality"}:
                return error(400, "INVALID_ARGUMENT", f"Invalid JSON payload received. Unknown name in requests[{i}]")
            texts.append(parts_text((one.get("content") or {}).get("parts") or []))
        answer: dict[str, Any] = {"embeddings": [
            {"values": fake_media.fake_vector(i, text, one.get("outputDimensionality"))}
            for i, (text, one) in enumerate(zip(texts, requests))]}
        if "usage" in model:
            answer["usageMetadata"] = {"promptTokenCount": fake_media.prompt_tokens(texts)}
        return Reply(200, answer)

    @staticmethod
    def _invalid(body: Any) -> str | None:
        if not isinstance(body, dict) or not isinstance(body.get("contents"), list) or not body["contents"]:
            return "* GenerateContentRequest.contents: contents is not specified"
        for i, content in enumerate(body["contents"]):
            if content.get("role") not in ("user", "model"):
                return f"* GenerateContentRequest.contents[{i}].role: must be user or model"
            if not content.get("parts"):
                return f"* GenerateContentRequest.contents[{i}].parts: must not be empty"
            for part in content["parts"]:
                if not part or set(part) - PART_FIELDS:
                    return f"Invalid JSON payload received. Unknown name in contents[{i}].parts"
        unknown = set(body.get("generationConfig") or {}) - CONFIG_FIELDS
        if unknown:
            return f"Invalid JSON payload received. Unknown name \"{sorted(unknown)[0]}\" at 'generation_config'"
        return None

    @staticmethod
    def _scripted(model: str) -> Any:
        if "fail-403" in model:
            return error(403, "PERMISSION_DENIED", "Permission denied on resource project")
        if "fail-429" in model:
            return error(429, "RESOURCE_EXHAUSTED", "You exceeded your current quota.",
                         [{"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "37s"}])
        if "fail-500" in model:
            return error(500, "INTERNAL", "An internal error has occurred.")
        if "fail-503" in model:
            return error(503, "UNAVAILABLE", "The model is overloaded. Please try again later.")
        if "context-too-long" in model:
            return error(400, "INVALID_ARGUMENT", "The input token count (1048577) exceeds the maximum number "
                                                  "of tokens allowed (1048576).")
        if "not-found" in model:
            return error(404, "NOT_FOUND", f"models/{model} is not found for API version v1beta")
        if "hang" in model:
            return HANG
        if "malformed-json" in model:
            return Reply(200, {"candidates": [{"content": {"parts": "oops"}}]})
        if "malformed" in model:
            return Reply(200, b"<html>oops</html>", content_type="text/html")
        return None

    def _plan(self, body: dict[str, Any], model: str) -> dict[str, Any]:
        system = parts_text((body.get("systemInstruction") or {}).get("parts") or [])
        prompt = count_words(system, *(parts_text(c["parts"]) for c in body["contents"])) + PROMPT_OVERHEAD
        last = body["contents"][-1]["parts"]
        responses = [p["functionResponse"] for p in last if "functionResponse" in p]
        decls = [d for t in body.get("tools") or () for d in t.get("functionDeclarations") or ()]
        plan: dict[str, Any] = {"model": model, "prompt": prompt, "call": None, "finish": "STOP"}
        if "tool" in model and not responses and decls:
            plan["pieces"] = []
            plan["call"] = {"name": decls[0]["name"], "args": {"query": parts_text(last), "unit": "celsius"}}
        elif "safety" in model:
            plan["pieces"], plan["finish"] = [], "SAFETY"
        else:
            text = f"Tool said: {responses[-1]['response']}" if responses else parts_text(last)
            m = _CHUNKS.search(model)
            pieces = echo_words(text, int(m.group(1)) if m else DEFAULT_PIECES)
            cap = (body.get("generationConfig") or {}).get("maxOutputTokens")
            if isinstance(cap, int) and cap < len(pieces):
                pieces, plan["finish"] = pieces[:cap], "MAX_TOKENS"
            plan["pieces"] = pieces
        plan["output"] = len(plan["pieces"]) + (3 if plan["call"] else 0)
        return plan

    @staticmethod
    def _usage(plan: dict[str, Any], output: int) -> dict[str, Any]:
        model = plan["model"]
        thoughts = THOUGHTS if "think" in model else 0
        meta = {"promptTokenCount": plan["prompt"], "candidatesTokenCount": output,
                "totalTokenCount": plan["prompt"] + output + thoughts}
        if "cache" in model:
            meta["cachedContentTokenCount"] = CACHED
        if thoughts:
            meta["thoughtsTokenCount"] = thoughts
        return meta

    def _response(self, plan: dict[str, Any], pieces: list[str], finish: str | None, output: int,
                  call: bool = True) -> dict[str, Any]:
        if "blocked-prompt" in plan["model"]:
            return {"promptFeedback": {"blockReason": "SAFETY"}, "usageMetadata": self._usage(plan, 0),
                    "modelVersion": plan["model"]}
        parts: list[dict[str, Any]] = [{"text": "".join(pieces)}] if pieces else []
        if plan["call"] and call:
            parts.append({"functionCall": plan["call"]})
        candidate: dict[str, Any] = {"content": {"parts": parts, "role": "model"}, "index": 0}
        if finish:
            candidate["finishReason"] = finish
            if finish == "SAFETY":
                candidate["safetyRatings"] = [{"category": "HARM_CATEGORY_DANGEROUS_CONTENT",
                                               "probability": "HIGH", "blocked": True}]
        return {"candidates": [candidate], "usageMetadata": self._usage(plan, output),
                "modelVersion": plan["model"], "responseId": "resp-fake"}

    def _stream(self, plan: dict[str, Any], model: str) -> Streamed:
        if "blocked-prompt" in model:
            return Streamed([sse(self._response(plan, [], None, 0))])
        events = []
        pieces = plan["pieces"]
        for i, piece in enumerate(pieces):
            last = i == len(pieces) - 1 and not plan["call"]
            events.append(sse(self._response(plan, [piece], plan["finish"] if last else None, i + 1, call=False)))
        if plan["call"] or not pieces:
            events.append(sse(self._response(plan, [], plan["finish"], plan["output"])))
        if "no-finish" in model:
            events[-1] = sse(self._response(plan, [pieces[-1]], None, len(pieces), call=False))
        return Streamed(events, die_after=3 if "die-mid-stream" in model else None)
