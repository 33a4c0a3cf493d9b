"""Embedding vectors on the wire: OpenAI's `encoding_format: "base64"` is the base64 of the
vector's float32 values, little-endian (what numpy's `frombuffer(..., dtype="<f4")` reads)."""
from __future__ import annotations

import base64
import binascii
import struct
from typing import Any


def to_base64(vector: list[float]) -> str:
    """A float vector as OpenAI's base64 (float32, little-endian)."""
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode("ascii")


def from_base64(text: str) -> list[float]:
    """OpenAI's base64 embedding back to floats; ValueError when it is not float32 data."""
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("not base64") from None
    if len(raw) % 4:
        raise ValueError("not a whole number of float32 values")
    return list(struct.unpack(f"<{len(raw) // 4}f", raw))


def encoded(vector: Any, encoding_format: str) -> Any:
    """`vector` (floats, or a base64 string from an upstream asked for base64) in the format the
    client asked for. Raises ValueError for anything else."""
    if isinstance(vector, str):
        return vector if encoding_format == "base64" else from_base64(vector)
    if not isinstance(vector, list) or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in vector):
        raise ValueError("not a list of numbers")
    return to_base64(vector) if encoding_format == "base64" else vector
