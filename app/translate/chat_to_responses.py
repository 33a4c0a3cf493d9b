"""Chat-completions answer -> Responses API `response` object.

Pure functions. The shape follows OpenAI's `response` object field for field (the openai
SDK's `openai.types.responses.Response` is the reference), so a client that reads any field
of a real OpenAI response finds it here too.
"""
from __future__ import annotations

import json
import os
import time
from typing import Any

from app.translate.responses_to_chat import custom_tool_names
from app.translate.responses_usage import response_usage

# finish_reason -> (status, incomplete_details.reason)
INCOMPLETE = {"length": "max_output_tokens", "content_filter": "content_filter"}


def new_item_id(prefix: str) -> str:
    """An id in OpenAI's format: a prefix and 48 hex digits (`msg_...`, `fc_...`)."""
    return f"{prefix}_{os.urandom(24).hex()}"


def base_response(request: dict[str, Any], response_id: str, created_at: int, model: str) -> dict[str, Any]:
    """The `response` object of `request` before any output: status `in_progress`, no usage.
    The request's settings are echoed as OpenAI does (defaults where the client gave none)."""
    text = request.get("text") if isinstance(request.get("text"), dict) else {}
    reasoning = request.get("reasoning") if isinstance(request.get("reasoning"), dict) else {}
    return {
        "id": response_id, "object": "response", "created_at": created_at, "status": "in_progress",
        "background": False, "completed_at": None, "error": None, "incomplete_details": None,
        "instructions": request.get("instructions"),
        "max_output_tokens": request.get("max_output_tokens"), "max_tool_calls": None,
        "model": model, "output": [],
        "parallel_tool_calls": request.get("parallel_tool_calls", True),
        "previous_response_id": request.get("previous_response_id"),
        "prompt_cache_key": request.get("prompt_cache_key"),
        "reasoning": {"effort": reasoning.get("effort"), "summary": reasoning.get("summary")},
        "safety_identifier": request.get("safety_identifier"),
        "service_tier": request.get("service_tier") or "default",
        "store": request.get("store", True) is not False,
        "temperature": request.get("temperature", 1.0),
        "text": {"format": text.get("format") or {"type": "text"}, "verbosity": text.get("verbosity", "medium")},
        "tool_choice": request.get("tool_choice", "auto"),
        "tools": request.get("tools") or [],
        "top_logprobs": request.get("top_logprobs", 0),
        "top_p": request.get("top_p", 1.0),
        "truncation": request.get("truncation", "disabled"),
        "usage": None, "user": request.get("user"),
        "metadata": request.get("metadata") or {},
    }


def message_item(text: str, status: str = "completed", item_id: str | None = None,
                 refusal: str | None = None) -> dict[str, Any]:
    part: dict[str, Any] = ({"type": "refusal", "refusal": refusal} if refusal is not None else
                            {"type": "output_text", "text": text, "annotations": [], "logprobs": []})
    return {"id": item_id or new_item_id("msg"), "type": "message", "status": status, "role": "assistant",
            "content": [part]}


def function_call_item(call_id: str, name: str, arguments: str, status: str = "completed",
                       item_id: str | None = None) -> dict[str, Any]:
    return {"id": item_id or new_item_id("fc"), "type": "function_call", "status": status,
            "arguments": arguments, "call_id": call_id, "name": name}


def custom_tool_input(arguments: str) -> str:
    """The free-form input of a custom tool called through its function stand-in
    (`{"input": "..."}`); the arguments as they are when they are not that."""
    try:
        value = json.loads(arguments)
    except ValueError:
        return arguments
    return value["input"] if isinstance(value, dict) and isinstance(value.get("input"), str) else arguments


def custom_tool_call_item(call_id: str, name: str, tool_input: str, status: str = "completed",
                          item_id: str | None = None) -> dict[str, Any]:
    return {"id": item_id or new_item_id("ctc"), "type": "custom_tool_call", "status": status,
            "call_id": call_id, "name": name, "input": tool_input}


def reasoning_item(text: str, status: str = "completed", item_id: str | None = None) -> dict[str, Any]:
    return {"id": item_id or new_item_id("rs"), "type": "reasoning", "summary": [],
            "content": [{"type": "reasoning_text", "text": text}], "status": status}


def reasoning_of(message: dict[str, Any]) -> str | None:
    """The reasoning text a chat upstream put beside the answer (DeepSeek, vLLM, OpenRouter)."""
    for key in ("reasoning_content", "reasoning"):
        value = message.get(key)
        if isinstance(value, str) and value:
            return value
    return None


def output_from_message(message: dict[str, Any], status: str = "completed",
                        custom: frozenset[str] = frozenset()) -> list[dict[str, Any]]:
    """The output items of one chat `message`: its reasoning text (when the upstream gave it) as
    a reasoning item, its text (or refusal) as a message item, then one function_call item per
    tool call (custom_tool_call for the tools named in `custom`)."""
    items: list[dict[str, Any]] = []
    reasoning = reasoning_of(message)
    if reasoning is not None:
        items.append(reasoning_item(reasoning, status))
    content = message.get("content")
    if isinstance(content, list):  # some servers answer with content parts
        content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
    if message.get("refusal"):
        items.append(message_item("", status, refusal=str(message["refusal"])))
    elif content:
        items.append(message_item(str(content), status))
    for call in message.get("tool_calls") or ():
        function = call.get("function") or {}
        call_id, name = str(call.get("id") or new_item_id("call")), str(function.get("name", ""))
        arguments = str(function.get("arguments") or "")
        items.append(custom_tool_call_item(call_id, name, custom_tool_input(arguments), status) if name in custom
                     else function_call_item(call_id, name, arguments, status))
    return items


def finish(response: dict[str, Any], finish_reason: str | None, usage: dict[str, Any] | None) -> dict[str, Any]:
    """Set the final status (`completed`, or `incomplete` with its reason), completion time and
    usage of `response` (in place) and return it."""
    reason = INCOMPLETE.get(finish_reason or "")
    response["status"] = "incomplete" if reason else "completed"
    response["incomplete_details"] = {"reason": reason} if reason else None
    response["completed_at"] = int(time.time())
    response["usage"] = response_usage(usage)
    return response


def response_from_chat(chat: dict[str, Any], request: dict[str, Any], response_id: str,
                       created_at: int) -> dict[str, Any]:
    """The Responses `response` object for a non-streaming chat-completions answer."""
    response = base_response(request, response_id, created_at, str(chat.get("model") or request["model"]))
    choices = chat.get("choices") or [{}]
    choice = choices[0] if isinstance(choices[0], dict) else {}
    reason = choice.get("finish_reason")
    status = "incomplete" if reason in INCOMPLETE else "completed"
    response["output"] = output_from_message(choice.get("message") or {}, status, custom_tool_names(request))
    return finish(response, reason, chat.get("usage"))
