"""Token counting with tiktoken, from the encodings shipped in `data/tokenizers/` (no network).

Encodings are built once per process from the local files (app/overrides.py
`tiktoken_local_encoding`); tiktoken's own download cache is disabled (`TIKTOKEN_CACHE_DIR=""`)
so nothing is written to /tmp and nothing is fetched. With that override off
(`OVERRIDE_TIKTOKEN_LOADER=0`) tiktoken loads its encodings its own way (download, or the
directory its `TIKTOKEN_CACHE_DIR` names).
"""
from __future__ import annotations

import functools
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


# An image part costs at least this many tokens (OpenAI's "low detail" figure).
IMAGE_PART_TOKENS = 85


def count_messages(messages: list[dict], encoding: str = DEFAULT_ENCODING) -> int:
    """Prompt tokens of a chat request, by OpenAI's published per-message accounting:
    3 tokens of framing per message, 1 more for a `name`, and 3 to prime the reply."""
    total = 3
    for msg in messages:
        total += 3
        for text in _content_text(msg.get("content")):
            total += count_text(text, encoding)
        if isinstance(msg.get("content"), list):
            total += IMAGE_PART_TOKENS * sum(
                1 for p in msg["content"] if isinstance(p, dict) and p.get("type") == "image_url")
        if msg.get("name"):
            total += 1 + count_text(str(msg["name"]), encoding)
        if msg.get("role"):
            total += count_text(str(msg["role"]), encoding)
        for call in msg.get("tool_calls") or ():
            fn = call.get("function") or {} if isinstance(call, dict) else {}
            total += count_text(str(fn.get("name", "")), encoding)
            total += count_text(str(fn.get("arguments", "")), encoding)
    return total


def preload(names: Iterable[str] = (DEFAULT_ENCODING,), local_files: bool = True) -> None:
    """Load encodings at start-up (125-250 ms each) rather than on a client's request;
    `local_files`: the OVERRIDE_TIKTOKEN_LOADER switch."""
    if not local_files:
        overrides.TIKTOKEN_LOADER.usable(False)  # its one log line
    for name in names:
        get_encoding(name, local_files)
