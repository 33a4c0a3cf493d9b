"""Token counting with tiktoken, from the encodings shipped in `data/tokenizers/` (no network).

Encodings are built once per process from the local files (app/overrides.py
`tiktoken_local_encoding`); tiktoken's own download cache is disabled (`TIKTOKEN_CACHE_DIR=""`)
so nothing is written to /tmp and nothing is fetched. With that override off
(`OVERRIDE_TIKTOKEN_LOADER=0`) tiktoken loads its encodings its own way (download, or the
directory its `TIKTOKEN_CACHE_DIR` names).
"""
from __future__ import annotations

import functools
import json
import os
import threading
from typing import Any, Iterable

from app import overrides
from app.config import ROOT_DIR

TOKENIZER_DIR = ROOT_DIR / "data" / "tokenizers"
# The expected_hash values tiktoken itself checks for these files.
SHA256 = {
    "cl100k_base": "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7",
    "o200k_base": "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d",
}
DEFAULT_ENCODING = "o200k_base"

_lock = threading.Lock()
_encodings: dict[str, Any] = {}


def get_encoding(name: str = DEFAULT_ENCODING, local_files: bool = True):
    """The tiktoken Encoding `name`, loaded once per process (from the local file unless
    `local_files` is false or the override's guard refuses)."""
    enc = _encodings.get(name)
    if enc is not None:
        return enc
    if name not in SHA256:
        raise ValueError(f"unknown tokenizer {name!r}; available: {', '.join(sorted(SHA256))}")
    with _lock:
        if name not in _encodings:
            _encodings[name] = _load(name, local_files)
    return _encodings[name]


def _load(name: str, local_files: bool):
    if local_files and _local_loader_usable():
        os.environ["TIKTOKEN_CACHE_DIR"] = ""  # never cache copies, never download
        return overrides.tiktoken_local_encoding(name, str(TOKENIZER_DIR / f"{name}.tiktoken"), SHA256[name])
    import tiktoken
    return tiktoken.get_encoding(name)


@functools.cache
def _local_loader_usable() -> bool:
    """The override's guard, checked (and its one log line written) once per process."""
    return overrides.TIKTOKEN_LOADER.usable(True)


def count_text(text: str, encoding: str = DEFAULT_ENCODING) -> int:
    if not text:
        return 0
    # encode_ordinary: user text may contain "<|endoftext|>"; it is text, not a control token.
    return len(get_encoding(encoding).encode_ordinary(text))


def _content_text(content: Any) -> Iterable[str]:
    if isinstance(content, str):
        yield content
    elif isinstance(content, list):
        for part in content:
            if isinstance(part, dict) and isinstance(part.get("text"), str):
                yield part["text"]


# An image part, by OpenAI's published vision accounting: "low" detail is a flat 85 tokens;
# "high" (and "auto", which may pick high) is 85 + 170 per 512-px tile of the image scaled to
# fit 2048 x 2048 with its short side at most 768 px: at most 4 x 2 tiles, so 1445 tokens. The
# image's size is not known without fetching it, so the reservation takes that bound (the
# settlement refunds what the provider did not bill).
IMAGE_TOKENS_LOW = 85
IMAGE_TOKENS_HIGH = 85 + 170 * 8


def image_tokens(part: dict) -> int:
    """The tokens reserved for one `image_url` content part."""
    detail = part.get("image_url", {}).get("detail") if isinstance(part.get("image_url"), dict) else None
    return IMAGE_TOKENS_LOW if detail == "low" else IMAGE_TOKENS_HIGH


def image_parts(messages: list[dict]) -> list[dict]:
    """The `image_url` content parts of a chat request (no tokenising)."""
    return [p for msg in messages if isinstance(msg, dict) and isinstance(msg.get("content"), list)
            for p in msg["content"] if isinstance(p, dict) and p.get("type") == "image_url"]


def count_messages(messages: list[dict], encoding: str = DEFAULT_ENCODING) -> int:
    """Prompt tokens of a chat request's messages, by OpenAI's published per-message accounting:
    3 tokens of framing per message, 1 more for a `name`, and 3 to prime the reply; images as
    `image_tokens`."""
    total = 3
    for msg in messages:
        total += 3
        for text in _content_text(msg.get("content")):
            total += count_text(text, encoding)
        if isinstance(msg.get("content"), list):
            total += sum(image_tokens(p) for p in msg["content"]
                         if isinstance(p, dict) and p.get("type") == "image_url")
        if msg.get("name"):
            total += 1 + count_text(str(msg["name"]), encoding)
        if msg.get("role"):
            total += count_text(str(msg["role"]), encoding)
        for call in msg.get("tool_calls") or ():
            fn = call.get("function") if isinstance(call, dict) else None
            if isinstance(fn, dict):
                total += count_text(str(fn.get("name", "")), encoding)
                total += count_text(str(fn.get("arguments", "")), encoding)
    return total


def count_prompt(body: dict[str, Any], encoding: str = DEFAULT_ENCODING) -> int:
    """Everything of a chat request the provider bills as prompt: the messages, and the tool
    and function definitions and a `response_format` JSON schema, which the provider renders
    into the prompt (counted here as their compact JSON, a close upper bound of the rendering)."""
    total = count_messages(body.get("messages") or [], encoding)
    for name in ("tools", "functions"):
        if body.get(name):
            total += count_text(json.dumps(body[name], separators=(",", ":")), encoding)
    fmt = body.get("response_format")
    if isinstance(fmt, dict) and fmt.get("type") == "json_schema" and fmt.get("json_schema") is not None:
        total += count_text(json.dumps(fmt["json_schema"], separators=(",", ":")), encoding)
    return total


def preload(names: Iterable[str] = (DEFAULT_ENCODING,), local_files: bool = True) -> None:
    """Load encodings at start-up (125-250 ms each) rather than on a client's request;
    `local_files`: the OVERRIDE_TIKTOKEN_LOADER switch."""
    if not local_files:
        overrides.TIKTOKEN_LOADER.usable(False)  # its one log line
    for name in names:
        get_encoding(name, local_files)
