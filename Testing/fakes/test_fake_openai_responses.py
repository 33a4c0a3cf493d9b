"""The fake upstream's Responses API (`/v1/responses`) speaks OpenAI's documented format: proven
with the official openai client (its typed objects, its stream event accumulator); and the chat
fake's usage details and tool-result answers."""
from __future__ import annotations

import json
import openai
import pytest

from Testing.fakes.fake_openai import FakeOpenAI

pytestmark = pytest.mark.timeout(30)
TOOLS = [{"type": "function", "name": "get_weather", "parameters": {"type": "object", "properties": {}}}]


@pytest.fixture()
def client(fake_upstream: FakeOpenAI) -> openai.OpenAI:
    return openai.OpenAI(base_url=fake_upstream.base_url, api_key="sk-test", max_retries=0, timeout=10)


def test_response_object_with_usage_details(client):
    """A non-streamed response: echo text, words + 7 input tokens, cached and reasoning tokens
    as the model name scripts them (reasoning included in output_tokens)."""
    resp = client.responses.create(model="fake-chunks-3-cached-4-reasoning-2", input="hello there",
                                   instructions="be brief")
    assert resp.object == "response" and resp.status == "completed"
    assert resp.output_text == "Echo: hello there"
    assert (resp.usage.input_tokens, resp.usage.output_tokens, resp.usage.total_tokens) == (11, 5, 16)
    assert resp.usage.input_tokens_details.cached_tokens == 4
    assert resp.usage.output_tokens_details.reasoning_tokens == 2


def test_streamed_events_accumulate_in_the_sdk(client):
    with client.responses.stream(model="fake-chunks-3", input=[{"role": "user", "content": "hi you"}]) as stream:
        kinds = [event.type for event in stream]
        final = stream.get_final_response()
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert kinds.count("response.output_text.delta") == 3 and kinds[-1] == "response.completed"
    assert final.output_text == "Echo: hi you" and final.usage.input_tokens == 9


def test_tool_call_then_tool_result(client):
    first = client.responses.create(model="fake-tool", input="weather in Paris", tools=TOOLS)
    [call] = first.output
    assert call.type == "function_call" and call.name == "get_weather"
    assert json.loads(call.arguments) == {"query": "weather in Paris", "unit": "celsius"}
    second = client.responses.create(model="fake-tool", tools=TOOLS, input=[
        {"role": "user", "content": "weather in Paris"},
        {"type": "function_call", "call_id": call.call_id, "name": call.name, "arguments": call.arguments},
        {"type": "function_call_output", "call_id": call.call_id, "output": "21 celsius"}])
    assert second.output_text == "Tool said: 21 celsius"


def test_scripted_failure_and_unknown_previous_response(client):
    with pytest.raises(openai.InternalServerError):
        client.responses.create(model="fake-fail-500", input="x")
    with pytest.raises(openai.BadRequestError):
        client.responses.create(model="m", input="x", previous_response_id="resp_x")


def test_chat_usage_details_and_tool_result_answer(client):
    done = client.chat.completions.create(model="fake-chunks-2-cached-3-reasoning-4",
                                          messages=[{"role": "user", "content": "a b c"}])
    assert (done.usage.prompt_tokens, done.usage.completion_tokens) == (10, 6)
    assert done.usage.prompt_tokens_details.cached_tokens == 3
    assert done.usage.completion_tokens_details.reasoning_tokens == 4
    answer = client.chat.completions.create(model="fake-tool", messages=[
        {"role": "user", "content": "x"},
        {"role": "assistant", "tool_calls": [{"id": "c", "type": "function",
                                              "function": {"name": "f", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "c", "content": "sunny"}])
    assert answer.choices[0].message.content == "Tool said: sunny" and answer.choices[0].finish_reason == "stop"


def test_json_schema_requests_get_a_fitting_json_answer(client):
    """Structured output: the answer parses into the schema's pydantic model, both dialects."""
    from pydantic import BaseModel

    class Weather(BaseModel):
        city: str
        celsius: int
        sunny: bool

    chat = client.chat.completions.parse(model="gpt-4o-mini", response_format=Weather,
                                         messages=[{"role": "user", "content": "weather?"}])
    assert chat.choices[0].message.parsed == Weather(city="echo", celsius=1, sunny=True)
    resp = client.responses.parse(model="gpt-4o-mini", input="weather?", text_format=Weather)
    assert resp.output_parsed == Weather(city="echo", celsius=1, sunny=True)
