"""What the fake upstreams answer to embeddings and image requests (shared by fake_openai,
fake_gemini, fake_ollama and fake_pollinations), so that tests can compare literal values.

Embeddings: input i (a text of w words, or a token array of w ids) gets the vector
``[w, i + 0.5, -0.25, 0.125, 0.0625, ...]`` (each next value half the one before), ``dimensions``
values long (default ``DEFAULT_DIMENSIONS``). Every value is exact in float32, so a vector that
travels as base64 float32 compares equal to the literal. Reported usage: the words (and token
ids) of all inputs + ``PROMPT_OVERHEAD``.

Images: image i of a request is the bytes ``IMAGE_BYTES + bytes([i])`` (a PNG signature and a
marker); URLs are ``https://images.fake/<request id>/<i>.png``.
"""
from __future__ import annotations

import base64
import struct
from typing import Any

DEFAULT_DIMENSIONS = 4
PROMPT_OVERHEAD = 7
IMAGE_BYTES = b"\x89PNG\r\n\x1a\nfake-image-"
IMAGE_TOKENS = 100  # output tokens a gpt-image model reports per image


def input_size(item: Any) -> int:
    """Words of a text input, ids of a token-array input."""
    return len(item.split()) if isinstance(item, str) else len(item)


def fake_vector(index: int, item: Any, dimensions: int | None = None) -> list[float]:
    values = [float(input_size(item)), index + 0.5]
    value = -0.25
    while len(values) < (dimensions or DEFAULT_DIMENSIONS):
        values.append(value)
        value = abs(value) / 2
    return values[:dimensions or DEFAULT_DIMENSIONS]


def prompt_tokens(inputs: list[Any]) -> int:
    return sum(input_size(i) for i in inputs) + PROMPT_OVERHEAD


def float32_base64(vector: list[float]) -> str:
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()


def as_list(value: Any) -> list[Any] | None:
    """OpenAI's `input`: a string, a list of strings, a token array or a list of token arrays,
    as a list of inputs (None when it is none of these)."""
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list) or not value:
        return None
    if all(isinstance(v, int) for v in value):
        return [value]
    if all(isinstance(v, str) for v in value) or all(
            isinstance(v, list) and v and all(isinstance(t, int) for t in v) for v in value):
        return value
    return None


def openai_embeddings(body: Any) -> tuple[int, dict[str, Any]]:
    """(status, JSON) of OpenAI's POST /v1/embeddings for `body`."""
    if not isinstance(body, dict) or not isinstance(body.get("model"), str):
        return 400, _error("you must provide a model parameter", None)
    inputs = as_list(body.get("input"))
    if inputs is None:
        return 400, _error("'$.input' is invalid. Please check the API reference.", "input")
    fmt = body.get("encoding_format", "float")
    if fmt not in ("float", "base64"):
        return 400, _error(f"Invalid value for 'encoding_format': {fmt!r}.", "encoding_format")
    dims = body.get("dimensions")
    if dims is not None and (not isinstance(dims, int) or dims <= 0):
        return 400, _error("Invalid value for 'dimensions'.", "dimensions")
    data = []
    for i, item in enumerate(inputs):
        vector = fake_vector(i, item, dims)
        data.append({"object": "embedding", "index": i,
                     "embedding": float32_base64(vector) if fmt == "base64" else vector})
    answer: dict[str, Any] = {"object": "list", "data": data, "model": body["model"]}
    if "no-usage" not in body["model"]:
        tokens = prompt_tokens(inputs)
        answer["usage"] = {"prompt_tokens": tokens, "total_tokens": tokens}
    return 200, answer


def image_bytes(index: int) -> bytes:
    return IMAGE_BYTES + bytes([index])


def openai_images(body: Any, request_id: str) -> tuple[int, dict[str, Any]]:
    """(status, JSON) of OpenAI's POST /v1/images/generations for `body`. Models named
    gpt-image* report token usage as the real ones do (input_tokens/output_tokens)."""
    if not isinstance(body, dict) or not isinstance(body.get("prompt"), str) or not body["prompt"]:
        return 400, _error("Missing required parameter: 'prompt'.", "prompt")
    n = body.get("n", 1)
    if not isinstance(n, int) or not 1 <= n <= 10:
        return 400, _error("Invalid value for 'n': must be between 1 and 10.", "n")
    fmt = body.get("response_format", "url")
    if fmt not in ("url", "b64_json"):
        return 400, _error(f"Invalid value for 'response_format': {fmt!r}.", "response_format")
    data = [{"b64_json": base64.b64encode(image_bytes(i)).decode()} if fmt == "b64_json"
            else {"url": f"https://images.fake/{request_id}/{i}.png"} for i in range(n)]
    answer: dict[str, Any] = {"created": 1700000000, "data": data}
    if "gpt-image" in str(body.get("model")):
        tokens = len(body["prompt"].split()) + PROMPT_OVERHEAD
        answer["usage"] = {"input_tokens": tokens, "output_tokens": IMAGE_TOKENS * n,
                           "total_tokens": tokens + IMAGE_TOKENS * n,
                           "input_tokens_details": {"text_tokens": tokens, "image_tokens": 0}}
    return 200, answer


def _error(message: str, param: str | None) -> dict[str, Any]:
    return {"error": {"message": message, "type": "invalid_request_error", "param": param, "code": None}}
