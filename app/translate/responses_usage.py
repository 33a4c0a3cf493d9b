"""Usage between the chat dialect and the Responses dialect, both ways (pure functions, no
imports of the app: providers use them too)."""
from __future__ import annotations

from typing import Any


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
