"""SIMULATOR: an offline, OpenAI-shaped generator for demos and load tests (not a real model).

It answers with deterministic text derived from the prompt, waits `latency_ms` before the
first token and then emits `tokens_per_s` tokens per second. Its usage figures are real
tiktoken counts of the prompt and of the text it produced.

It also serves embedding models (unit vectors derived from a hash of each input, so the same
text always gets the same vector; `dimensions` wide, else `embedding_dimensions`, default 64)
and image models (a PNG of one colour derived from the prompt, as base64 or a `data:` URL).
"""
from __future__ import annotations

import base64
import hashlib
import math
import struct
import time
import uuid
import zlib
from typing import Any, Iterator

from app.providers.base import Completion, Provider, StreamPiece, embeddings_body, image_size, register
from app.utils.token_counter import count_messages, count_text

_WORDS = ("the gateway simulator answers offline with deterministic text so that demos tests "
          "and benchmarks work without a network or keys every word here is one token of "
          "output and the usage figures are counted like a real provider would").split()
DEFAULT_OUTPUT_TOKENS = 64
DEFAULT_EMBEDDING_DIMENSIONS = 64
MAX_IMAGE_SIDE = 1024  # larger sizes are drawn at this size (the colour is all there is to see)


def sim_vector(item: str | list[int], dimensions: int) -> list[float]:
    """A deterministic unit vector for one input (text or token ids)."""
    seed = (item if isinstance(item, str) else ",".join(map(str, item))).encode()
    values: list[float] = []
    block = 0
    while len(values) < dimensions:
        digest = hashlib.sha256(seed + block.to_bytes(4, "big")).digest()
        values += [b / 127.5 - 1.0 for b in digest]
        block += 1
    values = values[:dimensions]
    norm = math.sqrt(sum(v * v for v in values)) or 1.0
    return [round(v / norm, 6) for v in values]


def sim_png(prompt: str, width: int, height: int) -> bytes:
    """A PNG of one colour taken from the prompt's hash."""
    width, height = min(width, MAX_IMAGE_SIDE), min(height, MAX_IMAGE_SIDE)
    rgb = hashlib.sha256(prompt.encode()).digest()[:3]

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    rows = (b"\x00" + rgb * width) * height
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(rows, 6)) + chunk(b"IEND", b""))




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
    kinds = frozenset({"chat", "embedding", "image"})
    token_input = True

    def __init__(self, name: str, settings: dict[str, Any], defaults: dict[str, Any]) -> None:
        super().__init__(name, settings, defaults)
        self.latency_s = float(settings.get("latency_ms", 200)) / 1000.0
        self.tokens_per_s = float(settings.get("tokens_per_s", 80))
        self.default_tokens = int(settings.get("output_tokens", DEFAULT_OUTPUT_TOKENS))
        self.dimensions = int(settings.get("embedding_dimensions", DEFAULT_EMBEDDING_DIMENSIONS))

    @classmethod
    def validate_settings(cls, name: str, settings: dict[str, Any]) -> None:
        for key in ("latency_ms", "tokens_per_s", "output_tokens", "embedding_dimensions"):
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

    def embed(self, request: dict[str, Any]) -> Completion:
        """One deterministic vector per input; usage = tiktoken tokens of the texts (token
        arrays count their length)."""
        time.sleep(self.latency_s)
        dims = int(request.get("dimensions") or self.dimensions)
        inputs = request["input"]
        tokens = sum(count_text(i) if isinstance(i, str) else len(i) for i in inputs)
        return embeddings_body(request.get("model", "simulator"), [sim_vector(i, dims) for i in inputs], tokens)

    def generate_images(self, request: dict[str, Any]) -> Completion:
        """`n` PNGs of one colour (from the prompt), as `b64_json` or a `data:` URL."""
        time.sleep(self.latency_s)
        width, height = image_size(request.get("size"))
        encoded = base64.b64encode(sim_png(str(request["prompt"]), width, height)).decode("ascii")
        item = ({"b64_json": encoded} if request.get("response_format") == "b64_json"
                else {"url": "data:image/png;base64," + encoded})
        n = int(request.get("n") or 1)
        return Completion(body={"created": int(time.time()), "data": [dict(item) for _ in range(n)]})
