"""The chat request's quick check (`chat_surely_valid`) never says yes where marshmallow's
ChatCompletionSchema would say no: it only lets ordinary requests skip marshmallow, and every
error is still marshmallow's."""
from __future__ import annotations

import itertools
import math

import pytest
from marshmallow import ValidationError

from app.api.schemas import CHAT_SCHEMA, chat_surely_valid, validate_chat

BASE = {"model": "demo", "messages": [{"role": "user", "content": "hi"}]}

# Odd values tried in every declared field (and in model and messages).
ODD = [None, True, False, 0, 1, -1, 2, 3, 129, 128, 0.5, 1.5, 2.5, -2.5, math.nan, math.inf, -math.inf,
       10**400, "1", "", "x" * 201, [], [{}], [1], {}, {"a": 1}, [{"role": "user", "content": "x"}]]
FIELDS = ["model", "messages", "temperature", "top_p", "max_tokens", "max_completion_tokens", "n", "stream",
          "stream_options", "presence_penalty", "frequency_penalty", "user", "tools", "functions",
          "response_format"]


def marshmallow_accepts(body: dict) -> bool:
    try:
        CHAT_SCHEMA.load(body)
        return True
    except ValidationError:
        return False


@pytest.mark.parametrize("body, expected", [
    (BASE, True),
    ({**BASE, "temperature": 0.7, "max_tokens": 64, "stream": True, "stream_options": {"include_usage": True}}, True),
    ({**BASE, "tools": [{"type": "function", "function": {"name": "f"}}], "user": "u1", "n": 2}, True),
    ({**BASE, "temperature": None, "seed": 7, "metadata": {"a": "b"}}, True),   # unknown fields pass
    ({**BASE, "temperature": 3}, False),
    ({**BASE, "max_tokens": True}, False),
    ({**BASE, "max_tokens": 1.0}, False),
    ({**BASE, "temperature": math.nan}, False),
    ({**BASE, "stream": "yes"}, False),
    ({"model": "demo", "messages": []}, False),
    ({"messages": BASE["messages"]}, False),
])
def test_quick_check_of_typical_bodies(body, expected):
    """Ordinary requests pass the quick check; a body with anything wrong does not (and
    marshmallow, which then decides, refuses it too)."""
    assert chat_surely_valid(body) is expected
    assert marshmallow_accepts(body) is expected


def test_quick_check_never_accepts_what_marshmallow_refuses():
    """Every declared field set to each odd value, alone and in pairs: wherever the quick
    check says valid, marshmallow agrees. (It may say "not sure" where marshmallow accepts:
    those bodies just take marshmallow's path.)"""
    checked = 0
    for name, value in itertools.product(FIELDS, ODD):
        body = {**BASE, name: value}
        if chat_surely_valid(body):
            assert marshmallow_accepts(body), body
        checked += 1
    for (a, va), (b, vb) in itertools.combinations(itertools.product(FIELDS[2:], ODD[:12]), 2):
        if a == b:
            continue
        body = {**BASE, a: va, b: vb}
        if chat_surely_valid(body):
            assert marshmallow_accepts(body), body
        checked += 1
    assert checked > 10_000


def test_validate_chat_raises_marshmallows_error():
    """A refused body gets marshmallow's own message for the field."""
    with pytest.raises(ValidationError) as exc:
        validate_chat({**BASE, "temperature": 3})
    assert exc.value.messages == {"temperature": ["Must be greater than or equal to 0 and less than or equal to 2."]}
    validate_chat({**BASE, "temperature": 1})   # no exception
