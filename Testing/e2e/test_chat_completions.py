"""Chat completions through a real gunicorn + gevent gateway, driven by the official openai
client, with a real HTTP fake of the OpenAI API upstream and real PostgreSQL billing."""
from __future__ import annotations

import asyncio
import json
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from decimal import Decimal
from urllib.parse import urlencode

import openai
import pytest

from Testing.conftest import key_rows
from Testing.fakes.fake_openai import prompt_tokens_for
from Testing.support import SYSTEM_SECRET, UPSTREAM_KEY, http_json, open_chat_stream

PRICE_IN, PRICE_OUT = Decimal("0.15"), Decimal("0.60")
MESSAGES = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello gateway"}]


@pytest.fixture
def key(gateway, clean_db) -> dict:
    """A fresh key; `since` is a time after the tables were emptied and before the key existed."""
    since = datetime.now(timezone.utc)
    status, _, body = http_json("POST", gateway.base_url + "/v1/api-keys",
                                {"name": "e2e", "tenant": "e2e-tenant"}, {"X-System-Secret": SYSTEM_SECRET})
    assert status == 201, body
    return {**body, "since": since}


@pytest.fixture
def client(gateway, key) -> openai.OpenAI:
    return openai.OpenAI(api_key=key["key"], base_url=gateway.base_url + "/v1", max_retries=0, timeout=30)


def rows_for(engine, key: dict, count: int) -> list[dict]:
    return key_rows(engine, key, count)


def expected_cost(prompt: int, completion: int) -> Decimal:
    return (PRICE_IN * prompt + PRICE_OUT * completion) / Decimal(1_000_000)


def test_non_streaming_answer_and_exact_usage_row(client, key, clean_db, fake_upstream):
    """A completion returns the upstream's answer and bills exactly the upstream's usage."""
    raw = client.chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=MESSAGES)
    completion = raw.parse()
    assert completion.object == "chat.completion"
    assert completion.choices[0].message.content.startswith("Echo:")
    request_id = raw.headers["x-request-id"]
    [row] = rows_for(clean_db, key, 1)
    assert row["request_id"] == request_id
    assert (row["prompt_tokens"], row["completion_tokens"], row["total_tokens"]) == (
        completion.usage.prompt_tokens, completion.usage.completion_tokens, completion.usage.total_tokens)
    assert row["prompt_tokens"] == prompt_tokens_for(MESSAGES)
    assert row["cost_usd"] == expected_cost(row["prompt_tokens"], row["completion_tokens"])
    assert (row["model"], row["provider"], row["upstream_model"]) == ("gpt-4o-mini", "openai", "gpt-4o-mini")
    assert row["status"] == "ok" and row["streamed"] is False and row["latency_ms"] is not None


def test_request_sent_upstream_passes_unknown_fields_and_uses_provider_key(client, fake_upstream):
    """Unknown OpenAI fields reach the provider untouched, with the operator's key and headers."""
    fake_upstream.reset()
    client.chat.completions.create(
        model="gpt-4o-mini", messages=MESSAGES, seed=7, response_format={"type": "json_object"},
        extra_body={"custom_vendor_field": {"a": [1, 2]}}, temperature=0.2)
    [req] = [r for r in fake_upstream.requests() if r["path"].endswith("/chat/completions")]
    body = req["body"]
    assert body["seed"] == 7 and body["response_format"] == {"type": "json_object"}
    assert body["custom_vendor_field"] == {"a": [1, 2]} and body["temperature"] == 0.2
    assert body["model"] == "gpt-4o-mini" and body["messages"] == MESSAGES
    assert req["headers"]["authorization"] == f"Bearer {UPSTREAM_KEY}"
    assert req["headers"]["x-test-header"] == "yes"


def test_async_client(gateway, key):
    """The async openai client works the same (non-streaming and streaming)."""
    async def run() -> tuple[str, int]:
        aclient = openai.AsyncOpenAI(api_key=key["key"], base_url=gateway.base_url + "/v1", max_retries=0)
        done = await aclient.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
        stream = await aclient.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, stream=True)
        pieces = [c.choices[0].delta.content async for c in stream if c.choices and c.choices[0].delta.content]
        await aclient.close()
        return done.choices[0].message.content, len(pieces)

    content, n_pieces = asyncio.run(run())
    assert content.startswith("Echo:") and n_pieces == 20


