"""The Messages request -> chat-completions request translator: every block type, tools and
tool_choice, sampling fields, and a 400 naming the field for what cannot be translated."""
from __future__ import annotations

import pytest

from app.errors import InvalidRequest
from app.translate.anthropic_to_chat import AnthropicOnly, to_chat_request

WEATHER = {"name": "get_weather", "description": "Weather in a city",
           "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}}}


def req(**fields) -> dict:
    return {"model": "claude-x", "max_tokens": 100, "messages": [{"role": "user", "content": "hi"}], **fields}


def test_string_system_and_text_are_chat_messages():
    """A string system prompt becomes the system message; string content stays a string."""
    chat = to_chat_request(req(system="be brief"))
    assert chat == {"model": "claude-x", "max_tokens": 100,
                    "messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]}


def test_system_text_blocks_are_joined_and_cache_control_dropped():
    """System text blocks (with cache_control marks) are one system message, joined by newlines."""
    chat = to_chat_request(req(system=[{"type": "text", "text": "one", "cache_control": {"type": "ephemeral"}},
                                       {"type": "text", "text": "two"}]))
    assert chat["messages"][0] == {"role": "system", "content": "one\ntwo"}


def test_images_base64_and_url_become_image_url_parts():
    """Base64 images become data: URLs, url images stay URLs, next to the text parts."""
    content = [{"type": "text", "text": "what is this?"},
               {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0K"}},
               {"type": "image", "source": {"type": "url", "url": "https://example.com/cat.jpg"}}]
    chat = to_chat_request(req(messages=[{"role": "user", "content": content}]))
    assert chat["messages"] == [{"role": "user", "content": [
        {"type": "text", "text": "what is this?"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0K"}},
        {"type": "image_url", "image_url": {"url": "https://example.com/cat.jpg"}}]}]


def test_tool_use_and_tool_result_round_trip():
    """Assistant tool_use blocks become tool_calls (input as a JSON string); the user's
    tool_result blocks become tool messages placed before the user's remaining text; an
    is_error result is marked; thinking blocks of earlier turns are dropped."""
    messages = [
        {"role": "user", "content": "weather in Paris?"},
        {"role": "assistant", "content": [
            {"type": "thinking", "thinking": "hmm", "signature": "sig"},
            {"type": "text", "text": "Let me check."},
            {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}},
            {"type": "tool_use", "id": "toolu_2", "name": "get_weather", "input": {"city": "Lyon"}}]},
        {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "toolu_1", "content": "18C"},
            {"type": "tool_result", "tool_use_id": "toolu_2", "content": [{"type": "text", "text": "down"}],
             "is_error": True},
            {"type": "text", "text": "and tomorrow?"}]},
    ]
    chat = to_chat_request(req(messages=messages, tools=[WEATHER]))
    assert chat["messages"] == [
        {"role": "user", "content": "weather in Paris?"},
        {"role": "assistant", "content": "Let me check.", "tool_calls": [
            {"id": "toolu_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
            {"id": "toolu_2", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Lyon"}'}}]},
        {"role": "tool", "tool_call_id": "toolu_1", "content": "18C"},
        {"role": "tool", "tool_call_id": "toolu_2", "content": "Error: down"},
        {"role": "user", "content": "and tomorrow?"},
    ]
    assert chat["tools"] == [{"type": "function", "function": {
        "name": "get_weather", "parameters": WEATHER["input_schema"], "description": "Weather in a city"}}]


def test_assistant_with_only_tool_use_has_null_content():
    chat = to_chat_request(req(messages=[
        {"role": "user", "content": "x"},
        {"role": "assistant", "content": [{"type": "tool_use", "id": "t", "name": "f", "input": {}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t"}]}]))
    assert chat["messages"][1] == {"role": "assistant", "content": None, "tool_calls": [
        {"id": "t", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}
    assert chat["messages"][2] == {"role": "tool", "tool_call_id": "t", "content": ""}


@pytest.mark.parametrize("choice, expected, parallel", [
    ({"type": "auto"}, "auto", None),
    ({"type": "any"}, "required", None),
    ({"type": "none"}, "none", None),
    ({"type": "tool", "name": "get_weather"}, {"type": "function", "function": {"name": "get_weather"}}, None),
    ({"type": "auto", "disable_parallel_tool_use": True}, "auto", False),
])
def test_tool_choice_mapping(choice, expected, parallel):
    """auto/any/tool/none map to auto/required/{function}/none; disable_parallel_tool_use to
    parallel_tool_calls=false."""
    chat = to_chat_request(req(tools=[WEATHER], tool_choice=choice))
    assert chat["tool_choice"] == expected
    assert chat.get("parallel_tool_calls") is parallel


def test_tool_choice_without_tools_is_not_sent():
    """OpenAI refuses a tool_choice without tools: it is left out."""
    assert "tool_choice" not in to_chat_request(req(tool_choice={"type": "auto"}))


def test_sampling_stop_metadata_and_stream():
    """temperature/top_p/top_k pass on, stop_sequences become stop, metadata.user_id becomes
    user, and a stream asks the upstream for its usage."""
    chat = to_chat_request(req(temperature=0.5, top_p=0.9, top_k=40, stop_sequences=["END", "STOP"],
                               metadata={"user_id": "u-1"}, stream=True))
    assert chat["temperature"] == 0.5 and chat["top_p"] == 0.9 and chat["top_k"] == 40
    assert chat["stop"] == ["END", "STOP"] and chat["user"] == "u-1"
    assert chat["stream"] is True and chat["stream_options"] == {"include_usage": True}


@pytest.mark.parametrize("fields, param", [
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "system", "content": "x"}]}, "messages.0.role"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages.0.content"),
    ({"messages": [{"role": "user", "content": [{"type": "document", "source": {}}]}]}, "messages.0.content.0"),
    ({"messages": [{"role": "user", "content": [{"type": "image", "source": {"type": "file"}}]}]},
     "messages.0.content.0.source"),
    ({"messages": [{"role": "user", "content": [{"type": "tool_result"}]}]}, "messages.0.content.0"),
    ({"system": [{"type": "image"}]}, "system.0"),
    ({"tools": [{"type": "web_search_20250305", "name": "web_search"}]}, "tools.0"),
    ({"tools": [WEATHER], "tool_choice": {"type": "sometimes"}}, "tool_choice"),
])
def test_untranslatable_requests_are_400_naming_the_field(fields, param):
    with pytest.raises(InvalidRequest) as exc:
        to_chat_request(req(**fields))
    assert exc.value.status == 400 and exc.value.param == param


def test_anthropic_only_content_is_collected_when_asked():
    """With a `skipped` list, documents and server tools are left out of the chat request and
    collected (the request can still go natively to Anthropic); malformed input still raises."""
    skipped: list = []
    chat = to_chat_request(req(messages=[{"role": "user", "content": [
        {"type": "document", "source": {"type": "text", "media_type": "text/plain", "data": "doc"}},
        {"type": "text", "text": "summarise"}]}],
        tools=[{"type": "web_search_20250305", "name": "web_search"}, WEATHER]), skipped)
    assert chat["messages"] == [{"role": "user", "content": "summarise"}]
    assert [t["function"]["name"] for t in chat["tools"]] == ["get_weather"]
    assert [e.param for e in skipped] == ["messages.0.content.0", "tools.0"]
    assert all(isinstance(e, AnthropicOnly) and e.status == 400 for e in skipped)
    with pytest.raises(InvalidRequest):
        to_chat_request(req(messages=[{"role": "robot", "content": "x"}]), [])
