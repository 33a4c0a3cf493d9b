"""POST /api/chat and GET /api/health through a real gunicorn + gevent gateway, with the fake
OpenAI upstream (which records what the gateway sent) and real PostgreSQL billing."""
from __future__ import annotations

import json
import uuid
from datetime import datetime, timezone
from decimal import Decimal

import pytest

from Testing.conftest import key_rows
from Testing.support import SYSTEM_SECRET, http_json, wait_until


def mint(gateway, tenant: str) -> dict:
    since = datetime.now(timezone.utc)
    status, _, body = http_json("POST", gateway.base_url + "/v1/api-keys", {"name": "chat", "tenant": tenant},
                                {"X-System-Secret": SYSTEM_SECRET})
    assert status == 201, body
    return {**body, "since": since}


@pytest.fixture
def key(gateway, clean_db) -> dict:
    return mint(gateway, "chat-team")


def chat(gateway, key: dict, body: dict) -> tuple[int, dict, dict]:
    return http_json("POST", gateway.base_url + "/api/chat", body, {"Authorization": f"Bearer {key['key']}"})


def upstream_request_with(fake_upstream, text: str) -> dict:
    """The chat request the fake upstream received whose last message is `text`."""
    found: list[dict] = []

    def seen() -> bool:
        found[:] = [r["body"] for r in fake_upstream.chat_requests()
                    if r["body"] and r["body"]["messages"][-1]["content"] == text]
        return bool(found)
    wait_until(seen, message=f"an upstream request ending with {text!r}")
    return found[-1]


def test_answer_with_usage_cost_and_a_usage_row(gateway, key, clean_db):
    """One message gets the reply, the model, a new conversation id, the usage and its cost,
    and one usage row with endpoint api.chat and the same figures."""
    status, _, body = chat(gateway, key, {"message": "hello gateway", "model": "gpt-4o-mini"})
    assert status == 200, body
    assert body["reply"].startswith("Echo: hello gateway")
    assert body["model"] == "gpt-4o-mini"
    assert body["conversation"].startswith("conv_")
    # the fake's figures: prompt = 2 words + 7, completion = 20 pieces
    assert body["usage"] == {"prompt_tokens": 9, "completion_tokens": 20, "total_tokens": 29}
    assert body["cost_usd"] == "0.00001335"  # 9 x 0.15 + 20 x 0.60 per million tokens
    [row] = key_rows(clean_db, key, 1)
    assert row["endpoint"] == "api.chat" and row["status"] == "ok" and row["streamed"] is False
    assert (row["prompt_tokens"], row["completion_tokens"]) == (9, 20)
    assert row["cost_usd"] == Decimal("0.00001335")


def test_a_conversation_sends_the_earlier_exchange_upstream(gateway, key, fake_upstream):
    """The second message of a conversation reaches the provider after the first exchange
    (the first message and its reply), with this call's system prompt first."""
    first = f"first {uuid.uuid4().hex}"
    status, _, one = chat(gateway, key, {"message": first, "model": "gpt-4o-mini"})
    assert status == 200, one
    second = f"second {uuid.uuid4().hex}"
    status, _, two = chat(gateway, key, {"message": second, "model": "gpt-4o-mini", "system": "be brief",
                                         "conversation": one["conversation"]})
    assert status == 200, two
    assert two["conversation"] == one["conversation"]
    sent = upstream_request_with(fake_upstream, second)
    assert sent["messages"] == [{"role": "system", "content": "be brief"},
                                {"role": "user", "content": first},
                                {"role": "assistant", "content": one["reply"]},
                                {"role": "user", "content": second}]


def test_streaming_sends_deltas_then_a_final_event(gateway, key, clean_db):
    """"stream": true answers text/event-stream: `data: {"delta": ...}` events whose texts
    make the reply, then one `data: {"done": true, ...}` event with usage, cost and conversation."""
    status, headers, text = chat(gateway, key, {"message": "stream me", "model": "gpt-4o-mini", "stream": True})
    assert status == 200, text
    assert headers["Content-Type"].startswith("text/event-stream")
    events = [json.loads(line[len("data: "):]) for line in text.split("\n") if line.startswith("data: ")]
    *deltas, final = events
    assert len(deltas) == 20 and all(set(e) == {"delta"} for e in deltas)
    assert final["done"] is True
    assert final["reply"] == "".join(e["delta"] for e in deltas)
    assert final["reply"].startswith("Echo: stream me")
    assert final["usage"] == {"prompt_tokens": 9, "completion_tokens": 20, "total_tokens": 29}
    assert final["conversation"].startswith("conv_") and final["model"] == "gpt-4o-mini"
    [row] = key_rows(clean_db, key, 1)
    assert row["endpoint"] == "api.chat" and row["streamed"] is True and row["status"] == "ok"


def test_a_wrong_key_gets_the_401_envelope(gateway):
    """Same keys as every endpoint: a wrong key is refused with the OpenAI error envelope."""
    status, headers, body = http_json("POST", gateway.base_url + "/api/chat", {"message": "hi"},
                                      {"Authorization": "Bearer sk-not-a-key"})
    assert status == 401
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert headers["WWW-Authenticate"].startswith("Bearer")


def test_another_tenants_conversation_is_not_found(gateway, key):
    """A conversation belongs to its tenant: another tenant's key gets 404, and nothing is billed."""
    status, _, one = chat(gateway, key, {"message": "private words", "model": "gpt-4o-mini"})
    assert status == 200, one
    other = mint(gateway, "other-team")
    status, _, body = chat(gateway, other, {"message": "tell me", "model": "gpt-4o-mini",
                                           "conversation": one["conversation"]})
    assert status == 404
    assert body["error"]["code"] == "conversation_not_found" and body["error"]["param"] == "conversation"


@pytest.mark.parametrize("payload, param", [({}, "message"), ({"message": 5}, "message"),
                                            ({"message": "x", "stream": "yes"}, "stream"),
                                            ({"message": "x", "colour": "red"}, "colour")])
def test_bad_bodies_get_a_400_envelope(gateway, key, payload, param):
    """A missing or mistyped field, or an unknown one, is a 400 naming the field."""
    status, _, body = chat(gateway, key, payload)
    assert status == 400, body
    assert body["error"]["param"] == param and body["error"]["type"] == "invalid_request_error"


def test_api_health_answers_like_health(gateway):
    """GET /api/health is /health under the seed designs' path."""
    status, _, body = http_json("GET", gateway.base_url + "/api/health")
    assert status == 200 and body["status"] == "ok" and body["database"] == "ok" and body["redis"] == "ok"
