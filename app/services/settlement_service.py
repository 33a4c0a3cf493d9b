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
from decimal import Decimal
from typing import Any, Callable

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
# Streamed pieces kept for counting (should the provider's usage be unusable), per run, before
# they are counted and dropped. It bounds a stream's memory: 8 KB of raw chunks (~40 tokens of
# ~200-byte OpenAI chunks, ~12 KB with the piece objects) whatever the stream's length. At 256 KB
# a minute-long stream (1,200 tokens) held ~250 KB until its end (bench/long_streams.py). The
# price of folding is counting what was folded, ~7 us per piece (JSON parse and tiktoken), paid
# only past the first 8 KB of a stream (a 20-chunk answer never folds).
FOLD_BYTES = 8 * 1024


def piece_bytes(piece: StreamPiece) -> int:
    """The memory a kept piece stands for (its raw JSON; a parsed chunk counts as 256)."""
    return len(piece.raw) if piece.raw is not None else 256


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
    chunk_bytes: int = 0                     # size of `chunks`, folded into a count past a bound
    folded_tokens: int = 0                   # tokens of streamed pieces already counted and dropped
    endpoint: str = "chat.completions"       # the API that was called, written to the row
    status: str = "ok"                       # ok | error | client_disconnected
    error_type: str | None = None
    prompt_estimate: int | None = None       # tiktoken count made for admission, reused
    output_estimate: int | None = None       # output tokens to reserve when not the max_tokens cap (0: embeddings)
    flat_cost: Decimal | None = None         # USD on top of the token price (images), billed when ok
    admission: Admission | None = None       # the key's reservation, settled here
    quota: DeploymentQuota | None = None     # the deployment's provider quota, if it has one
    quota_tokens: int = 0                    # tokens reserved on that quota
    cache: str | None = None                 # response cache: hit | miss | None (not consulted)
    saved_cost: Decimal | None = None        # on a cache hit: what the answer cost when it was made
    attempts: int = 0                        # upstream calls made (retries and fallbacks included)
    deployments_tried: int = 0               # distinct deployments called (more than 1: a fallback)
    refusal: str | None = None               # why no deployment was called (provider_quota, circuit_open, ...)
    public_request_id: str | None = None     # the X-Request-ID of the HTTP request (the client's, when valid)

    def add_piece(self, piece: StreamPiece) -> None:
        """Keep a streamed piece for counting its tokens should the provider's usage be
        unusable. Its usage, when it carries one, becomes the run's. Memory stays bounded:
        past FOLD_BYTES the kept pieces are counted (tiktoken) and dropped."""
        if piece.usage is not None:
            self.usage = piece.usage
        self.chunks.append(piece)
        raw = piece.raw  # piece_bytes(piece), inlined: this runs for every piece of every stream
        self.chunk_bytes += len(raw) if raw is not None else 256
        if self.chunk_bytes > FOLD_BYTES:
            self.folded_tokens += count_text(_completion_text(self, with_body=False), self.entry.tokenizer)
            self.chunks.clear()
            self.chunk_bytes = 0

    def first_byte(self) -> None:
        if self.first_byte_at is None:
            self.first_byte_at = time.perf_counter()


def _completion_text(trace: CompletionTrace, with_body: bool = True) -> str:
    """The generated text (and tool-call arguments) when the provider gave no usage figures."""
    parts: list[str] = []
    if with_body and trace.body is not None:
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


# A provider's token figure above this many times the model's context window (or above the
# fallback when the model declares none) is not a count but garbage: the gateway counts instead.
_ABSURD_FACTOR = 4
_ABSURD_FALLBACK = 10_000_000


def usable_usage(usage: Any, context_window: int | None, *, has_output: bool = True) -> tuple[int, int] | None:
    """(prompt, completion) tokens of a provider's usage dict when they can be billed: both
    present, integers (not booleans, not strings), not negative, not absurdly large. None:
    the usage is missing or unusable, and the gateway counts the tokens itself. A call that
    produces no tokens (`has_output` False: embeddings) reports only `prompt_tokens`, as
    OpenAI's embeddings usage does; its completion is 0."""
    if not isinstance(usage, dict):
        return None
    completion_field = usage.get("completion_tokens", None if has_output else 0)
    prompt, completion = _count(usage.get("prompt_tokens")), _count(completion_field)
    if prompt is None or completion is None:
        return None
    ceiling = _ABSURD_FACTOR * context_window if context_window else _ABSURD_FALLBACK
    if not (0 <= prompt <= ceiling and 0 <= completion <= ceiling):
        return None
    return prompt, completion


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


