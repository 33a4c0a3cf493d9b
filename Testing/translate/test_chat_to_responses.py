"""Chat answer -> Responses `response` object (checked against the openai SDK's own types), and
usage in both directions with cached, cache-write and reasoning tokens."""
from __future__ import annotations

from openai.types.responses import Response

from app.translate.chat_to_responses import response_from_chat
from app.translate.responses_usage import chat_usage, response_usage

CHAT_USAGE = {"prompt_tokens": 120, "completion_tokens": 30, "total_tokens": 150,
              "prompt_tokens_details": {"cached_tokens": 100}, "completion_tokens_details": {"reasoning_tokens": 12}}
RESPONSES_USAGE = {"input_tokens": 120, "input_tokens_details": {"cached_tokens": 100, "cache_write_tokens": 0},
                   "output_tokens": 30, "output_tokens_details": {"reasoning_tokens": 12}, "total_tokens": 150}


def chat(message: dict, finish: str = "stop", usage: dict | None = None) -> dict:
    return {"id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "gpt-4o-mini-2024",
            "choices": [{"index": 0, "message": message, "finish_reason": finish}], "usage": usage or CHAT_USAGE}


def test_text_answer_is_a_message_item_with_output_text_and_usage():
    request = {"model": "gpt-4o-mini", "input": "hi", "instructions": "be brief", "metadata": {"k": "v"}}
    obj = response_from_chat(chat({"role": "assistant", "content": "Hello!"}), request, "resp_1", 1700000000)
    parsed = Response.model_validate(obj)
    assert parsed.id == "resp_1" and parsed.object == "response" and parsed.status == "completed"
    assert parsed.output_text == "Hello!" and parsed.model == "gpt-4o-mini-2024"
    [item] = obj["output"]
    assert item["type"] == "message" and item["role"] == "assistant" and item["id"].startswith("msg_")
    assert item["content"] == [{"type": "output_text", "text": "Hello!", "annotations": [], "logprobs": []}]
    assert obj["usage"] == RESPONSES_USAGE
    assert (obj["instructions"], obj["metadata"], obj["created_at"]) == ("be brief", {"k": "v"}, 1700000000)
    assert obj["error"] is None and obj["incomplete_details"] is None and obj["store"] is True


def test_tool_calls_are_function_call_items():
    message = {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_a", "type": "function", "function": {"name": "get_weather", "arguments": '{"q":"Paris"}'}},
        {"id": "call_b", "type": "function", "function": {"name": "get_time", "arguments": "{}"}}]}
    obj = response_from_chat(chat(message, "tool_calls"), {"model": "m", "input": "x"}, "resp_2", 1)
    Response.model_validate(obj)
    assert [(i["type"], i["call_id"], i["name"], i["arguments"], i["status"]) for i in obj["output"]] == [
        ("function_call", "call_a", "get_weather", '{"q":"Paris"}', "completed"),
        ("function_call", "call_b", "get_time", "{}", "completed")]
    assert all(i["id"].startswith("fc_") for i in obj["output"])


def test_an_answer_cut_by_the_token_cap_is_incomplete():
    obj = response_from_chat(chat({"role": "assistant", "content": "Hel"}, "length"),
                             {"model": "m", "input": "x", "max_output_tokens": 3}, "resp_3", 1)
    assert obj["status"] == "incomplete" and obj["incomplete_details"] == {"reason": "max_output_tokens"}
    assert obj["output"][0]["status"] == "incomplete" and obj["max_output_tokens"] == 3


def test_usage_round_trip_and_anthropic_cache_writes():
    assert response_usage(CHAT_USAGE) == RESPONSES_USAGE
    assert chat_usage(RESPONSES_USAGE) == CHAT_USAGE
    anthropic = {"prompt_tokens": 118, "completion_tokens": 5, "total_tokens": 123,
                 "prompt_tokens_details": {"cached_tokens": 100}, "cache_creation_input_tokens": 11}
    assert response_usage(anthropic)["input_tokens_details"] == {"cached_tokens": 100, "cache_write_tokens": 11}
    assert chat_usage(response_usage(anthropic))["cache_creation_input_tokens"] == 11


def test_no_usage_stays_none():
    assert response_usage(None) is None and chat_usage(None) is None


def test_calls_of_custom_tools_are_custom_tool_call_items():
    message = {"role": "assistant", "content": None, "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "apply_patch", "arguments": '{"input":"*** Begin"}'}},
        {"id": "c2", "type": "function", "function": {"name": "apply_patch", "arguments": "not json"}},
        {"id": "c3", "type": "function", "function": {"name": "shell", "arguments": '{"cmd":"ls"}'}}]}
    request = {"model": "m", "input": "x", "tools": [{"type": "custom", "name": "apply_patch"},
                                                     {"type": "function", "name": "shell"}]}
    obj = response_from_chat(chat(message, "tool_calls"), request, "resp_c", 1)
    Response.model_validate(obj)
    assert [(i["type"], i["call_id"], i.get("input"), i.get("arguments")) for i in obj["output"]] == [
        ("custom_tool_call", "c1", "*** Begin", None), ("custom_tool_call", "c2", "not json", None),
        ("function_call", "c3", None, '{"cmd":"ls"}')]
    assert obj["output"][0]["id"].startswith("ctc_")


def test_reasoning_text_of_the_upstream_is_a_reasoning_item_before_the_answer():
    message = {"role": "assistant", "content": "42", "reasoning_content": "Six times seven."}
    obj = response_from_chat(chat(message), {"model": "m", "input": "x"}, "resp_r", 1)
    Response.model_validate(obj)
    assert [i["type"] for i in obj["output"]] == ["reasoning", "message"]
    assert obj["output"][0]["content"] == [{"type": "reasoning_text", "text": "Six times seven."}]
    assert obj["output"][0]["summary"] == [] and obj["output"][0]["id"].startswith("rs_")
