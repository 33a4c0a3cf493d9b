"""Responses request -> chat request: every supported input shape, and a 400 naming the param
for what chat completions cannot express."""
from __future__ import annotations

import pytest

from app.errors import InvalidRequest
from app.translate.responses_to_chat import items_to_messages, normalise_input, to_chat


def chat_for(body: dict) -> dict:
    return to_chat(body, normalise_input(body["input"]))


def test_string_input_with_instructions_becomes_system_and_user_messages():
    chat = chat_for({"model": "m", "input": "hello", "instructions": "be brief"})
    assert chat == {"model": "m", "messages": [{"role": "system", "content": "be brief"},
                                               {"role": "user", "content": "hello"}]}


def test_settings_are_renamed_or_kept():
    chat = chat_for({"model": "m", "input": "x", "max_output_tokens": 50, "temperature": 0.2, "top_p": 0.9,
                     "user": "u1", "metadata": {"a": "b"}, "store": False, "reasoning": {"effort": "low"},
                     "some_future_field": 1})
    assert chat["max_completion_tokens"] == 50 and "max_output_tokens" not in chat
    assert (chat["temperature"], chat["top_p"], chat["user"], chat["reasoning_effort"]) == (0.2, 0.9, "u1", "low")
    assert "metadata" not in chat and "store" not in chat and "some_future_field" not in chat


def test_stream_asks_for_the_usage_chunk():
    chat = chat_for({"model": "m", "input": "x", "stream": True})
    assert chat["stream"] is True and chat["stream_options"] == {"include_usage": True}


def test_message_items_with_text_and_image_parts():
    items = [{"role": "developer", "content": "rules"},
             {"type": "message", "role": "user", "content": [
                 {"type": "input_text", "text": "what is "}, {"type": "input_text", "text": "this?"}]},
             {"role": "user", "content": [
                 {"type": "input_text", "text": "see"},
                 {"type": "input_image", "image_url": "data:image/png;base64,AAAA", "detail": "low"}]},
             {"type": "message", "role": "assistant", "content": [
                 {"type": "output_text", "text": "an answer", "annotations": []}]}]
    assert items_to_messages(normalise_input(items)) == [
        {"role": "developer", "content": "rules"},
        {"role": "user", "content": "what is this?"},
        {"role": "user", "content": [{"type": "text", "text": "see"},
                                     {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA",
                                                                         "detail": "low"}}]},
        {"role": "assistant", "content": "an answer"}]


