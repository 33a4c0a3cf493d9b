"""The Responses API through the real gunicorn + gevent gateway, driven by the official openai
client (and the OpenAI Agents SDK) against fake upstreams: answers streamed and not, a
conversation continued with previous_response_id (right after a stream ended), tool calls in
both directions, structured output, stored responses (retrieve, delete, input_items) owned by
a tenant, errors, the native Responses passthrough, and usage rows equal to what each upstream
reported (cached and reasoning tokens included)."""
from __future__ import annotations

import asyncio
import json
import re
import socket
from pathlib import Path
from typing import Iterator

import openai
import pytest
from pydantic import BaseModel

from Testing.conftest import gateway_process, wait_for_rows
from Testing.fakes.fake_openai import FakeOpenAI, expected_content
from Testing.fakes.native import fake_anthropic, fake_gemini, provider_settings  # noqa: F401
from Testing.support import SYSTEM_SECRET, GatewayProcess, http_json

pytestmark = pytest.mark.timeout(120)
PRICING = {"input_per_mtok": "1.00", "output_per_mtok": "2.00"}
TOOLS = [{"type": "function", "name": "get_weather", "description": "Weather in a city",
          "parameters": {"type": "object", "properties": {"query": {"type": "string"},
                                                          "unit": {"type": "string"}}}}]
RESP_ID = re.compile(r"resp_[0-9a-f]{48}")
# model alias -> (provider, upstream model)
MODELS = {
    "chat": ("openai", "gpt-4o-mini"),
    "chat-3": ("openai", "fake-chunks-3"),
    "chat-tool": ("openai", "fake-tool"),
    "chat-details": ("openai", "fake-chunks-3-cached-4-reasoning-2"),
    "chat-fail": ("openai", "fake-fail-500"),
    "chat-die": ("openai", "fake-die-mid-stream"),
    "chat-slow": ("openai", "fake-slow"),
    "native": ("openai-native", "gpt-4o-mini"),
    "native-tool": ("openai-native", "fake-tool"),
    "native-details": ("openai-native", "fake-chunks-3-cached-4-reasoning-2"),
    "claude-cache": ("anthropic", "claude-cache"),
    "claude-tool": ("anthropic", "claude-tool"),
    "gemini-tool": ("gemini", "gemini-tool"),
    "gemini-cache-think": ("gemini", "gemini-cache-think"),
}


@pytest.fixture(scope="module")
def models_path(tmp_path_factory, fake_upstream: FakeOpenAI, fake_anthropic, fake_gemini) -> Path:  # noqa: F811
    openai_settings = {"type": "openai", "base_url": fake_upstream.base_url, "api_key_env": "TEST_UPSTREAM_KEY",
                       "timeout_s": 3, "connect_timeout_s": 2}
    providers = {"openai": openai_settings, "openai-native": {**openai_settings, "responses": True},
                 "anthropic": provider_settings("anthropic", fake_anthropic),
                 "gemini": provider_settings("gemini", fake_gemini)}
    models = {alias: {"deployments": [{"provider": p, "model": m}], "context_window": 100000,
                      "max_output_tokens": 1000, "pricing": PRICING} for alias, (p, m) in MODELS.items()}
    path = tmp_path_factory.mktemp("responses") / "models.json"
    path.write_text(json.dumps({"providers": providers, "models": models}, indent=2))
    return path


@pytest.fixture(scope="module")
def gateway(pg_url, models_path, tmp_path_factory) -> Iterator[GatewayProcess]:
    """The gateway of this module: its models point at the fakes of every provider type."""
    yield from gateway_process(pg_url, models_path, tmp_path_factory.mktemp("responses-gateway"))


def mint(gateway: GatewayProcess, tenant: str) -> dict:
    status, _, body = http_json("POST", gateway.base_url + "/v1/api-keys", {"name": "responses", "tenant": tenant},
                                {"X-System-Secret": SYSTEM_SECRET})
    assert status == 201, body
    return body


@pytest.fixture(scope="module")
def key(gateway) -> dict:
    return mint(gateway, "responses-tenant")


