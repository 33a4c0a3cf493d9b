"""SIMULATOR: an offline, OpenAI-shaped generator for demos and load tests (not a real model).

It answers with deterministic text derived from the prompt, waits `latency_ms` before the
first token and then emits `tokens_per_s` tokens per second. Its usage figures are real
tiktoken counts of the prompt and of the text it produced.
"""
from __future__ import annotations

import hashlib
import time
import uuid
from typing import Any, Iterator

from app.providers.base import Completion, Provider, StreamPiece, register
from app.utils.token_counter import count_messages

_WORDS = ("the gateway simulator answers offline with deterministic text so that demos tests "
          "and benchmarks work without a network or keys every word here is one token of "
          "output and the usage figures are counted like a real provider would").split()
DEFAULT_OUTPUT_TOKENS = 64


def _last_user_text(messages: list[dict]) -> str:
    for msg in reversed(messages):
        content = msg.get("content")
        if msg.get("role") == "user" and isinstance(content, str):
            return content
        if msg.get("role") == "user" and isinstance(content, list):
            return " ".join(p.get("text", "") for p in content if isinstance(p, dict))
    return ""


@register
class SimulatorProvider(Provider):
    type = "simulator"

    def __init__(self, name: str, settings: dict[str, Any], defaults: dict[str, Any]) -> None:
        super().__init__(name, settings, defaults)
        self.latency_s = float(settings.get("latency_ms", 200)) / 1000.0
        self.tokens_per_s = float(settings.get("tokens_per_s", 80))
        self.default_tokens = int(settings.get("output_tokens", DEFAULT_OUTPUT_TOKENS))

    @classmethod
    def validate_settings(cls, name: str, settings: dict[str, Any]) -> None:
        for key in ("latency_ms", "tokens_per_s", "output_tokens"):
            value = settings.get(key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                      or value < 0):
                raise ValueError(f"providers.{name}.{key}: must be a non-negative number")

    def _words(self, request: dict[str, Any]) -> list[str]:
        """Deterministic output: the same request always gets the same words."""
        limit = request.get("max_completion_tokens") or request.get("max_tokens") or self.default_tokens
        n = max(1, min(int(limit), self.default_tokens))
        prompt = _last_user_text(request.get("messages") or [])
        seed = int.from_bytes(hashlib.sha256(prompt.encode()).digest()[:4], "big")
        words = ["Simulated"] + [_WORDS[(seed + i * 7) % len(_WORDS)] for i in range(n - 1)]
        return [w if i == 0 else " " + w for i, w in enumerate(words)]

    def _usage(self, request: dict[str, Any], completion_tokens: int) -> dict[str, int]:
        prompt = count_messages(request.get("messages") or [])
        return {"prompt_tokens": prompt, "completion_tokens": completion_tokens,
                "total_tokens": prompt + completion_tokens}

    def _finish(self, request: dict[str, Any], produced: int) -> str:
        limit = request.get("max_completion_tokens") or request.get("max_tokens")
        return "length" if limit and produced >= int(limit) else "stop"

    def complete(self, request: dict[str, Any]) -> Completion:
        words = self._words(request)
        time.sleep(self.latency_s + (len(words) / self.tokens_per_s if self.tokens_per_s else 0))
        usage = self._usage(request, len(words))
        body = {
            "id": f"chatcmpl-sim-{uuid.uuid4().hex[:24]}", "object": "chat.completion",
            "created": int(time.time()), "model": request.get("model", "simulator"),
            "system_fingerprint": "simulator",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(words)},
                         "logprobs": None, "finish_reason": self._finish(request, len(words))}],
            "usage": usage,
        }
        return Completion(body=body, usage=usage)

    def stream(self, request: dict[str, Any]) -> Iterator[StreamPiece]:
        words = self._words(request)
        base = {"id": f"chatcmpl-sim-{uuid.uuid4().hex[:24]}", "object": "chat.completion.chunk",
                "created": int(time.time()), "model": request.get("model", "simulator"),
                "system_fingerprint": "simulator"}
        time.sleep(self.latency_s)
        yield StreamPiece(chunk={**base, "choices": [
            {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
             "finish_reason": None}]})
        gap = 1.0 / self.tokens_per_s if self.tokens_per_s else 0.0
        for word in words:
            if gap:
                time.sleep(gap)
            yield StreamPiece(chunk={**base, "choices": [
                {"index": 0, "delta": {"content": word}, "logprobs": None, "finish_reason": None}]})
        yield StreamPiece(chunk={**base, "choices": [
            {"index": 0, "delta": {}, "logprobs": None, "finish_reason": self._finish(request, len(words))}]})
        usage = self._usage(request, len(words))
        yield StreamPiece(chunk={**base, "choices": [], "usage": usage}, usage=usage, usage_only=True)