def test_function_calls_join_the_assistant_message_and_outputs_become_tool_messages():
    items = [{"role": "user", "content": "weather in Paris and Rome?"},
             {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": ""}]},
             {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": '{"city":"Paris"}'},
             {"type": "function_call", "call_id": "call_2", "name": "get_weather", "arguments": '{"city":"Rome"}'},
             {"type": "function_call_output", "call_id": "call_1", "output": "21C"},
             {"type": "function_call_output", "call_id": "call_2",
              "output": [{"type": "input_text", "text": "25C"}]},
             {"type": "reasoning", "id": "rs_1", "summary": []}]
    assert items_to_messages(normalise_input(items)) == [
        {"role": "user", "content": "weather in Paris and Rome?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}},
            {"id": "call_2", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Rome"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "21C"},
        {"role": "tool", "tool_call_id": "call_2", "content": "25C"}]


def test_a_function_call_without_a_preceding_assistant_message_opens_one():
    items = [{"role": "user", "content": "hi"},
             {"type": "function_call", "call_id": "c", "name": "f", "arguments": "{}"}]
    assert items_to_messages(normalise_input(items))[1] == {
        "role": "assistant", "content": None,
        "tool_calls": [{"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}


def test_function_tools_and_tool_choice():
    body = {"model": "m", "input": "x", "parallel_tool_calls": False,
            "tools": [{"type": "function", "name": "get_weather", "description": "Weather",
                       "parameters": {"type": "object", "properties": {}}, "strict": True}],
            "tool_choice": {"type": "function", "name": "get_weather"}}
    chat = chat_for(body)
    assert chat["tools"] == [{"type": "function", "function": {
        "name": "get_weather", "description": "Weather", "parameters": {"type": "object", "properties": {}},
        "strict": True}}]
    assert chat["tool_choice"] == {"type": "function", "function": {"name": "get_weather"}}
    assert chat["parallel_tool_calls"] is False


def test_tool_choice_without_tools_is_not_sent():
    assert "tool_choice" not in chat_for({"model": "m", "input": "x", "tool_choice": "auto", "tools": []})


def test_text_formats_become_response_format():
    schema = {"type": "object", "properties": {"a": {"type": "string"}}}
    chat = chat_for({"model": "m", "input": "x", "text": {"format": {
        "type": "json_schema", "name": "thing", "schema": schema, "strict": True}}})
    assert chat["response_format"] == {"type": "json_schema", "json_schema": {
        "name": "thing", "schema": schema, "strict": True}}
    assert chat_for({"model": "m", "input": "x", "text": {"format": {"type": "json_object"}}})[
        "response_format"] == {"type": "json_object"}
    assert "response_format" not in chat_for({"model": "m", "input": "x", "text": {"format": {"type": "text"}}})


@pytest.mark.parametrize("body, param", [
    ({"input": 5}, "input"),
    ({"input": [5]}, "input[0]"),
    ({"input": [{"role": "robot", "content": "x"}]}, "input[0].role"),
    ({"input": [{"role": "user", "content": [{"type": "input_file", "file_id": "f"}]}]}, "input[0].content[0].type"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "file_id": "f"}]}]},
     "input[0].content[0].image_url"),
    ({"input": [{"role": "user", "content": [{"type": "input_text"}]}]}, "input[0].content[0].text"),
    ({"input": [{"type": "function_call", "name": "f", "arguments": "{}"}]}, "input[0].call_id"),
    ({"input": [{"type": "function_call_output", "call_id": "c"}]}, "input[0].output"),
    ({"input": [{"type": "item_reference", "id": "x"}]}, "input[0].type"),
    ({"input": "x", "tools": [{"type": "web_search"}]}, "tools[0].type"),
    ({"input": "x", "tools": [{"type": "function"}]}, "tools[0].name"),
    ({"input": "x", "tools": [{"type": "function", "name": "f"}], "tool_choice": "sometimes"}, "tool_choice"),
    ({"input": "x", "text": {"format": {"type": "yaml"}}}, "text.format.type"),
    ({"input": "x", "text": {"format": {"type": "json_schema", "name": "n"}}}, "text.format.schema"),
    ({"input": []}, "input"),
])
def test_what_chat_cannot_express_is_a_400_naming_the_param(body, param):
    with pytest.raises(InvalidRequest) as err:
        chat_for({"model": "m", **body})
    assert err.value.param == param and err.value.status == 400


def test_custom_tools_become_function_tools_with_one_input_string():
    """Codex CLI's freeform tools (apply_patch): a function tool taking {"input": string}; their
    calls and outputs in the conversation become a tool call and its tool message."""
    body = {"model": "m", "tools": [{"type": "custom", "name": "apply_patch", "description": "Patch files",
                                     "format": {"type": "grammar", "syntax": "lark", "definition": "start: /.+/"}}],
            "tool_choice": {"type": "custom", "name": "apply_patch"},
            "input": [{"role": "user", "content": "fix it"},
                      {"type": "custom_tool_call", "call_id": "c1", "name": "apply_patch", "input": "*** Begin Patch"},
                      {"type": "custom_tool_call_output", "call_id": "c1", "output": "Done!"}]}
    chat = chat_for(body)
    assert chat["tools"] == [{"type": "function", "function": {
        "name": "apply_patch", "description": "Patch files",
        "parameters": {"type": "object", "properties": {"input": {"type": "string"}}, "required": ["input"],
                       "additionalProperties": False}}}]
    assert chat["tool_choice"] == {"type": "function", "function": {"name": "apply_patch"}}
    assert chat["messages"][1:] == [
        {"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type": "function", "function": {
            "name": "apply_patch", "arguments": '{"input": "*** Begin Patch"}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "Done!"}]