@pytest.fixture(scope="module")
def client(gateway, key) -> openai.OpenAI:
    return openai.OpenAI(api_key=key["key"], base_url=gateway.base_url + "/v1", max_retries=0, timeout=30)


@pytest.fixture(scope="module")
def other_client(gateway) -> openai.OpenAI:
    other = mint(gateway, "another-tenant")
    return openai.OpenAI(api_key=other["key"], base_url=gateway.base_url + "/v1", max_retries=0, timeout=30)


def row(engine, request_id: str) -> dict:
    [found] = wait_for_rows(engine, 1, "request_id = :r", {"r": request_id})
    return found


def test_create_answers_a_response_object_and_records_usage(client, pg_engine):
    """responses.create on a chat-completions upstream: the echo text as output_text, OpenAI's
    response object, usage equal to the upstream's, one usage row with endpoint 'responses'."""
    raw = client.responses.with_raw_response.create(model="chat", input="hello gateway", instructions="be brief",
                                                    metadata={"team": "a"})
    resp = raw.parse()
    messages = [{"role": "user", "content": "hello gateway"}]
    assert RESP_ID.fullmatch(resp.id) and resp.object == "response" and resp.status == "completed"
    assert resp.output_text == expected_content(messages)
    assert resp.instructions == "be brief" and resp.metadata == {"team": "a"}
    assert (resp.usage.input_tokens, resp.usage.output_tokens, resp.usage.total_tokens) == (11, 20, 31)
    found = row(pg_engine, raw.headers["x-request-id"])
    assert (found["prompt_tokens"], found["completion_tokens"], found["endpoint"], found["streamed"]) == (
        11, 20, "responses", False)


def test_stream_emits_the_event_sequence_and_final_usage(client, pg_engine):
    raw = client.responses.with_raw_response.create(model="chat-3", input="hello gateway", stream=True)
    events = list(raw.parse())
    kinds = [e.type for e in events]
    assert kinds == ["response.created", "response.in_progress", "response.output_item.added",
                     "response.content_part.added", "response.output_text.delta", "response.output_text.delta",
                     "response.output_text.delta", "response.output_text.done", "response.content_part.done",
                     "response.output_item.done", "response.completed"]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    final = events[-1].response
    assert final.output_text == "Echo: hello gateway" and final.usage.input_tokens == 9
    assert final.usage.output_tokens == 3 and final.id == events[0].response.id
    found = row(pg_engine, raw.headers["x-request-id"])
    assert (found["prompt_tokens"], found["completion_tokens"], found["streamed"]) == (9, 3, True)


def test_sdk_stream_helper_accumulates_the_final_response(client):
    with client.responses.stream(model="chat-3", input="hi there") as stream:
        deltas = [e.delta for e in stream if e.type == "response.output_text.delta"]
        final = stream.get_final_response()
    assert "".join(deltas) == final.output_text == "Echo: hi there"


def test_two_turn_conversation_right_after_a_stream(client, fake_upstream):
    """The second turn names the first (streamed) response as soon as its stream ended: the
    upstream gets the first turn's input and answer before the new input."""
    with client.responses.stream(model="chat-3", input="first question") as stream:
        first = stream.get_final_response()
    second = client.responses.create(model="chat-3", input="second question", previous_response_id=first.id)
    assert second.previous_response_id == first.id and second.output_text == "Echo: second question"
    sent = fake_upstream.chat_requests()[-1]["body"]["messages"]
    assert sent == [{"role": "user", "content": "first question"},
                    {"role": "assistant", "content": "Echo: first question"},
                    {"role": "user", "content": "second question"}]
    third = client.responses.create(model="chat-3", input="third", previous_response_id=second.id)
    assert len(fake_upstream.chat_requests()[-1]["body"]["messages"]) == 5 and third.status == "completed"


