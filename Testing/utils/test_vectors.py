"""Embedding vectors on the wire: OpenAI's base64 is little-endian float32; a vector in either
form comes out in the format the client asked for; anything else is refused."""
from __future__ import annotations

import pytest

from app.utils.vectors import encoded, from_base64, to_base64


def test_base64_is_little_endian_float32():
    # 1.0 = 0x3f800000 -> bytes 00 00 80 3f; -2.0 = 0xc0000000 -> 00 00 00 c0
    assert to_base64([1.0, -2.0]) == "AACAPwAAAMA="
    assert from_base64("AACAPwAAAMA=") == [1.0, -2.0]


def test_encoded_converts_both_ways():
    assert encoded([0.5, 0.25], "base64") == "AAAAPwAAgD4="
    assert encoded("AAAAPwAAgD4=", "float") == [0.5, 0.25]
    assert encoded("AAAAPwAAgD4=", "base64") == "AAAAPwAAgD4="
    assert encoded([1, 2.5], "float") == [1, 2.5]


@pytest.mark.parametrize("bad", ["not base64!", "AAAA AA", "AAA=", ["x"], [True], {"a": 1}, None])
def test_what_is_not_a_vector_is_refused(bad):
    with pytest.raises(ValueError):
        encoded(bad, "float")
