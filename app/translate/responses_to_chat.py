"""Responses API request -> chat-completions request (the canonical request of the completion run).

Pure functions: they take the client's Responses body (and the conversation items a stored
previous response contributes) and return the chat body every provider adapter understands.
Input the chat dialect cannot express is refused with a 400 naming the offending `param`
(never dropped silently): file inputs, hosted tools (web search, file search, ...), item
references.

Mapping: `instructions` -> a first `system` message; a string `input` -> one user message;
message items keep their role (`developer` and `system` stay as they are), `input_text` /
`output_text` / `refusal` parts -> text, `input_image` -> an `image_url` part; consecutive
`function_call` items -> one assistant message with `tool_calls` (joined to the assistant
message just before them); `function_call_output` -> a `tool` message; `reasoning` items are
dropped (chat has no way to send them back). `max_output_tokens` -> `max_completion_tokens`
(every adapter reads it); `text.format` -> `response_format`;
function `tools` -> chat tools; `tool_choice` {"type": "function", "name"} -> chat's shape;
`reasoning.effort` -> `reasoning_effort`.

Custom (freeform) tools, which Codex CLI sends (`apply_patch`), become function tools with one
string parameter `input`; `custom_tool_call` / `custom_tool_call_output` items become a tool
call with the arguments `{"input": ...}` and its tool message (chat_to_responses.py maps the
calls of these tools back to `custom_tool_call` items).
"""
from __future__ import annotations

import json
from typing import Any

from app.errors import InvalidRequest

# Responses fields that have the same name and meaning in chat completions.
SAME_NAME = ("temperature", "top_p", "parallel_tool_calls", "user", "seed", "service_tier",
             "prompt_cache_key", "safety_identifier")
MESSAGE_ROLES = ("user", "assistant", "system", "developer")
TEXT_PARTS = ("input_text", "output_text", "text", "refusal")


def _bad(message: str, param: str) -> InvalidRequest:
    return InvalidRequest(message, param=param, code="invalid_value")


def normalise_input(value: Any) -> list[dict[str, Any]]:
    """The request's `input` as a list of items (a string is one user message). Validates the
    shape of each item; the items are kept as the client sent them (they are what is stored and
    listed by `input_items`)."""
    if isinstance(value, str):
        return [{"type": "message", "role": "user", "content": [{"type": "input_text", "text": value}]}]
    if not isinstance(value, list):
        raise _bad("'input' must be a string or a list of input items.", "input")
    items: list[dict[str, Any]] = []
    for i, item in enumerate(value):
        if not isinstance(item, dict):
            raise _bad("Each input item must be an object.", f"input[{i}]")
        kind = item.get("type", "message")
        if kind == "message":
            _check_message(item, f"input[{i}]")
            item = {**item, "type": "message"}
        elif kind == "function_call":
            for name in ("call_id", "name", "arguments"):
                if not isinstance(item.get(name), str):
                    raise _bad(f"A function_call item needs a string '{name}'.", f"input[{i}].{name}")
        elif kind == "custom_tool_call":
            for name in ("call_id", "name", "input"):
                if not isinstance(item.get(name), str):
                    raise _bad(f"A custom_tool_call item needs a string '{name}'.", f"input[{i}].{name}")
        elif kind in ("function_call_output", "custom_tool_call_output"):
            if not isinstance(item.get("call_id"), str):
                raise _bad(f"A {kind} item needs a string 'call_id'.", f"input[{i}].call_id")
            if not isinstance(item.get("output"), (str, list)):
                raise _bad(f"A {kind} item needs an 'output' (a string or content parts).", f"input[{i}].output")
        elif kind != "reasoning":
            raise _bad(f"Input items of type '{kind}' are not supported by this gateway (supported: message, "
                       "function_call, function_call_output, custom_tool_call, custom_tool_call_output, "
                       "reasoning).", f"input[{i}].type")
        items.append(item)
    return items


def _check_message(item: dict[str, Any], param: str) -> None:
    role = item.get("role")
    if role not in MESSAGE_ROLES:
        raise _bad(f"'role' must be one of: {', '.join(MESSAGE_ROLES)}.", f"{param}.role")
    content = item.get("content")
    if isinstance(content, str):
        return
    if not isinstance(content, list):
        raise _bad("'content' must be a string or a list of content parts.", f"{param}.content")
    for j, part in enumerate(content):
        where = f"{param}.content[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in TEXT_PARTS:
            key = "refusal" if kind == "refusal" else "text"
            if not isinstance(part.get(key), str):
                raise _bad(f"A {kind} part needs a string '{key}'.", f"{where}.{key}")
        elif kind == "input_image":
            if not isinstance(part.get("image_url"), str):
                raise _bad("An input_image part needs an 'image_url' (a URL or a data: URL); uploaded "
                           "files (file_id) are not supported by this gateway.", f"{where}.image_url")
        else:
            raise _bad(f"Content parts of type '{kind}' are not supported by this gateway (supported: "
                       "input_text, input_image, output_text, refusal).", f"{where}.type")


def _chat_content(content: Any) -> str | list[dict[str, Any]]:
    """A Responses message content as chat content: plain text when it is only text."""
    if isinstance(content, str):
        return content
    parts: list[dict[str, Any]] = []
    for part in content:
        kind = part["type"]
        if kind == "input_image":
            image = {"url": part["image_url"]}
            if part.get("detail") in ("low", "high", "auto"):
                image["detail"] = part["detail"]
            parts.append({"type": "image_url", "image_url": image})
        else:
            parts.append({"type": "text", "text": part["refusal" if kind == "refusal" else "text"]})
    if all(p["type"] == "text" for p in parts):
        return "".join(p["text"] for p in parts)
    return parts