@pytest.mark.parametrize("model", ["chat-tool", "native-tool", "claude-tool", "gemini-tool"])
def test_tool_call_both_ways(client, model):
    """The model calls a function tool (a function_call item), the client sends the result back
    as function_call_output after previous_response_id, the model answers from it: through the
    chat translation for each provider type, and natively."""
    first = client.responses.create(model=model, input="weather in Paris", tools=TOOLS)
    [call] = [item for item in first.output if item.type == "function_call"]
    assert call.name == "get_weather" and call.call_id and call.status == "completed"
    assert json.loads(call.arguments) == {"query": "weather in Paris", "unit": "celsius"}
    second = client.responses.create(model=model, tools=TOOLS, previous_response_id=first.id, input=[
        {"type": "function_call_output", "call_id": call.call_id, "output": "21 celsius"}])
    assert "Tool said: " in second.output_text and "21 celsius" in second.output_text


def test_custom_tool_as_codex_sends_it(client, fake_upstream):
    """A custom (freeform) tool, as Codex CLI declares apply_patch: the upstream gets a function
    tool taking {"input"}, the client a custom_tool_call item, and its custom_tool_call_output
    goes back as the tool's result."""
    tools = [{"type": "custom", "name": "apply_patch", "description": "Edit files with a patch"}]
    first = client.responses.create(model="chat-tool", input="patch the file", tools=tools)
    [call] = first.output
    assert call.type == "custom_tool_call" and call.name == "apply_patch" and call.call_id
    assert json.loads(call.input) == {"query": "patch the file", "unit": "celsius"}  # the fake's arguments
    sent = fake_upstream.chat_requests()[-1]["body"]["tools"]
    assert sent[0]["function"]["parameters"]["required"] == ["input"]
    second = client.responses.create(model="chat-tool", tools=tools, previous_response_id=first.id, input=[
        {"type": "custom_tool_call_output", "call_id": call.call_id, "output": "Done!"}])
    assert second.output_text == "Tool said: Done!"


def test_streamed_tool_call(client):
    with client.responses.stream(model="chat-tool", input="weather in Rome", tools=TOOLS) as stream:
        kinds = [e.type for e in stream]
        final = stream.get_final_response()
    assert "response.function_call_arguments.delta" in kinds and "response.function_call_arguments.done" in kinds
    [call] = final.output
    assert call.type == "function_call" and json.loads(call.arguments)["query"] == "weather in Rome"


class Weather(BaseModel):
    city: str
    celsius: int
    sunny: bool


@pytest.mark.parametrize("model", ["chat", "native"])
def test_structured_output_with_parse(client, fake_upstream, model):
    resp = client.responses.parse(model=model, input="weather in Paris?", text_format=Weather)
    assert resp.output_parsed == Weather(city="echo", celsius=1, sunny=True)


