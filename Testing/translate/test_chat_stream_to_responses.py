"""Chat chunks -> Responses events: the exact event sequence with consecutive sequence numbers,
each event valid for the openai SDK's event types, and the final response assembled."""
from __future__ import annotations

import json

from openai.types.responses import Response, ResponseStreamEvent
from pydantic import TypeAdapter

from app.providers.base import StreamPiece
from app.translate.chat_stream_to_responses import ChatStreamToResponses

EVENT = TypeAdapter(ResponseStreamEvent)
USAGE = {"prompt_tokens": 9, "completion_tokens": 3, "total_tokens": 12,
         "prompt_tokens_details": {"cached_tokens": 4}, "completion_tokens_details": {"reasoning_tokens": 1}}


def chunk(delta: dict, finish: str | None = None) -> StreamPiece:
    data = {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "up-model",
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
    return StreamPiece(raw=json.dumps(data, separators=(",", ":")).encode())  # compact, as OpenAI sends


def usage_piece() -> StreamPiece:
    data = {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "up-model", "choices": [],
            "usage": USAGE}
    return StreamPiece(raw=json.dumps(data).encode(), chunk=data, usage=USAGE, usage_only=True)


def run(pieces: list[StreamPiece], fail: str | None = None,
        request: dict | None = None) -> tuple[ChatStreamToResponses, list[dict]]:
    enc = ChatStreamToResponses(request or {"model": "alias", "input": "x"}, "resp_x", 1, "alias")
    raw = enc.start()
    for piece in pieces:
        raw += enc.feed(piece)
    raw += enc.fail(fail) if fail else enc.finish()
    events = []
    for blob in raw:
        head, data = blob.decode().split("\n", 1)
        assert blob.endswith(b"\n\n") and data.startswith("data: ")
        event = json.loads(data[len("data: "):])
        assert head == "event: " + event["type"]
        EVENT.validate_python(event)  # the SDK's own model of each event type
        events.append(event)
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    return enc, events


def test_text_stream_event_sequence_and_final_response():
    enc, events = run([chunk({"role": "assistant", "content": ""}), chunk({"content": "Hel"}),
                       chunk({"content": "lo"}), chunk({}, "stop"), usage_piece()])
    assert [e["type"] for e in events] == [
        "response.created", "response.in_progress", "response.output_item.added", "response.content_part.added",
        "response.output_text.delta", "response.output_text.delta", "response.output_text.done",
        "response.content_part.done", "response.output_item.done", "response.completed"]
    assert [e["delta"] for e in events if e["type"] == "response.output_text.delta"] == ["Hel", "lo"]
    assert events[6]["text"] == "Hello"
    assert events[0]["response"]["status"] == "in_progress" and events[0]["response"]["output"] == []
    final = Response.model_validate(events[-1]["response"])
    assert final.status == "completed" and final.output_text == "Hello" and final.model == "up-model"
    assert final.usage.input_tokens == 9 and final.usage.output_tokens == 3
    assert final.usage.input_tokens_details.cached_tokens == 4
    assert final.usage.output_tokens_details.reasoning_tokens == 1
    item_id = events[2]["item"]["id"]
    assert {e.get("item_id") for e in events[3:8]} == {item_id} and final.output[0].id == item_id
    assert enc.response["output"][0]["content"][0]["text"] == "Hello"


def test_tool_call_stream_after_text():
    enc, events = run([
        chunk({"role": "assistant", "content": "Let me check."}),
        chunk({"tool_calls": [{"index": 0, "id": "call_1", "type": "function",
                               "function": {"name": "get_weather", "arguments": ""}}]}),
        chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"q":'}}]}),
        chunk({"tool_calls": [{"index": 0, "function": {"arguments": '"Paris"}'}}]}),
        chunk({"tool_calls": [{"index": 1, "id": "call_2", "type": "function",
                               "function": {"name": "get_time", "arguments": "{}"}}]}),
        chunk({}, "tool_calls"), usage_piece()])
    assert [e["type"] for e in events] == [
        "response.created", "response.in_progress",
        "response.output_item.added", "response.content_part.added", "response.output_text.delta",
        "response.output_text.done", "response.content_part.done", "response.output_item.done",
        "response.output_item.added", "response.function_call_arguments.delta",
        "response.function_call_arguments.delta", "response.function_call_arguments.done",
        "response.output_item.done",
        "response.output_item.added", "response.function_call_arguments.delta",
        "response.function_call_arguments.done", "response.output_item.done", "response.completed"]
    assert events[11]["arguments"] == '{"q":"Paris"}'
    assert [e["output_index"] for e in events if e["type"] == "response.output_item.added"] == [0, 1, 2]
    final = events[-1]["response"]
    assert [(i["type"], i.get("call_id"), i.get("arguments")) for i in final["output"]] == [
        ("message", None, None), ("function_call", "call_1", '{"q":"Paris"}'), ("function_call", "call_2", "{}")]


def test_cut_by_the_token_cap_ends_with_response_incomplete():
    _, events = run([chunk({"content": "Hel"}), chunk({}, "length"), usage_piece()])
    assert events[-1]["type"] == "response.incomplete"
    assert events[-1]["response"]["incomplete_details"] == {"reason": "max_output_tokens"}


def test_upstream_failure_mid_stream_ends_with_error_and_response_failed():
    _, events = run([chunk({"content": "Hel"})], fail="provider closed the connection")
    assert [e["type"] for e in events][-2:] == ["error", "response.failed"]
    assert events[-2]["message"] == "provider closed the connection"
    failed = events[-1]["response"]
    assert failed["status"] == "failed" and failed["error"] == {"code": "server_error",
                                                                 "message": "provider closed the connection"}
    assert failed["output"][0]["status"] == "incomplete" and failed["output"][0]["content"][0]["text"] == "Hel"


def test_plain_text_deltas_are_read_without_parsing_and_anything_else_is_not():
    """The text of a plain content chunk comes back still JSON-escaped (copied into the event
    as it is), its end found past escaped quotes and backslashes."""
    from app.translate.chat_stream_to_responses import plain_text_delta
    head = '{"id":"c","object":"chat.completion.chunk","model":"m","choices":[{"index":0,'
    for text in ('hé "x" ü', 'ends with a backslash \\', '\\"quoted\\"', "line\nbreak", ""):
        data = (head + '"delta":{"content":' + json.dumps(text) + '},"logprobs":null,"finish_reason":null}]}')
        escaped = plain_text_delta(data.encode())
        assert json.loads(b'"' + escaped + b'"') == text, text
    for other in ('"delta":{"role":"assistant","content":""},"finish_reason":null}]}',
                  '"delta":{"content":"a"},"finish_reason":"stop"}]}',
                  '"delta":{"content":"a","reasoning_content":null},"finish_reason":null}]}',
                  '"delta":{"tool_calls":[{"index":0}]},"finish_reason":null}]}',
                  '"delta":{"content":"a"},"finish_reason":null},{"index":1,"delta":{"content":"b"},'
                  '"finish_reason":null}]}'):
        assert plain_text_delta((head + other).encode()) is None, other


def test_unicode_text_streams_through_the_fast_path_intact():
    _, events = run([chunk({"content": "héllo "}), chunk({"content": 'wörld ✓ "q" \\'}), chunk({}, "stop")])
    assert [e["delta"] for e in events if e["type"] == "response.output_text.delta"] == [
        "héllo ", 'wörld ✓ "q" \\']
    assert events[-1]["response"]["output"][0]["content"][0]["text"] == 'héllo wörld ✓ "q" \\'


def test_a_stream_the_client_left_is_kept_as_incomplete_with_what_was_produced():
    enc = ChatStreamToResponses({"model": "alias", "input": "x"}, "resp_x", 1, "alias")
    enc.start()
    enc.feed(chunk({"content": "Hel"}))
    enc.abandon()
    assert enc.response["status"] == "incomplete"
    assert enc.response["output"][0]["status"] == "incomplete"
    assert enc.response["output"][0]["content"][0]["text"] == "Hel"


def test_a_custom_tool_call_streams_its_whole_input_when_its_arguments_are_complete():
    request = {"model": "alias", "input": "x", "tools": [{"type": "custom", "name": "apply_patch"}]}
    _, events = run([
        chunk({"tool_calls": [{"index": 0, "id": "call_1", "type": "function",
                               "function": {"name": "apply_patch", "arguments": '{"input":'}}]}),
        chunk({"tool_calls": [{"index": 0, "function": {"arguments": '"*** Begin Patch"}'}}]}),
        chunk({}, "tool_calls")], request=request)
    assert [e["type"] for e in events] == [
        "response.created", "response.in_progress", "response.output_item.added",
        "response.custom_tool_call_input.delta", "response.custom_tool_call_input.done",
        "response.output_item.done", "response.completed"]
    assert events[3]["delta"] == events[4]["input"] == "*** Begin Patch"
    [item] = events[-1]["response"]["output"]
    assert (item["type"], item["call_id"], item["name"], item["input"]) == (
        "custom_tool_call", "call_1", "apply_patch", "*** Begin Patch")


def test_reasoning_deltas_stream_as_a_reasoning_item_before_the_text():
    _, events = run([chunk({"role": "assistant", "content": "", "reasoning_content": "Six"}),
                     chunk({"reasoning_content": " sevens."}), chunk({"content": "42"}), chunk({}, "stop")])
    assert [e["type"] for e in events] == [
        "response.created", "response.in_progress",
        "response.output_item.added", "response.reasoning_text.delta", "response.reasoning_text.delta",
        "response.reasoning_text.done", "response.output_item.done",
        "response.output_item.added", "response.content_part.added", "response.output_text.delta",
        "response.output_text.done", "response.content_part.done", "response.output_item.done",
        "response.completed"]
    assert events[5]["text"] == "Six sevens."
    final = events[-1]["response"]["output"]
    assert [i["type"] for i in final] == ["reasoning", "message"]
    assert final[0]["content"] == [{"type": "reasoning_text", "text": "Six sevens."}]
