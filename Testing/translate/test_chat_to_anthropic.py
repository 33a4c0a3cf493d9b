"""The chat-completions answer -> Anthropic Messages answer translator: the message object,
usage in Anthropic's terms, and the exact event sequence of a translated stream."""
from __future__ import annotations

import json

from app.translate.chat_to_anthropic import MessageStreamEncoder, anthropic_usage, text_literal, to_message

USAGE = {"prompt_tokens": 120, "completion_tokens": 9, "total_tokens": 129,
         "prompt_tokens_details": {"cached_tokens": 100}}


def chat_body(message: dict, finish: str = "stop", usage: dict | None = None) -> dict:
    return {"id": "chatcmpl-1", "object": "chat.completion", "model": "gpt-x",
            "choices": [{"index": 0, "message": message, "finish_reason": finish}], "usage": usage or USAGE}


def events(raw: bytes) -> list[tuple[str, dict]]:
    """(event name, payload) of each SSE event, checking name == payload type."""
    out = []
    for block in raw.decode().strip().split("\n\n"):
        name_line, data_line = block.split("\n")
        name, payload = name_line[len("event: "):], json.loads(data_line[len("data: "):])
        assert payload["type"] == name
        out.append((name, payload))
    return out


def test_usage_takes_cached_and_written_tokens_out_of_input():
    """input_tokens is the fresh input only; cache reads and writes are reported on their own."""
    assert anthropic_usage({**USAGE, "cache_creation_input_tokens": 11}) == {
        "input_tokens": 9, "cache_creation_input_tokens": 11, "cache_read_input_tokens": 100, "output_tokens": 9}
    assert anthropic_usage({"prompt_tokens": 5, "completion_tokens": 2}) == {
        "input_tokens": 5, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0, "output_tokens": 2}


def test_text_answer_is_a_message():
    msg = to_message(chat_body({"role": "assistant", "content": "Hello!"}))
    assert msg["id"].startswith("msg_") and len(msg["id"]) == 28
    assert {k: v for k, v in msg.items() if k != "id"} == {
        "type": "message", "role": "assistant", "model": "gpt-x",
        "content": [{"type": "text", "text": "Hello!"}], "stop_reason": "end_turn", "stop_sequence": None,
        "usage": {"input_tokens": 20, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 100,
                  "output_tokens": 9}}


def test_tool_calls_are_tool_use_blocks_with_parsed_input():
    """tool_calls become tool_use blocks (arguments parsed), stop_reason tool_use."""
    msg = to_message(chat_body({"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}},
        {"id": "call_2", "type": "function", "function": {"name": "get_weather", "arguments": "not json"}}]},
        finish="tool_calls"))
    assert msg["content"] == [
        {"type": "tool_use", "id": "call_1", "name": "get_weather", "input": {"city": "Paris"}},
        {"type": "tool_use", "id": "call_2", "name": "get_weather", "input": {"arguments": "not json"}}]
    assert msg["stop_reason"] == "tool_use"


def test_finish_reasons_map_to_stop_reasons():
    assert to_message(chat_body({"content": "x"}, finish="length"))["stop_reason"] == "max_tokens"
    assert to_message(chat_body({"content": "x"}, finish="content_filter"))["stop_reason"] == "refusal"