def test_streaming_with_include_usage(client, key, clean_db, fake_upstream):
    """A stream forwards every chunk, ends with [DONE], and gives the usage chunk when asked."""
    fake_upstream.reset()
    chunks = list(client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, stream=True,
                                                 stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.startswith("Echo:")
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 20
    [row] = rows_for(clean_db, key, 1)
    assert row["streamed"] is True and row["status"] == "ok"
    assert (row["prompt_tokens"], row["completion_tokens"]) == (
        chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens)
    assert row["ttft_ms"] is not None and row["ttft_ms"] <= row["latency_ms"]


def test_streaming_usage_chunk_only_when_asked(client, key, clean_db, fake_upstream):
    """The gateway always asks the upstream for usage (to bill it) but forwards it only on request."""
    fake_upstream.reset()
    chunks = list(client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, stream=True))
    assert all(c.choices for c in chunks), "a usage-only chunk leaked to a client that did not ask"
    sent = fake_upstream.requests()[-1]["body"]
    assert sent["stream_options"] == {"include_usage": True}
    [row] = rows_for(clean_db, key, 1)
    assert row["completion_tokens"] == 20 and row["prompt_tokens"] == prompt_tokens_for(MESSAGES)


def test_raw_sse_format(gateway, key):
    """The wire format is text/event-stream with `data:` events and a final `data: [DONE]`."""
    sock = open_chat_stream(gateway.port, key["key"],
                            {"model": "chunks-3", "messages": MESSAGES, "stream": True}, close=True)
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    sock.close()
    head, _, payload = data.partition(b"\r\n\r\n")
    assert b"text/event-stream" in head and b"no-cache" in head.lower()
    assert b"data: [DONE]" in payload
    assert payload.count(b"data: {") == 5  # role chunk, 3 content chunks, finish chunk


def test_usage_rows_equal_upstream_usage_for_many_requests(gateway, key, clean_db, client):
    """N concurrent completions leave exactly N rows whose sums equal what the upstream reported."""
    n = 24

    request_ids: set[str] = set()

    def call(i: int):
        messages = [{"role": "user", "content": f"request {i} " * (i + 1)}]
        if i % 2:
            raw = client.chat.completions.with_raw_response.create(
                model="gpt-4o-mini", messages=messages, stream=True, stream_options={"include_usage": True})
            request_ids.add(raw.headers["x-request-id"])
            return list(raw.parse())[-1].usage
        raw = client.chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=messages)
        request_ids.add(raw.headers["x-request-id"])
        return raw.parse().usage

    with ThreadPoolExecutor(8) as pool:
        usages = list(pool.map(call, range(n)))
    assert len(request_ids) == n
    rows = rows_for(clean_db, key, n)
    # Exactly n: every row's request_id is one of the n answers' ids, and a request_id has one
    # row (the usage store's key), so a late duplicate cannot appear after this read.
    assert len(rows) == n and {r["request_id"] for r in rows} == request_ids
    assert sum(r["prompt_tokens"] for r in rows) == sum(u.prompt_tokens for u in usages)
    assert sum(r["completion_tokens"] for r in rows) == sum(u.completion_tokens for u in usages)
    assert len({r["request_id"] for r in rows}) == n
    total_cost = sum(r["cost_usd"] for r in rows)
    assert total_cost == expected_cost(sum(u.prompt_tokens for u in usages),
                                       sum(u.completion_tokens for u in usages))

    headers = {"Authorization": f"Bearer {key['key']}"}
    query = urlencode({"group_by": "model", "start": key["since"].isoformat()})
    status, _, report = http_json("GET", gateway.base_url + "/v1/usage?" + query, headers=headers)
    assert status == 200
    assert report["requests"] == n
    assert report["prompt_tokens"] == sum(r["prompt_tokens"] for r in rows)
    assert report["total_tokens"] == sum(r["total_tokens"] for r in rows)
    assert Decimal(report["cost_usd"]) == total_cost
    assert report["data"] == [{"model": "gpt-4o-mini", "requests": n, "prompt_tokens": report["prompt_tokens"],
                               "completion_tokens": report["completion_tokens"],
                               "total_tokens": report["total_tokens"], "cost_usd": report["cost_usd"],
                               "cache_hits": 0, "saved_cost_usd": "0"}]


