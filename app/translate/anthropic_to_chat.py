"""An Anthropic Messages request (`POST /v1/messages`) as the canonical chat-completions request.

Pure: no Flask, no I/O. Malformed input is a 400 naming the field. What only Anthropic can take
(server tools, documents, server tool blocks of earlier turns) is `AnthropicOnly`: raised, or,
given a `skipped` list, left out of the chat request and collected there, so that the same
request can still be admitted and passed natively to an Anthropic deployment. What has no
meaning in chat completions is dropped (`thinking` blocks of earlier assistant turns,
`cache_control` marks: the native passthrough keeps them).
"""
from __future__ import annotations

import json
from typing import Any

from app.errors import InvalidRequest

TOOL_CHOICE = {"auto": "auto", "any": "required", "none": "none"}
# Block types of earlier assistant turns that chat completions has no place for.
DROPPED_BLOCKS = ("thinking", "redacted_thinking")


class AnthropicOnly(InvalidRequest):
    """Content that only an Anthropic upstream can take (a 400 for any other)."""


def _bad(message: str, param: str) -> InvalidRequest:
    return InvalidRequest(f"{param}: {message}", param=param)


def _anthropic_only(what: str, param: str, skipped: list[AnthropicOnly] | None) -> None:
    err = AnthropicOnly(f"{param}: {what} can only be sent to Anthropic models", param=param)
    if skipped is None:
        raise err
    skipped.append(err)