def test_retrieve_input_items_and_delete(client):
    created = client.responses.create(model="chat-3", input=[
        {"role": "user", "content": "one"}, {"role": "user", "content": [{"type": "input_text", "text": "two"}]}])
    fetched = client.responses.retrieve(created.id)
    assert fetched.id == created.id and fetched.output_text == created.output_text == "Echo: two Echo:"
    items = client.responses.input_items.list(created.id, order="asc")
    assert [i.content[0].text for i in items.data] == ["one", "two"]
    assert items.data[0].type == "message" and items.data[0].id.startswith("msg_")
    assert client.responses.input_items.list(created.id).data[0].content[0].text == "two"  # desc by default
    client.responses.delete(created.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(created.id)


def test_input_items_pages(client, gateway, key):
    created = client.responses.create(model="chat-3", input=[{"role": "user", "content": w} for w in ("a", "b", "c")])
    page = client.responses.input_items.list(created.id, order="asc", limit=2)
    assert [i.content[0].text for i in page.data] == ["a", "b"] and page.has_more is True
    assert (page.first_id, page.last_id) == (page.data[0].id, page.data[1].id)
    rest = client.responses.input_items.list(created.id, order="asc", limit=2, after=page.last_id)
    assert [i.content[0].text for i in rest.data] == ["c"] and rest.has_more is False
    status, _, answer = http_json("GET", f"{gateway.base_url}/v1/responses/{created.id}/input_items?limit=0",
                                  headers={"Authorization": f"Bearer {key['key']}"})
    assert status == 400 and answer["error"]["param"] == "limit"


def test_store_false_is_not_kept(client):
    created = client.responses.create(model="chat-3", input="x", store=False)
    assert created.store is False
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(created.id)


def test_another_tenant_sees_nothing(client, other_client):
    created = client.responses.create(model="chat-3", input="secret")
    for call in (lambda: other_client.responses.retrieve(created.id),
                 lambda: other_client.responses.delete(created.id),
                 lambda: other_client.responses.input_items.list(created.id)):
        with pytest.raises(openai.NotFoundError):
            call()
    with pytest.raises(openai.BadRequestError) as err:
        other_client.responses.create(model="chat-3", input="x", previous_response_id=created.id)
    assert err.value.body["param"] == "previous_response_id"
    assert client.responses.retrieve(created.id).output_text == "Echo: secret Echo:"


@pytest.mark.parametrize("extra, status, param", [
    ({"input": 7}, 400, "input"),
    ({"input": [{"role": "user", "content": [{"type": "input_file", "file_id": "f"}]}]}, 400,
     "input[0].content[0].type"),
    ({"input": "x", "tools": [{"type": "web_search"}]}, 400, "tools[0].type"),
    ({"input": "x", "temperature": "hot"}, 400, "temperature"),
    ({"input": "x", "max_output_tokens": 0}, 400, "max_output_tokens"),
    ({"input": "x", "model": "no-such-model"}, 404, "model"),
    ({"input": "x", "store": "yes"}, 400, "store"),
    ({"input": "x", "metadata": {str(i): "v" for i in range(17)}}, 400, "metadata"),
    ({"input": "x", "text": {"format": {"type": "json_schema", "name": "n"}}}, 400, "text.format.schema"),
    ({"input": "x", "previous_response_id": "resp_unknown"}, 400, "previous_response_id"),
])
def test_invalid_requests_get_the_error_envelope(gateway, key, extra, status, param):
    body = {"model": "chat", **extra}
    got, _, answer = http_json("POST", gateway.base_url + "/v1/responses", body,
                               {"Authorization": f"Bearer {key['key']}"})
    assert got == status and answer["error"]["param"] == param and answer["error"]["message"]


def test_unknown_fields_are_accepted(client):
    resp = client.responses.create(model="chat-3", input="x", extra_body={"truncation": "auto", "include": [],
                                                                          "some_future_field": {"a": 1}})
    assert resp.status == "completed"


def test_short_path_without_v1(gateway, key):
    status, _, answer = http_json("POST", gateway.base_url + "/responses", {"model": "chat-3", "input": "x"},
                                  {"Authorization": f"Bearer {key['key']}"})
    assert status == 200 and answer["object"] == "response"


def test_a_stream_the_client_hung_up_on_is_stored_as_incomplete(gateway, key, client, pg_engine):
    """The client reads response.created and leaves: the response is kept with status
    incomplete (found by the next request even though it is saved after the hang-up), and the
    usage row says client_disconnected."""
    body = json.dumps({"model": "chat-slow", "input": "x", "stream": True}).encode()
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=10) as sock:
        sock.sendall(b"POST /v1/responses HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Authorization: Bearer " + key["key"].encode() + b"\r\nContent-Length: "
                     + str(len(body)).encode() + b"\r\n\r\n" + body)
        seen = b""
        while b"response.in_progress" not in seen:
            seen += sock.recv(65536)
    request_id = re.search(rb"x-request-id: (\S+)", seen, re.I).group(1).decode()
    response_id = RESP_ID.search(seen.decode()).group(0)
    assert client.responses.retrieve(response_id).status == "incomplete"
    assert row(pg_engine, request_id)["status"] == "client_disconnected"


def test_upstream_failure_before_the_answer_is_an_error_status(client):
    with pytest.raises(openai.InternalServerError) as err:
        client.responses.create(model="chat-fail", input="x")
    assert err.value.status_code == 502