def usage_figures(trace: CompletionTrace) -> tuple[int, int, bool]:
    """(prompt, completion, estimated): the provider's figures when they are usable (see
    `usable_usage`), else tiktoken counts of the prompt and of the text the gateway saw
    (estimated=True)."""
    figures = usable_usage(trace.usage, trace.entry.context_window, has_output=trace.output_estimate != 0)
    if figures is not None:
        return figures[0], figures[1], False
    produced_nothing = trace.body is None and not trace.chunks and not trace.folded_tokens
    if produced_nothing and trace.status == "error":
        return 0, 0, False  # failed before any token: providers do not bill it
    prompt = trace.prompt_estimate
    if prompt is None:
        prompt = count_prompt(trace.request, trace.entry.tokenizer)
    return prompt, trace.folded_tokens + count_text(_completion_text(trace), trace.entry.tokenizer), True


def flat_cost(trace: CompletionTrace) -> Decimal:
    """The run's price beyond tokens (images), billed only for a run that ended ok."""
    return trace.flat_cost if trace.flat_cost is not None and trace.status == "ok" else Decimal(0)


def billed(trace: CompletionTrace) -> tuple[int, int, bool, tuple[int | None, int | None, int | None], Decimal]:
    """(prompt, completion, estimated, (cached, cache-write, reasoning) tokens, cost) of a run
    that called a provider: what its usage row says."""
    prompt, completion, estimated = usage_figures(trace)
    details = usage_details(trace.usage) if not estimated else (None, None, None)
    cost = trace.entry.pricing.cost(prompt, completion, cached_tokens=details[0] or 0,
                                    cache_write_tokens=details[1] or 0) + flat_cost(trace)
    return prompt, completion, estimated, details, cost


Observer = Callable[[CompletionTrace, "UsageEvent | None"], None]


class Settlement:
    def __init__(self, writer: UsageBatcher, engine: Engine, last_used: LastUsedTracker,
                 limiter: RateLimitService, observers: tuple[Observer, ...] = ()) -> None:
        self.writer = writer
        self.engine = engine
        self.last_used = last_used
        self.limiter = limiter
        # Told of every settled run, after its release and its row (metrics, the request log).
        self.observers = observers

    def event(self, trace: CompletionTrace) -> UsageEvent:
        """The usage row of the run. A response cache hit used no tokens and costs nothing: its
        row has zeros, `cached` true and the cost the answer had when it was made."""
        hit = trace.cache == "hit"
        if hit:
            prompt, completion, estimated = 0, 0, False
            cached, cache_write, reasoning = None, None, None
            cost = Decimal(0)
        else:
            prompt, completion, estimated, (cached, cache_write, reasoning), cost = billed(trace)
        now = time.perf_counter()
        return UsageEvent(
            request_id=trace.request_id, tenant_id=trace.key.tenant_id, api_key_id=trace.key.id,
            model=trace.entry.alias,
            provider=trace.deployment.provider if trace.deployment else None,
            upstream_model=trace.deployment.model if trace.deployment else None,
            prompt_tokens=prompt, completion_tokens=completion,
            cost_usd=cost, status=trace.status, error_type=trace.error_type, streamed=trace.streamed,
            cached=hit, saved_cost_usd=trace.saved_cost if hit else None,
            latency_ms=int((now - trace.started) * 1000),
            ttft_ms=int((trace.first_byte_at - trace.started) * 1000) if trace.first_byte_at else None,
            created_at=trace.created_at, endpoint=trace.endpoint, cached_tokens=cached,
            cache_write_tokens=cache_write, reasoning_tokens=reasoning, usage_estimated=estimated,
        )

    def settle(self, trace: CompletionTrace, record: bool = True) -> UsageEvent | None:
        """Release the reservation with the actual usage and record the completion; returns
        the usage event (None when it could not be worked out).
        Never raises: it runs where nobody could handle an error. `record=False` only
        releases (the request never reached a provider). Its one caller, the completion run,
        calls it once per completion."""
        event = None
        try:
            event = self.event(trace)
        except Exception:
            log.exception("usage of %s could not be worked out: its reservation is billed", trace.request_id)
        try:
            if event is not None:
                self._release(trace, event.prompt_tokens + event.completion_tokens, to_nano(event.cost_usd))
            elif trace.admission is not None:  # never hold the slot: settle at the reserved amounts
                self._release(trace, trace.admission.tokens, trace.admission.cost_nano)
            if record and event is not None:
                self.writer.submit(event)
        except Exception:
            log.exception("usage record %s could not be settled", trace.request_id)
        for observe in self.observers:
            observe(trace, event)  # each one never raises
        if record:
            self._touch(trace.key.id)
        return event

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
