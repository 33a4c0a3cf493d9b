"""Native Responses upstreams: the request sent upstream (whole conversation, nothing stored
there), and their events passed on with the gateway's response id."""
from __future__ import annotations

import json

from app.providers.base import StreamPiece
from app.translate.responses_passthrough import ResponsesPassthrough, history_for_upstream, upstream_request

REQUEST = {"model": "alias", "input": "again", "previous_response_id": "resp_prev", "metadata": {"k": "v"},
           "instructions": "be brief", "stream": True, "temperature": 0.3}


def piece(event: dict) -> StreamPiece:
    return StreamPiece(raw=json.dumps(event).encode(), chunk=event)


def parse(blobs: list[bytes]) -> list[dict]:
    return [json.loads(b.decode().split("data: ", 1)[1]) for b in blobs]


def test_upstream_request_carries_the_conversation_and_stores_nothing():
    history = history_for_upstream([
        {"id": "msg_1", "type": "message", "role": "user", "status": "completed", "content": "hi"},
        {"id": "rs_1", "type": "reasoning", "summary": []},
        {"id": "fc_1", "type": "function_call", "status": "completed", "call_id": "c", "name": "f", "arguments": "{}"}])
    body = upstream_request(REQUEST, history + [{"type": "message", "role": "user", "content": "again"}],
                            "gpt-upstream", stream=True)
    assert body == {"model": "gpt-upstream", "instructions": "be brief", "metadata": {"k": "v"}, "temperature": 0.3,
                    "store": False, "stream": True, "input": [
                        {"type": "message", "role": "user", "content": "hi"},
                        {"type": "function_call", "call_id": "c", "name": "f", "arguments": "{}"},
                        {"type": "message", "role": "user", "content": "again"}]}


def test_events_pass_through_with_the_gateways_response_id():
    enc = ResponsesPassthrough(REQUEST, "resp_ours")
    upstream = {"id": "resp_up", "object": "response", "status": "in_progress", "output": [], "store": False}
    item = {"id": "msg_up", "type": "message", "role": "assistant", "status": "completed",
            "content": [{"type": "output_text", "text": "Hi", "annotations": []}]}
    out = enc.start()
    out += enc.feed(piece({"type": "response.created", "sequence_number": 0, "response": dict(upstream)}))
    delta = {"type": "response.output_text.delta", "sequence_number": 1, "item_id": "msg_up", "output_index": 0,
             "content_index": 0, "delta": "Hi"}
    out += enc.feed(piece(delta))
    out += enc.feed(piece({"type": "response.output_item.done", "sequence_number": 2, "output_index": 0,
                           "item": item}))
    out += enc.feed(piece({"type": "response.completed", "sequence_number": 3,
                           "response": {**upstream, "status": "completed", "output": [item]}}))
    out += enc.finish()
    events = parse(out)
    assert [e["type"] for e in events] == ["response.created", "response.output_text.delta",
                                           "response.output_item.done", "response.completed"]
    assert events[1] == delta
    for lifecycle in (events[0], events[3]):
        assert lifecycle["response"]["id"] == "resp_ours"
        assert lifecycle["response"]["previous_response_id"] == "resp_prev"
        assert lifecycle["response"]["store"] is True and lifecycle["response"]["metadata"] == {"k": "v"}
    assert enc.response["status"] == "completed" and enc.response["output"] == [item]
    enc.abandon()
    assert enc.response["status"] == "completed"  # a finished response stays as it was


def test_failure_mid_stream_keeps_the_finished_items():
    enc = ResponsesPassthrough(REQUEST, "resp_ours")
    enc.feed(piece({"type": "response.created", "sequence_number": 0,
                    "response": {"id": "resp_up", "status": "in_progress", "output": []}}))
    item = {"id": "fc_1", "type": "function_call", "call_id": "c", "name": "f", "arguments": "{}"}
    enc.feed(piece({"type": "response.output_item.done", "sequence_number": 4, "output_index": 0, "item": item}))
    error, failed = parse(enc.fail("upstream broke"))
    assert (error["type"], error["sequence_number"], error["message"]) == ("error", 5, "upstream broke")
    assert failed["type"] == "response.failed" and failed["sequence_number"] == 6
    assert failed["response"]["id"] == "resp_ours" and failed["response"]["status"] == "failed"
    assert failed["response"]["output"] == [item]