def _tool_output(output: Any) -> str:
    if isinstance(output, str):
        return output
    return "".join(p.get("text", "") for p in output if isinstance(p, dict))


def items_to_messages(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Conversation items (validated by `normalise_input`, or output items of a stored
    response) as chat messages."""
    messages: list[dict[str, Any]] = []
    for item in items:
        kind = item.get("type", "message")
        if kind == "message":
            messages.append({"role": item["role"], "content": _chat_content(item["content"])})
        elif kind in ("function_call", "custom_tool_call"):
            arguments = item["arguments"] if kind == "function_call" else json.dumps({"input": item["input"]})
            call = {"id": item["call_id"], "type": "function",
                    "function": {"name": item["name"], "arguments": arguments}}
            last = messages[-1] if messages else None
            if last is not None and last["role"] == "assistant":
                last.setdefault("tool_calls", []).append(call)
                if last.get("content") == "":
                    last["content"] = None
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind in ("function_call_output", "custom_tool_call_output"):
            messages.append({"role": "tool", "tool_call_id": item["call_id"],
                             "content": _tool_output(item["output"])})
    return messages


def _tools(tools: Any) -> list[dict[str, Any]]:
    if not isinstance(tools, list):
        raise _bad("'tools' must be a list.", "tools")
    out = []
    for i, tool in enumerate(tools):
        kind = tool.get("type") if isinstance(tool, dict) else None
        if kind not in ("function", "custom"):
            raise _bad(f"Tools of type '{kind}' are not supported by this gateway; function and custom "
                       "tools are.", f"tools[{i}].type")
        if not isinstance(tool.get("name"), str) or not tool["name"]:
            raise _bad(f"A {kind} tool needs a 'name'.", f"tools[{i}].name")
        if kind == "custom":
            function = {"name": tool["name"], "description": tool.get("description") or "",
                        "parameters": CUSTOM_PARAMETERS}
        else:
            function = {k: tool[k] for k in ("name", "description", "parameters", "strict")
                        if tool.get(k) is not None}
        out.append({"type": "function", "function": function})
    return out


# The function parameters standing for a custom tool's free-form input.
CUSTOM_PARAMETERS = {"type": "object", "properties": {"input": {"type": "string"}}, "required": ["input"],
                     "additionalProperties": False}


def custom_tool_names(request: dict[str, Any]) -> frozenset[str]:
    """Names of the request's custom (freeform) tools: their calls are answered as custom_tool_call."""
    tools = request.get("tools")
    if not isinstance(tools, list):
        return frozenset()
    return frozenset(t["name"] for t in tools if isinstance(t, dict) and t.get("type") == "custom"
                     and isinstance(t.get("name"), str))


def _tool_choice(choice: Any) -> Any:
    if choice in ("auto", "none", "required"):
        return choice
    if isinstance(choice, dict) and choice.get("type") in ("function", "custom") \
            and isinstance(choice.get("name"), str):
        return {"type": "function", "function": {"name": choice["name"]}}
    raise _bad("'tool_choice' must be 'auto', 'none', 'required' or {\"type\": \"function\" (or \"custom\"), "
               "\"name\": ...}.", "tool_choice")


def _response_format(text: Any) -> dict[str, Any] | None:
    if not isinstance(text, dict):
        raise _bad("'text' must be an object.", "text")
    fmt = text.get("format")
    if fmt is None:
        return None
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "json_object"}
    if kind == "json_schema":
        if not isinstance(fmt.get("name"), str):
            raise _bad("A json_schema format needs a 'name'.", "text.format.name")
        if not isinstance(fmt.get("schema"), dict):
            raise _bad("A json_schema format needs a 'schema' object.", "text.format.schema")
        schema = {k: fmt[k] for k in ("name", "schema", "strict", "description") if fmt.get(k) is not None}
        return {"type": "json_schema", "json_schema": schema}
    raise _bad("'text.format.type' must be 'text', 'json_object' or 'json_schema'.", "text.format.type")


def to_chat(body: dict[str, Any], items: list[dict[str, Any]]) -> dict[str, Any]:
    """The chat-completions request for a Responses `body` whose whole conversation (stored
    history, then this request's input) is `items`."""
    messages: list[dict[str, Any]] = []
    instructions = body.get("instructions")
    if isinstance(instructions, str) and instructions:
        messages.append({"role": "system", "content": instructions})
    messages.extend(items_to_messages(items))
    if not messages:
        raise _bad("'input' is required (or 'previous_response_id' and an input to continue with).", "input")
    chat: dict[str, Any] = {"model": body["model"], "messages": messages}
    for name in SAME_NAME:
        if body.get(name) is not None:
            chat[name] = body[name]
    if body.get("max_output_tokens") is not None:
        chat["max_completion_tokens"] = body["max_output_tokens"]
    if body.get("tools"):
        chat["tools"] = _tools(body["tools"])
    elif body.get("tools") is not None:
        _tools(body["tools"])
    if body.get("tool_choice") is not None:
        chat["tool_choice"] = _tool_choice(body["tool_choice"])
    if body.get("text") is not None:
        fmt = _response_format(body["text"])
        if fmt is not None:
            chat["response_format"] = fmt
    reasoning = body.get("reasoning")
    if isinstance(reasoning, dict) and reasoning.get("effort"):
        chat["reasoning_effort"] = reasoning["effort"]
    if body.get("stream"):
        chat["stream"] = True
        chat["stream_options"] = {"include_usage": True}
    if "tool_choice" in chat and "tools" not in chat:
        del chat["tool_choice"]
    if "parallel_tool_calls" in chat and "tools" not in chat:
        del chat["parallel_tool_calls"]
    return chat

