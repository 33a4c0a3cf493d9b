"""POST /v1/chat/completions, readable top to bottom: auth, validation, routing (models that fit,
fallbacks, categories), admission, the attempt loop over deployments (retries, breakers,
quotas), the provider call (plain or streamed), settlement."""
from __future__ import annotations

import json
import logging
import math
from typing import Any, Callable, Iterator, TypeVar

from flask import Response, request

from app.api.admission import admit_or_raise
from app.api.auth import authenticate
from app.api.common import JSON, new_request_id, read_json_object
from app.api.schemas import CHAT_SCHEMA
from app.errors import (APIError, InvalidRequest, ModelNotFound, PermissionDenied, RateLimited,
                        ServiceUnavailable, from_provider_error)
from app.providers.base import ProviderError, ProviderUnavailable, StreamPiece
from app.providers.catalog import Deployment, ModelEntry
from app.runtime import runtime
from app.services.rate_limit_service import LimiterUnavailable, deployment_quota, key_limits, to_nano
from app.services.router import Candidate, ContextTooLong, NoDeploymentAvailable, RequestSize
from app.services.settlement_service import CompletionTrace
from app.utils.streaming import DONE_EVENT, KEEPALIVE_EVENT, FinalChunk, sse_event, with_heartbeat
from app.utils.token_counter import count_messages

log = logging.getLogger("gateway.api")
T = TypeVar("T")


def chat_completions() -> Response:
    rt = runtime()
    key = authenticate()
    body = read_json_object()
    CHAT_SCHEMA.load(body)  # validates; unknown fields stay in `body` and pass through
    alias = body["model"]
    router = rt.router
    if rt.providers.model(alias) is None and not router.is_category(alias):
        raise ModelNotFound(f"The model '{alias}' does not exist on this gateway. "
                            "GET /v1/models lists the available models.", param="model")
    if not key.may_use(alias):
        raise PermissionDenied(f"This API key may not use the model '{alias}'.", param="model",
                               code="model_not_allowed")
    size = _request_size(body)
    models = _models(router, alias, size, key)
    trace = CompletionTrace(request_id=new_request_id(), key=key, entry=models[0], deployment=None,
                            request=body, streamed=bool(body.get("stream")))
    trace.prompt_estimate = size.counted(models[0].tokenizer)
    _admit(rt, trace)
    if trace.streamed:
        return _stream_completion(rt, models, trace)
    try:
        cand, completion = _dispatch(rt, models, trace, lambda c: rt.providers.provider(
            c.deployment.provider).complete({**body, "model": c.deployment.model}))
    except ProviderError as exc:
        _fail(rt, trace, exc)
        raise from_provider_error(exc) from None
    except APIError:
        raise  # already settled (no deployment could be tried)
    except Exception:
        _fail(rt, trace, None)  # a bug of ours: still release the reservation, record the call
        raise
    trace.first_byte()
    trace.usage, trace.body = completion.usage, completion.body
    resp = Response(completion.json_bytes(), mimetype=JSON)
    _limit_headers(resp, trace)
    resp.call_on_close(lambda: rt.settlement.settle(trace))
    return resp


def _request_size(body: dict[str, Any]) -> RequestSize:
    """The request's size for context-window checks (tiktoken runs only for long prompts)."""
    messages = body.get("messages") or []
    length = request.content_length or len(json.dumps(body))
    output = int(body.get("max_completion_tokens") or body.get("max_tokens") or 1)
    return RequestSize(length, len(messages), output, lambda tokenizer: count_messages(messages, tokenizer))


def _models(router: Any, alias: str, size: RequestSize, key: Any) -> list[ModelEntry]:
    """The models that may serve the request, in order (fallbacks and categories resolved)."""
    try:
        models = router.models_for(alias, size, key.may_use)
    except ContextTooLong as exc:
        raise InvalidRequest(f"This model's maximum context length is {exc.largest} tokens. However, "
                             f"your request needs {exc.needed} tokens (prompt plus max_tokens), and no "
                             "fallback model can hold it. Reduce the length of the messages or "
                             "max_tokens.", code="context_length_exceeded", param="messages") from None
    if not models:
        raise ModelNotFound(f"No model of the category '{alias}' is configured on this gateway.",
                            param="model")
    return models


def _dispatch(rt: Any, models: list[ModelEntry], trace: CompletionTrace,
              call: Callable[[Candidate], T]) -> tuple[Candidate, T]:
    """Try the candidates (retries, fallback, breakers: app/services/router.py). Each attempt
    sets the trace's model and deployment, so the usage row names the one that answered."""

    def reserve(cand: Candidate) -> bool:
        trace.entry, trace.deployment = cand.entry, cand.deployment
        return _reserve_quota(rt, trace, cand.deployment)

    def release(cand: Candidate) -> None:
        if trace.quota is not None and trace.quota_tokens:
            rt.limiter.deployment_settle(trace.quota, trace.quota_tokens)
        trace.quota, trace.quota_tokens = None, 0

    try:
        return rt.router.dispatch(rt.router.candidates(models), call, started=trace.started,
                                  reserve=reserve, release=release)
    except NoDeploymentAvailable as exc:
        rt.settlement.settle(trace, record=False)
        if exc.quota_full:
            raise RateLimited(f"Every deployment of '{trace.request['model']}' is at its provider quota; "
                              "retry shortly.", code="rate_limit_exceeded",
                              headers={"Retry-After": "1"}) from None
        retry = max(1, math.ceil(exc.retry_in_s))
        raise ServiceUnavailable(f"Every deployment of '{trace.request['model']}' is failing (circuit "
                                 f"open after repeated upstream errors); retry in {retry}s.",
                                 code="deployments_unavailable", headers={"Retry-After": str(retry)}) from None


