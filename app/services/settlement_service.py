"""After a completion is over: work out its exact usage and cost, and record it.

Called by the completion run (app/services/completion.py), once per run, on every path:
success, refusal after admission, upstream failure, client disconnect, an error of ours. It
runs after the response has gone out (non-streaming: the WSGI close callback; streaming: the
end of the pieces iterator), so its database write is never on the client's critical path.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import update
from sqlalchemy.engine import Engine

from app.models import ApiKey
from app.models.types import utcnow
from app.providers.base import StreamPiece
from app.providers.catalog import Deployment, ModelEntry
from app.services.api_key_service import KeyInfo, LastUsedTracker
from app.services.rate_limit_service import Admission, DeploymentQuota, RateLimitService, to_nano
from app.services.usage_batcher import UsageBatcher
from app.services.usage_service import UsageEvent
from app.utils.token_counter import count_prompt, count_text

log = logging.getLogger("gateway.settlement")


@dataclass
class CompletionTrace:
    """What the request path learns about one completion while it runs."""
    request_id: str
    key: KeyInfo
    entry: ModelEntry
    deployment: Deployment | None
    request: dict[str, Any]
    streamed: bool
    started: float = field(default_factory=time.perf_counter)
    created_at: Any = field(default_factory=utcnow)
    first_byte_at: float | None = None
    usage: dict[str, Any] | None = None
    body: dict[str, Any] | None = None       # non-streaming answer, for counting when no usage
    chunks: list[StreamPiece] = field(default_factory=list)  # streamed pieces, same purpose
    endpoint: str = "chat.completions"       # the API that was called, written to the row
    status: str = "ok"                       # ok | error | client_disconnected
    error_type: str | None = None
    prompt_estimate: int | None = None       # tiktoken count made for admission, reused
    admission: Admission | None = None       # the key's reservation, settled here
    quota: DeploymentQuota | None = None     # the deployment's provider quota, if it has one
    quota_tokens: int = 0                    # tokens reserved on that quota

    def first_byte(self) -> None:
        if self.first_byte_at is None:
            self.first_byte_at = time.perf_counter()


def _completion_text(trace: CompletionTrace) -> str:
    """The generated text (and tool-call arguments) when the provider gave no usage figures."""
    parts: list[str] = []
    if trace.body is not None:
        for choice in trace.body.get("choices") or ():
            msg = choice.get("message") or {}
            if isinstance(msg.get("content"), str):
                parts.append(msg["content"])
            for call in msg.get("tool_calls") or ():
                parts.append(str((call.get("function") or {}).get("arguments", "")))
    for piece in trace.chunks:
        try:
            chunk = piece.chunk if piece.chunk is not None else json.loads(piece.raw or b"{}")
        except ValueError:
            continue
        if not isinstance(chunk, dict):
            continue
        for choice in chunk.get("choices") or ():
            delta = choice.get("delta") or {}
            if isinstance(delta.get("content"), str):
                parts.append(delta["content"])
            for call in delta.get("tool_calls") or ():
                parts.append(str((call.get("function") or {}).get("arguments", "")))
    return "".join(parts)


def _count(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def usage_details(usage: dict[str, Any] | None) -> tuple[int | None, int | None, int | None]:
    """(cached, cache-write, reasoning) tokens from an OpenAI-shaped usage dict
    (`prompt_tokens_details.cached_tokens`, `cache_creation_input_tokens` as Anthropic's usage
    is normalised, `completion_tokens_details.reasoning_tokens`); None where it does not say."""
    if not usage:
        return None, None, None
    prompt = usage.get("prompt_tokens_details")
    completion = usage.get("completion_tokens_details")
    return (_count(prompt.get("cached_tokens")) if isinstance(prompt, dict) else None,
            _count(usage.get("cache_creation_input_tokens")),
            _count(completion.get("reasoning_tokens")) if isinstance(completion, dict) else None)


def usage_figures(trace: CompletionTrace) -> tuple[int, int]:
    """(prompt, completion) tokens: the provider's figures when given, else tiktoken counts."""
    usage = trace.usage
    if usage and isinstance(usage.get("prompt_tokens"), int):
        return int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0)
    produced_nothing = trace.body is None and not trace.chunks
    if produced_nothing and trace.status == "error":
        return 0, 0  # failed before any token: providers do not bill it
    prompt = trace.prompt_estimate
    if prompt is None:
        prompt = count_prompt(trace.request, trace.entry.tokenizer)
    return prompt, count_text(_completion_text(trace), trace.entry.tokenizer)


class Settlement:
    def __init__(self, writer: UsageBatcher, engine: Engine, last_used: LastUsedTracker,
                 limiter: RateLimitService) -> None:
        self.writer = writer
        self.engine = engine
        self.last_used = last_used
        self.limiter = limiter

    def event(self, trace: CompletionTrace) -> UsageEvent:
        prompt, completion = usage_figures(trace)
        cached, cache_write, reasoning = usage_details(trace.usage)
        now = time.perf_counter()
        return UsageEvent(
            request_id=trace.request_id, tenant_id=trace.key.tenant_id, api_key_id=trace.key.id,
            model=trace.entry.alias,
            provider=trace.deployment.provider if trace.deployment else None,
            upstream_model=trace.deployment.model if trace.deployment else None,
            prompt_tokens=prompt, completion_tokens=completion,
            cost_usd=trace.entry.pricing.cost(prompt, completion, cached_tokens=cached or 0,
                                              cache_write_tokens=cache_write or 0),
            status=trace.status, error_type=trace.error_type, streamed=trace.streamed,
            latency_ms=int((now - trace.started) * 1000),
            ttft_ms=int((trace.first_byte_at - trace.started) * 1000) if trace.first_byte_at else None,
            created_at=trace.created_at, endpoint=trace.endpoint, cached_tokens=cached,
            cache_write_tokens=cache_write, reasoning_tokens=reasoning,
        )

    def settle(self, trace: CompletionTrace, record: bool = True) -> None:
        """Release the reservation with the actual usage and record the completion.
        Never raises: it runs where nobody could handle an error. `record=False` only
        releases (the request never reached a provider). Its one caller, the completion run,
        calls it once per completion."""
        event = None
        try:
            event = self.event(trace)
            self._release(trace, event.prompt_tokens + event.completion_tokens, to_nano(event.cost_usd))
            if record:
                self.writer.submit(event)
        except Exception:
            log.exception("usage record %s could not be settled", trace.request_id)
        if record:
            self._touch(trace.key.id)

    def _release(self, trace: CompletionTrace, tokens: int, cost_nano: int) -> None:
        if trace.admission is not None:
            self.limiter.settle(trace.admission, tokens, cost_nano)
        if trace.quota is not None and trace.quota_tokens:
            self.limiter.deployment_settle(trace.quota, trace.quota_tokens - tokens)

    def _touch(self, key_id: int) -> None:
        if not self.last_used.due(key_id):
            return
        try:
            with self.engine.begin() as conn:
                conn.execute(update(ApiKey).where(ApiKey.id == key_id).values(last_used_at=utcnow()))
        except Exception:
            log.warning("last_used_at of key %s not updated (database unavailable)", key_id)