def _text_of(content: Any, param: str) -> str:
    """A string, or the text of a list of text blocks (system prompt, tool_result content)."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise _bad("must be a string or a list of content blocks", param)
    parts = []
    for i, block in enumerate(content):
        if not isinstance(block, dict) or block.get("type") != "text" or not isinstance(block.get("text"), str):
            raise _bad("only text blocks are accepted here", f"{param}.{i}")
        parts.append(block["text"])
    return "\n".join(parts) if param == "system" else "".join(parts)


def _image_part(block: dict[str, Any], param: str) -> dict[str, Any]:
    source = block.get("source")
    if not isinstance(source, dict):
        raise _bad("an image block needs a source", param)
    if source.get("type") == "base64" and isinstance(source.get("data"), str) \
            and isinstance(source.get("media_type"), str):
        url = f"data:{source['media_type']};base64,{source['data']}"
    elif source.get("type") == "url" and isinstance(source.get("url"), str):
        url = source["url"]
    else:
        raise _bad("image source must be {type: base64, media_type, data} or {type: url, url}",
                   f"{param}.source")
    return {"type": "image_url", "image_url": {"url": url}}


def _tool_result(block: dict[str, Any], param: str, skipped: list[AnthropicOnly] | None) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """A tool_result block as a `tool` message, and the images it held (sent after it as a user turn)."""
    if not isinstance(block.get("tool_use_id"), str):
        raise _bad("a tool_result block needs a string tool_use_id", param)
    content = block.get("content", "")
    images: list[dict[str, Any]] = []
    if isinstance(content, list):
        texts = []
        for i, part in enumerate(content):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text" and isinstance(part.get("text"), str):
                texts.append(part["text"])
            elif kind == "image":
                images.append(_image_part(part, f"{param}.content.{i}"))
            else:
                _anthropic_only(f"tool_result content blocks of type {kind!r}", f"{param}.content.{i}", skipped)
        content = "".join(texts)
    elif content is None:
        content = ""
    elif not isinstance(content, str):
        raise _bad("must be a string or a list of blocks", f"{param}.content")
    if block.get("is_error") is True:
        content = f"Error: {content}" if content else "Error"
    return {"role": "tool", "tool_call_id": block["tool_use_id"], "content": content}, images


def _block_text(block: dict[str, Any], where: str) -> str:
    if not isinstance(block.get("text"), str):
        raise _bad("a text block needs a string text", where)
    return block["text"]


def _user_turn(content: Any, param: str, skipped: list[AnthropicOnly] | None) -> list[dict[str, Any]]:
    """One Anthropic user turn: its tool results first (as `tool` messages), then the rest."""
    if isinstance(content, str):
        return [{"role": "user", "content": content}]
    out: list[dict[str, Any]] = []
    parts: list[dict[str, Any]] = []
    for i, block in enumerate(content):
        where = f"{param}.{i}"
        kind = block.get("type")
        if kind == "text":
            parts.append({"type": "text", "text": _block_text(block, where)})
        elif kind == "image":
            parts.append(_image_part(block, where))
        elif kind == "tool_result":
            message, images = _tool_result(block, where, skipped)
            out.append(message)
            parts.extend(images)
        elif kind in DROPPED_BLOCKS:
            continue
        else:
            _anthropic_only(f"content blocks of type {kind!r}", where, skipped)
    if parts:
        only_text = all(p["type"] == "text" for p in parts)
        out.append({"role": "user", "content": "".join(p["text"] for p in parts) if only_text else parts})
    return out


def _assistant_turn(content: Any, param: str, skipped: list[AnthropicOnly] | None) -> dict[str, Any]:
    if isinstance(content, str):
        return {"role": "assistant", "content": content}
    texts: list[str] = []
    calls: list[dict[str, Any]] = []
    for i, block in enumerate(content):
        where = f"{param}.{i}"
        kind = block.get("type")
        if kind == "text":
            texts.append(_block_text(block, where))
        elif kind == "tool_use":
            if not isinstance(block.get("id"), str) or not isinstance(block.get("name"), str):
                raise _bad("a tool_use block needs a string id and name", where)
            calls.append({"id": block["id"], "type": "function", "function": {
                "name": block["name"], "arguments": json.dumps(block.get("input") or {}, ensure_ascii=False)}})
        elif kind in DROPPED_BLOCKS:
            continue
        else:
            _anthropic_only(f"assistant blocks of type {kind!r}", where, skipped)
    message: dict[str, Any] = {"role": "assistant", "content": "".join(texts) if texts or not calls else None}
    if calls:
        message["tool_calls"] = calls
    return message


def chat_messages(body: dict[str, Any], skipped: list[AnthropicOnly] | None = None) -> list[dict[str, Any]]:
    """`system` + `messages` as chat-completions messages."""
    messages: list[dict[str, Any]] = []
    system = body.get("system")
    if system is not None:
        text = _text_of(system, "system")
        if text:
            messages.append({"role": "system", "content": text})
    turns = body.get("messages")
    if not isinstance(turns, list) or not turns:
        raise _bad("at least one message is required", "messages")
    for i, turn in enumerate(turns):
        param = f"messages.{i}"
        if not isinstance(turn, dict):
            raise _bad("each message must be an object with role and content", param)
        content = turn.get("content")
        if not isinstance(content, str) and not (isinstance(content, list)
                                                 and all(isinstance(b, dict) for b in content)):
            raise _bad("content must be a string or a list of content blocks", f"{param}.content")
        role = turn.get("role")
        if role == "user":
            messages.extend(_user_turn(content, f"{param}.content", skipped))
        elif role == "assistant":
            messages.append(_assistant_turn(content, f"{param}.content", skipped))
        else:
            raise _bad("role must be 'user' or 'assistant'", f"{param}.role")
    return messages


def chat_tools(tools: Any, skipped: list[AnthropicOnly] | None = None) -> list[dict[str, Any]]:
    if not isinstance(tools, list):
        raise _bad("must be a list of tools", "tools")
    out = []
    for i, tool in enumerate(tools):
        if not isinstance(tool, dict) or not isinstance(tool.get("name"), str):
            raise _bad("each tool needs a name", f"tools.{i}")
        if tool.get("type") not in (None, "custom") or "input_schema" not in tool:
            _anthropic_only(f"server tools ({tool.get('type')})", f"tools.{i}", skipped)
            continue
        function: dict[str, Any] = {"name": tool["name"], "parameters": tool["input_schema"]}
        if isinstance(tool.get("description"), str):
            function["description"] = tool["description"]
        out.append({"type": "function", "function": function})
    return out


def chat_tool_choice(choice: Any) -> tuple[Any, bool | None]:
    """(tool_choice, parallel_tool_calls) of an Anthropic tool_choice."""
    if not isinstance(choice, dict) or choice.get("type") not in ("auto", "any", "tool", "none"):
        raise _bad("must be {type: auto | any | tool | none}", "tool_choice")
    if choice["type"] == "tool":
        if not isinstance(choice.get("name"), str):
            raise _bad("a tool choice of type 'tool' needs the tool's name", "tool_choice.name")
        value: Any = {"type": "function", "function": {"name": choice["name"]}}
    else:
        value = TOOL_CHOICE[choice["type"]]
    parallel = False if choice.get("disable_parallel_tool_use") is True else None
    return value, parallel


def to_chat_request(body: dict[str, Any], skipped: list[AnthropicOnly] | None = None) -> dict[str, Any]:
    """The chat-completions request for a (schema-validated) Messages request. With `skipped`,
    what only Anthropic can take is left out and collected there instead of raised."""
    chat: dict[str, Any] = {"model": body["model"], "messages": chat_messages(body, skipped),
                            "max_tokens": body["max_tokens"]}
    for name in ("temperature", "top_p", "top_k"):
        if body.get(name) is not None:
            chat[name] = body[name]
    if body.get("stop_sequences"):
        chat["stop"] = list(body["stop_sequences"])
    if body.get("tools"):
        chat["tools"] = chat_tools(body["tools"], skipped)
    if body.get("tool_choice") is not None:
        choice, parallel = chat_tool_choice(body["tool_choice"])
        if chat.get("tools"):  # OpenAI refuses a tool_choice without tools
            chat["tool_choice"] = choice
            if parallel is not None:
                chat["parallel_tool_calls"] = parallel
    user = (body.get("metadata") or {}).get("user_id")
    if isinstance(user, str) and user:
        chat["user"] = user
    if body.get("stream") is True:
        chat["stream"] = True
        chat["stream_options"] = {"include_usage": True}
    return chat