def test_upstream_failure_mid_stream_ends_with_response_failed(client):
    events = list(client.responses.create(model="chat-die", input="x", stream=True))
    assert [e.type for e in events][-2:] == ["error", "response.failed"]
    assert events[-1].response.status == "failed"


def test_native_upstream_is_called_with_the_responses_body(client, fake_upstream):
    """A provider declaring "responses": true gets POST /responses with the whole conversation
    and store false; the client sees the gateway's own response id."""
    first = client.responses.create(model="native", input="hello native", instructions="be brief")
    second = client.responses.create(model="native", input="again", previous_response_id=first.id)
    sent = fake_upstream.responses_requests()[-1]["body"]
    assert sent["store"] is False and "previous_response_id" not in sent and sent["model"] == "gpt-4o-mini"
    assert [(i.get("role"), i.get("type")) for i in sent["input"]] == [
        ("user", "message"), ("assistant", "message"), ("user", "message")]
    assert RESP_ID.fullmatch(second.id) and second.previous_response_id == first.id
    with client.responses.stream(model="native", input="hello stream") as stream:
        final = stream.get_final_response()
    assert RESP_ID.fullmatch(final.id) and final.output_text.startswith("Echo: hello stream")
    assert client.responses.retrieve(final.id).output_text == final.output_text


# alias -> (input, output, cached, cache writes, reasoning) as the fake upstream reports them for
# "hello gateway"; None where that upstream reports no such figure (the row keeps it unknown)
UPSTREAM_USAGE = {
    "chat-details": (9, 5, 4, None, 2),          # OpenAI chat usage: cached-4, reasoning-2 (in the output)
    "native-details": (9, 5, 4, None, 2),        # the same through the native Responses API
    "claude-cache": (120, 12, 100, 11, None),    # 9 fresh + 11 cache writes + 100 cache reads
    "gemini-cache-think": (9, 15, 5, None, 5),   # 10 candidates + 5 thoughts
}


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
@pytest.mark.parametrize("model", list(UPSTREAM_USAGE))
def test_usage_equals_the_upstreams_for_every_provider_type(client, pg_engine, model, stream):
    raw = client.responses.with_raw_response.create(model=model, input="hello gateway", stream=stream)
    resp = [e for e in raw.parse()][-1].response if stream else raw.parse()
    prompt, completion, cached, writes, reasoning = UPSTREAM_USAGE[model]
    usage = resp.usage
    assert (usage.input_tokens, usage.output_tokens, usage.total_tokens) == (prompt, completion, prompt + completion)
    assert usage.input_tokens_details.cached_tokens == cached
    assert usage.input_tokens_details.cache_write_tokens == (writes or 0)
    assert usage.output_tokens_details.reasoning_tokens == (reasoning or 0)
    found = row(pg_engine, raw.headers["x-request-id"])
    assert (found["prompt_tokens"], found["completion_tokens"], found["cached_tokens"], found["cache_write_tokens"],
            found["reasoning_tokens"], found["endpoint"]) == (prompt, completion, cached, writes, reasoning, "responses")


def test_openai_agents_sdk_runs_a_function_tool(gateway, key):
    """The OpenAI Agents SDK in its default mode (the Responses API) calls the model, runs the
    function tool it asked for, and finishes with the model's answer to the tool's result."""
    from agents import Agent, Runner, function_tool, set_default_openai_client, set_tracing_disabled

    set_tracing_disabled(True)
    calls: list[tuple[str, str]] = []

    @function_tool
    def get_weather(query: str, unit: str) -> str:
        """Weather for a query."""
        calls.append((query, unit))
        return f"21 {unit}"

    async def run() -> str:
        client = openai.AsyncOpenAI(api_key=key["key"], base_url=gateway.base_url + "/v1", max_retries=0)
        set_default_openai_client(client, use_for_tracing=False)  # the default API: Responses
        agent = Agent(name="weather", instructions="Answer with the tool.", tools=[get_weather], model="chat-tool")
        result = await Runner.run(agent, "weather in Paris")
        await client.close()
        return result.final_output

    assert asyncio.run(run()) == "Tool said: 21 celsius"
    assert calls == [("weather in Paris", "celsius")]
