"""Chat-completions answer -> Responses API `response` object, and usage in both directions.

Pure functions. The shape follows OpenAI's `response` object field for field (the openai
SDK's `openai.types.responses.Response` is the reference), so a client that reads any field
of a real OpenAI response finds it here too.
"""
from __future__ import annotations

import os
import time
from typing import Any

# finish_reason -> (status, incomplete_details.reason)
INCOMPLETE = {"length": "max_output_tokens", "content_filter": "content_filter"}


def new_item_id(prefix: str) -> str:
    """An id in OpenAI's format: a prefix and 48 hex digits (`msg_...`, `fc_...`)."""
    return f"{prefix}_{os.urandom(24).hex()}"


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def response_usage(usage: dict[str, Any] | None) -> dict[str, Any] | None:
    """A chat `usage` (the completion run's normalised usage) as a Responses `usage`: the same
    counts under Responses' names, cached and reasoning tokens included; Anthropic's cache
    writes (`cache_creation_input_tokens`) as `input_tokens_details.cache_write_tokens`."""
    if not usage:
        return None
    prompt, completion = _int(usage.get("prompt_tokens")), _int(usage.get("completion_tokens"))
    prompt_details = usage.get("prompt_tokens_details") or {}
    completion_details = usage.get("completion_tokens_details") or {}
    return {
        "input_tokens": prompt,
        "input_tokens_details": {"cached_tokens": _int(prompt_details.get("cached_tokens")),
                                 "cache_write_tokens": _int(usage.get("cache_creation_input_tokens"))},
        "output_tokens": completion,
        "output_tokens_details": {"reasoning_tokens": _int(completion_details.get("reasoning_tokens"))},
        "total_tokens": _int(usage.get("total_tokens")) or prompt + completion,
    }


def chat_usage(usage: dict[str, Any] | None) -> dict[str, Any] | None:
    """A Responses `usage` (from a provider that speaks Responses natively) as the chat usage
    the completion run bills."""
    if not isinstance(usage, dict):
        return None
    prompt, completion = _int(usage.get("input_tokens")), _int(usage.get("output_tokens"))
    input_details = usage.get("input_tokens_details") or {}
    output_details = usage.get("output_tokens_details") or {}
    out: dict[str, Any] = {
        "prompt_tokens": prompt, "completion_tokens": completion,
        "total_tokens": _int(usage.get("total_tokens")) or prompt + completion,
        "prompt_tokens_details": {"cached_tokens": _int(input_details.get("cached_tokens"))},
        "completion_tokens_details": {"reasoning_tokens": _int(output_details.get("reasoning_tokens"))},
    }
    if _int(input_details.get("cache_write_tokens")):
        out["cache_creation_input_tokens"] = _int(input_details["cache_write_tokens"])
    return out


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


def output_from_message(message: dict[str, Any], status: str = "completed") -> list[dict[str, Any]]:
    """The output items of one chat `message`: its text (or refusal) as a message item, then
    one function_call item per tool call."""
    items: list[dict[str, Any]] = []
    content = message.get("content")
    if isinstance(content, list):  # some servers answer with content parts
        content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
    if message.get("refusal"):
        items.append(message_item("", status, refusal=str(message["refusal"])))
    elif content:
        items.append(message_item(str(content), status))
    for call in message.get("tool_calls") or ():
        function = call.get("function") or {}
        items.append(function_call_item(str(call.get("id") or new_item_id("call")), str(function.get("name", "")),
                                        str(function.get("arguments") or ""), status))
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
    response["output"] = output_from_message(choice.get("message") or {}, status)
    return finish(response, reason, chat.get("usage"))