@pytest.mark.parametrize("model,status,error_type", [
    ("fail-500", 502, "unavailable"),
    ("hang", 504, "timeout"),
    ("fail-429", 429, "rate_limited"),
    ("fail-401", 502, "auth"),
    ("fail-400", 400, "bad_request"),
    ("context-too-long", 400, "context_too_long"),
])
def test_upstream_failure_before_any_byte(gateway, key, clean_db, model, status, error_type):
    """An upstream failure before any byte: the client gets the OpenAI envelope with the mapped
    status, the upstream key never shows, and exactly one error row is written."""
    for stream in (False, True):
        code, headers, body = http_json(
            "POST", gateway.base_url + "/v1/chat/completions",
            {"model": model, "messages": MESSAGES, "stream": stream},
            {"Authorization": f"Bearer {key['key']}"})
        assert code == status, body
        assert set(body["error"]) == {"message", "type", "param", "code"}
        assert UPSTREAM_KEY not in json.dumps(body)
        if status == 429:
            assert "Retry-After" in headers
    rows = rows_for(clean_db, key, 2)
    assert len(rows) == 2
    for row in rows:
        assert row["status"] == "error" and row["error_type"] == error_type
        assert row["completion_tokens"] == 0 and row["cost_usd"] == 0


def test_upstream_dies_mid_stream(client, key, clean_db):
    """When the upstream dies after bytes were sent, the stream ends with an error event, and the
    row bills what was streamed (counted with tiktoken, since no usage arrived)."""
    received: list[str] = []
    with pytest.raises(openai.APIError):
        for chunk in client.chat.completions.create(model="die-mid-stream", messages=MESSAGES, stream=True):
            if chunk.choices and chunk.choices[0].delta.content:
                received.append(chunk.choices[0].delta.content)
    [row] = rows_for(clean_db, key, 1)
    assert row["status"] == "error" and row["error_type"] == "unavailable" and row["streamed"] is True
    # the fake dies after its role event and 4 content pieces: "Echo: hello gateway Echo:"
    assert "".join(received) == "Echo: hello gateway Echo:"
    assert (row["prompt_tokens"], row["completion_tokens"]) == (15, 6)  # cl100k_base counts
    assert row["cost_usd"] == expected_cost(row["prompt_tokens"], row["completion_tokens"])


def test_client_disconnect_mid_stream_is_recorded(gateway, key, clean_db):
    """A client hanging up mid-stream leaves one row, status client_disconnected, billed with
    the provider's usage (the gateway reads on for it after the hang-up: the fake generates
    its 20 pieces whoever reads them)."""
    sock = open_chat_stream(gateway.port, key["key"], {"model": "slow", "messages": MESSAGES, "stream": True})
    data = b""
    while data.count(b"data: {") < 4:
        data += sock.recv(4096)
    sock.close()
    [row] = rows_for(clean_db, key, 1)
    assert row["status"] == "client_disconnected" and row["streamed"] is True
    assert (row["completion_tokens"], row["usage_estimated"]) == (20, False)
    assert row["cost_usd"] == expected_cost(row["prompt_tokens"], row["completion_tokens"])


def test_no_usage_from_upstream_is_counted_with_tiktoken(client, key, clean_db):
    """An upstream that reports no usage is billed by tiktoken counts of prompt and answer."""
    done = client.chat.completions.create(model="no-usage", messages=MESSAGES)
    [row] = rows_for(clean_db, key, 1)
    assert done.choices[0].message.content == " ".join(["Echo: hello gateway"] * 6 + ["Echo: hello"])
    assert (row["prompt_tokens"], row["completion_tokens"]) == (15, 27)  # cl100k_base counts


def test_tool_calls_pass_through(client, key):
    """Tool-call answers (streamed argument deltas included) reach the client intact."""
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    done = client.chat.completions.create(model="tool", messages=MESSAGES, tools=tools)
    assert done.choices[0].finish_reason == "tool_calls"
    args = json.loads(done.choices[0].message.tool_calls[0].function.arguments)
    streamed = ""
    for chunk in client.chat.completions.create(model="tool", messages=MESSAGES, tools=tools, stream=True):
        for call in (chunk.choices[0].delta.tool_calls or []) if chunk.choices else []:
            streamed += call.function.arguments or ""
    assert json.loads(streamed) == args


def test_unknown_model_and_simulator(client):
    """Unknown models get 404 model_not_found; the offline `demo` simulator answers."""
    with pytest.raises(openai.NotFoundError) as err:
        client.chat.completions.create(model="no-such-model", messages=MESSAGES)
    assert err.value.code == "model_not_found"
    done = client.chat.completions.create(model="demo", messages=MESSAGES, max_tokens=5)
    assert done.choices[0].message.content.startswith("Simulated") and done.usage.completion_tokens == 5