def _estimate(trace: CompletionTrace) -> tuple[int, int]:
    """(tokens, nano-dollars) to reserve: the prompt counted with tiktoken plus the output cap
    (max_completion_tokens, max_tokens, else the model's max_output_tokens), priced."""
    body, entry = trace.request, trace.entry
    if trace.prompt_estimate is None:
        trace.prompt_estimate = count_messages(body.get("messages") or [], entry.tokenizer)
    output = int(body.get("max_completion_tokens") or body.get("max_tokens") or entry.max_output_tokens)
    return trace.prompt_estimate + output, to_nano(entry.pricing.cost(trace.prompt_estimate, output))


def _admit(rt: Any, trace: CompletionTrace) -> None:
    """Reserve every limit of the key in one round trip (nothing when the key has none)."""
    limits = key_limits(trace.key)
    if not limits.any:
        return
    tokens, cost = _estimate(trace) if limits.needs_tokens else (0, 0)
    trace.admission = admit_or_raise(rt.limiter, limits, trace.request_id, tokens, cost)


def _reserve_quota(rt: Any, trace: CompletionTrace, deployment: Deployment) -> bool:
    """Reserve the deployment's provider quota (rpm/tpm/rpd) if it has one; False when full."""
    quota = deployment_quota(deployment)
    if quota is None:
        return True
    tokens = _estimate(trace)[0] if quota.tpm else 0
    try:
        if not rt.limiter.deployment_admit(quota, tokens):
            return False
    except LimiterUnavailable:
        rt.settlement.settle(trace, record=False)
        raise ServiceUnavailable("Provider quotas cannot be checked right now; try again shortly.",
                                 code="rate_limiter_unavailable") from None
    trace.quota, trace.quota_tokens = quota, tokens
    return True


def _limit_headers(resp: Response, trace: CompletionTrace) -> None:
    if trace.admission is not None:
        for name, value in trace.admission.headers.items():
            resp.headers[name] = value


def _fail(rt: Any, trace: CompletionTrace, exc: ProviderError | None) -> None:
    trace.status, trace.error_type = "error", exc.kind if exc is not None else "internal"
    rt.settlement.settle(trace)


def _stream_completion(rt: Any, models: list[ModelEntry], trace: CompletionTrace) -> Response:
    """Wait for the upstream's first event before answering, so that a failure before any
    byte reaches the client is still retried or falls back, and otherwise is an ordinary HTTP
    error (502/504 + envelope). Once bytes are out, a failure ends the stream instead."""
    body = trace.request

    def open_stream(cand: Candidate) -> tuple[Any, StreamPiece]:
        upstream = rt.providers.provider(cand.deployment.provider).stream(
            {**body, "model": cand.deployment.model})
        try:
            return upstream, next(iter(upstream))
        except StopIteration:
            raise ProviderUnavailable("The provider ended the stream without any event.") from None

    try:
        cand, (upstream, first) = _dispatch(rt, models, trace, open_stream)
    except ProviderError as exc:
        _fail(rt, trace, exc)
        raise from_provider_error(exc) from None
    except APIError:
        raise
    except Exception:
        _fail(rt, trace, None)
        raise
    wants_usage = bool((trace.request.get("stream_options") or {}).get("include_usage"))
    keepalive = rt.settings.STREAM_KEEPALIVE_S
    rest = with_heartbeat(upstream, keepalive) if keepalive > 0 else upstream

    def events() -> Iterator[bytes]:
        pending: list[bytes] = []  # events of one upstream read, sent in one write
        try:
            piece: StreamPiece | None = first
            source: Iterator[StreamPiece | None] = iter(rest)
            while True:
                if piece is None:
                    pending.append(KEEPALIVE_EVENT)
                else:
                    if piece.usage is not None:
                        trace.usage = piece.usage
                    if not (piece.usage_only and not wants_usage):
                        data = piece.data()
                        trace.chunks.append(data)
                        pending.append(sse_event(data))
                if pending and (piece is None or piece.flush):
                    trace.first_byte()
                    yield b"".join(pending)
                    pending.clear()
                try:
                    piece = next(source)
                except StopIteration:
                    break
            pending.append(DONE_EVENT)
            yield FinalChunk(b"".join(pending))
        except ProviderError as exc:
            # Bytes are out already: no fallback, end the stream with an error event.
            trace.status, trace.error_type = "error", exc.kind
            rt.health.failure(cand.health, exc)
            pending.append(sse_event(json.dumps(from_provider_error(exc).body()).encode()))
            pending.append(DONE_EVENT)
            yield FinalChunk(b"".join(pending))
        except GeneratorExit:
            trace.status, trace.error_type = "client_disconnected", "client_disconnected"
            raise
        finally:
            close = getattr(rest, "close", None)
            if close is not None:
                close()
            rt.settlement.settle(trace)

    resp = Response(events(), mimetype="text/event-stream")
    # A client gone before the first chunk: the generator never runs its `finally`.
    resp.call_on_close(lambda: _settle_unstarted(rt, trace, upstream))
    _limit_headers(resp, trace)
    resp.headers["Cache-Control"] = "no-cache"
    resp.headers["X-Accel-Buffering"] = "no"
    return resp


def _settle_unstarted(rt: Any, trace: CompletionTrace, upstream: Any) -> None:
    if trace.settled:
        return
    trace.status, trace.error_type = "client_disconnected", "client_disconnected"
    abort = getattr(upstream, "abort", None)
    if abort is not None:
        abort()
    rt.settlement.settle(trace)