def test_stream_of_text_is_anthropics_event_sequence():
    """message_start (with our input count), ping, one text block of deltas, message_delta with
    the stop reason and the upstream's usage, message_stop."""
    enc = MessageStreamEncoder("alias", input_tokens=17)
    out = enc.feed({"model": "gpt-x", "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]})
    out += enc.feed({"choices": [{"index": 0, "delta": {"content": "Hel"}}]})
    out += enc.feed({"choices": [{"index": 0, "delta": {"content": "lo"}, "finish_reason": "stop"}]})
    out += enc.feed({"choices": [], "usage": {"prompt_tokens": 18, "completion_tokens": 2, "total_tokens": 20}})
    out += enc.close()
    got = events(out)
    assert [name for name, _ in got] == ["message_start", "ping", "content_block_start", "content_block_delta",
                                         "content_block_delta", "content_block_stop", "message_delta", "message_stop"]
    start = got[0][1]["message"]
    assert start["model"] == "gpt-x" and start["content"] == [] and start["stop_reason"] is None
    assert start["usage"] == {"input_tokens": 17, "cache_creation_input_tokens": 0,
                              "cache_read_input_tokens": 0, "output_tokens": 0}
    assert got[2][1] == {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}
    assert got[3][1] == {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Hel"}}
    assert got[5][1] == {"type": "content_block_stop", "index": 0}
    assert got[6][1] == {"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                         "usage": {"input_tokens": 18, "cache_creation_input_tokens": 0,
                                   "cache_read_input_tokens": 0, "output_tokens": 2}}


def test_stream_of_text_then_tool_call_opens_a_tool_use_block():
    """A tool call after text closes the text block and opens a tool_use block whose
    arguments arrive as input_json_delta; the stop reason is tool_use."""
    enc = MessageStreamEncoder("alias", input_tokens=5)
    out = enc.feed({"choices": [{"index": 0, "delta": {"content": "Let me check."}}]})
    out += enc.feed({"choices": [{"index": 0, "delta": {"tool_calls": [
        {"index": 0, "id": "call_9", "type": "function", "function": {"name": "get_weather", "arguments": ""}}]}}]})
    out += enc.feed({"choices": [{"index": 0, "delta": {"tool_calls": [
        {"index": 0, "function": {"arguments": '{"city":'}}]}}]})
    out += enc.feed({"choices": [{"index": 0, "delta": {"tool_calls": [
        {"index": 0, "function": {"arguments": '"Paris"}'}}]}, "finish_reason": "tool_calls"}]})
    out += enc.close()
    got = events(out)
    assert [name for name, _ in got] == [
        "message_start", "ping", "content_block_start", "content_block_delta", "content_block_stop",
        "content_block_start", "content_block_delta", "content_block_delta", "content_block_stop",
        "message_delta", "message_stop"]
    assert got[5][1]["content_block"] == {"type": "tool_use", "id": "call_9", "name": "get_weather", "input": {}}
    assert got[5][1]["index"] == 1
    assert [p["delta"] for _, p in got[6:8]] == [{"type": "input_json_delta", "partial_json": '{"city":'},
                                                 {"type": "input_json_delta", "partial_json": '"Paris"}'}]
    assert got[9][1]["delta"]["stop_reason"] == "tool_use"


def test_stream_without_upstream_usage_counts_the_output():
    """No usage from the upstream: message_delta says our input count and the counted output."""
    enc = MessageStreamEncoder("alias", input_tokens=7, count_output=lambda text: len(text.split()))
    out = enc.feed({"choices": [{"index": 0, "delta": {"content": "one two three"}, "finish_reason": "length"}]})
    out += enc.close()
    delta = events(out)[-2][1]
    assert delta["delta"]["stop_reason"] == "max_tokens"
    assert delta["usage"] == {"input_tokens": 7, "output_tokens": 3}


def test_failure_mid_stream_closes_the_block_and_sends_an_error_event():
    enc = MessageStreamEncoder("alias", input_tokens=7)
    out = enc.feed({"choices": [{"index": 0, "delta": {"content": "par"}}]})
    out += enc.fail({"type": "error", "error": {"type": "api_error", "message": "upstream died"}})
    got = events(out)
    assert [name for name, _ in got][-2:] == ["content_block_stop", "error"]
    assert got[-1][1] == {"type": "error", "error": {"type": "api_error", "message": "upstream died"}}


def test_reasoning_content_becomes_a_thinking_block():
    enc = MessageStreamEncoder("alias", input_tokens=1)
    out = enc.feed({"choices": [{"index": 0, "delta": {"reasoning_content": "think"}}]})
    out += enc.feed({"choices": [{"index": 0, "delta": {"content": "answer"}}]}) + enc.close()
    got = events(out)
    assert got[2][1]["content_block"] == {"type": "thinking", "thinking": "", "signature": ""}
    assert got[3][1]["delta"] == {"type": "thinking_delta", "thinking": "think"}
    assert got[5][1]["content_block"] == {"type": "text", "text": ""} and got[5][1]["index"] == 1


CHUNK = (b'{"id":"c","object":"chat.completion.chunk","created":1,"model":"m","choices":[{"index":0,'
         b'"delta":{"content":%s},"logprobs":null,"finish_reason":null}]%s}')


def test_text_literal_of_text_only_chunks():
    """A text-only chunk's JSON string literal is taken as it is (escapes kept), with or
    without a null usage or logprobs."""
    assert text_literal(CHUNK % (b'"Hel\\"lo\\u00e9"', b"")) == b'"Hel\\"lo\\u00e9"'
    assert text_literal(CHUNK % (b'"x"', b',"usage":null')) == b'"x"'
    assert text_literal(CHUNK.replace(b'"logprobs":null,', b"") % (b'"x"', b"")) == b'"x"'


def test_other_chunks_have_no_text_literal():
    """A role, a finish reason, tool calls, another choice, other spacing: parsed instead."""
    assert text_literal(CHUNK.replace(b'"delta":{', b'"delta":{"role":"assistant",') % (b'""', b"")) is None
    assert text_literal(CHUNK.replace(b'"finish_reason":null', b'"finish_reason":"stop"') % (b'"x"', b"")) is None
    assert text_literal(CHUNK.replace(b'"index":0', b'"index":1') % (b'"x"', b"")) is None
    assert text_literal(b'{"choices": [{"index": 0, "delta": {"content": "x"}, "finish_reason": null}]}') is None
    assert text_literal(CHUNK % (b'"say \\"choices\\":[{\\"index\\":0"', b"")) == b'"say \\"choices\\":[{\\"index\\":0"'


def test_text_literals_make_the_same_events_as_parsed_chunks():
    """The fast path (literal) and the parsed path give byte-identical events, and the text
    is counted from the literals when the upstream reports no usage."""
    raws = [CHUNK % (b'"Hel"', b""), CHUNK % (b'"l\\u00f6"', b"")]
    parsed = MessageStreamEncoder("m", 3, count_output=len)
    fast = MessageStreamEncoder("m", 3, count_output=len)
    fast.id = parsed.id
    a = b"".join(parsed.feed(json.loads(r)) for r in raws) + parsed.close()
    b = b"".join(fast.feed_text_literal(text_literal(r)) for r in raws) + fast.close()
    assert events(a)[1:] == events(b)[1:]  # message_start differs only by the model it names
    assert fast.generated_text() == "Hellö" and events(b)[-2][1]["usage"]["output_tokens"] == 5
