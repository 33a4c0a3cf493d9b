"""One completion from admission to settlement: the run every endpoint that costs money uses.

    run = CompletionRun.begin(rt, key, body, endpoint="chat.completions")   # refusals raise APIError
    with run:
        result = run.complete()          # or: pieces = run.stream()
        return run.respond(response)     # settles when the response is closed

`begin` resolves the model (alias, category, fallbacks, context window), checks that the key may
use it and reserves the key's limits. `complete` / `stream` try the deployments through the
router (provider quota reserved and given back, retries, fallbacks, breakers) and hand back the
answer or its pieces. The run settles exactly once, in `_finish`, whichever way it ends:

- a refusal or an upstream failure before any byte: when `complete`/`stream` raise;
- a whole answer: when the response is closed (`respond` registers `close`);
- a stream: in the `finally` of the pieces iterator (exhausted, upstream failure, client gone,
  an exception of ours), or in `close` when the client left before the iterator started;
- a controller exception between `begin` and `respond`: in `__exit__` of `with run:`.

The response cache (app/services/response_cache.py, docs/cache.md): a caller that passes
`cache=CacheAsk(...)` to `begin` (the endpoints whose answer is the canonical chat answer: chat
completions, /api/chat) has the cache looked up before admission, and for a model named
directly (not a category) before routing and prompt counting. A hit is admitted by its lookup,
on requests/min only (no concurrency slot: it is answered at once; with Redis the lookup and
the requests/min check are one script call), answered from the cache by `complete` / `stream`
without a provider, and settled with no tokens and no cost and nothing to release (its usage
row says `cached` and the cost it saved); a miss stores a complete answer: a whole one before it
is returned, a stream in `_finish` when it ended ok (before the client's last event).

`_finish` takes the settlement out of the run before using it, so whichever of these comes
second finds nothing to settle. Threads: a run is driven by one request (one thread or one
greenlet); it is not shared.
"""
from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from dataclasses import replace
from decimal import Decimal
from inspect import GEN_CREATED, getgeneratorstate
from typing import Any, Callable, Generator, Iterator, Optional

from app.errors import APIError, ClientGone, InvalidRequest, ModelNotFound, PermissionDenied, api_error_for, limit_error
from app.providers.base import (Completion, Provider, ProviderError, ProviderUnavailable, StreamPiece,
                                not_configured)
from app.providers.catalog import Deployment, ModelEntry
from app.services.rate_limit_service import LimiterUnavailable, deployment_quota, key_limits, to_nano
from app.services.cache_answers import AnswerBuilder, complete_answer, replay_body, replay_pieces
from app.services.response_cache import CACHE_ERRORS, CacheAsk, Entry, Slot, decide, request_digest
from app.services.router import Candidate, ContextTooLong, NoDeploymentAvailable, RequestSize
from app.services.settlement_service import CompletionTrace, billed, piece_bytes as _piece_bytes, usable_usage
from app.utils import client_connection, request_context
from app.utils.streaming import with_heartbeat
from app.utils.token_counter import IMAGE_TOKENS_HIGH, count_prompt, image_parts

log = logging.getLogger("gateway.completion")
Invoke = Callable[[Provider, Deployment], Any]
Pieces = Iterator[Optional[StreamPiece]]

_OK = ("ok", None)
_DISCONNECTED = ("client_disconnected", "client_disconnected")
_INTERNAL = ("error", "internal")
# After a client hang-up, at most this many bytes of the pieces still read from the upstream (in
# the usage grace) are kept for the fallback count; the rest is read and discarded.
GRACE_COUNT_BYTES = 256 * 1024


class CompletionRun:
    """One completion of one key (see the module docstring for its life)."""

    __slots__ = ("rt", "trace", "models", "_pinned", "_settlement", "_attempted", "_pieces",
                 "_upstream", "_answered", "_closing_outcome", "_candidate", "_hit", "_slot", "_answer",
                 "_builder")

    def __init__(self, rt: Any, trace: CompletionTrace, models: list[ModelEntry],
                 pinned: Deployment | None = None) -> None:
        self.rt = rt
        self.trace = trace
        self.models = models
        self._pinned = pinned
        self._settlement = rt.settlement   # consumed by the one settlement (`_finish`)
        self._attempted = False            # a provider was called: the usage row is written
        self._pieces: Generator[Optional[StreamPiece], None, None] | None = None
        self._upstream: Any = None
        self._answered = False
        self._closing_outcome = _DISCONNECTED
        self._candidate: Candidate | None = None
        self._hit: Entry | None = None              # the cached answer this run replays
        self._slot: Slot | None = None              # where this run's answer is to be cached
        self._answer: Completion | None = None      # the whole answer to cache (not streamed)
        self._builder: AnswerBuilder | None = None  # the streamed answer to cache, assembled

    # -- admission ---------------------------------------------------------------------------

    @classmethod
    def begin(cls, rt: Any, key: Any, body: dict[str, Any], endpoint: str = "chat.completions", *,
              request_id: str | None = None, body_bytes: int | None = None,
              deployment: Deployment | None = None, hold_slot: bool = True,
              prompt_tokens: int | None = None, output_tokens: int | None = None,
              flat_cost: Decimal | None = None, cache: CacheAsk | None = None) -> "CompletionRun":
        """Resolve `body["model"]`, check the key may use it and that the request fits a model,
        and reserve the key's limits. Raises APIError (nothing is held then).

        `endpoint` is written to the usage row. `body_bytes`: the request's size as received
        (bounds the prompt's tokens without counting them). `deployment` pins the run to one
        deployment of the alias (no router: uptime probes); `hold_slot=False` takes no
        concurrency slot (the further probes of one probe round).

        Requests that are not chat (embeddings, images) say what to reserve: `prompt_tokens`
        (their input, counted by the caller; also billed when the provider reports no usage),
        `output_tokens` (0: nothing is generated as text) and `flat_cost` (USD added to the
        token price: images' per-image price; the caller may change `run.trace.flat_cost`
        once it knows what was produced; billed only when the run ends ok). The model's
        `kind` must be the endpoint's (embedding for "embeddings", image for "images", chat
        for the others): else 400.

        `cache`: what the request asked of the response cache (only for callers that answer
        with the canonical chat answer and call no `invoke`); looked up before admission."""
        try:
            return cls._begin(rt, key, body, endpoint, request_id=request_id, body_bytes=body_bytes,
                              deployment=deployment, hold_slot=hold_slot, prompt_tokens=prompt_tokens,
                              output_tokens=output_tokens, flat_cost=flat_cost, cache=cache)
        except APIError as err:
            if err.endpoint is None:
                err.endpoint = endpoint  # the error handler counts and logs the refusal under it
            raise

    @classmethod
    def _begin(cls, rt: Any, key: Any, body: dict[str, Any], endpoint: str, *, request_id: str | None,
               body_bytes: int | None, deployment: Deployment | None, hold_slot: bool,
               prompt_tokens: int | None, output_tokens: int | None,
               flat_cost: Decimal | None, cache: CacheAsk | None) -> "CompletionRun":
        alias = body["model"]
        router = rt.router
        entry = rt.providers.catalog.get(alias)
        if entry is None and not router.is_category(alias):
            raise ModelNotFound(f"The model '{alias}' does not exist on this gateway. "
                                "GET /v1/models lists the available models.", param="model")
        wanted, kind = ENDPOINT_KINDS.get(endpoint, "chat"), entry.kind if entry is not None else "chat"
        if kind != wanted:
            raise InvalidRequest(f"The model '{alias}' is {_a(kind)} model; this endpoint ({endpoint}) serves "
                                 f"{wanted} models only. GET /v1/models lists the models.",
                                 param="model", code="model_not_supported")
        if not key.may_use(alias):
            raise PermissionDenied(f"This API key may not use the model '{alias}'.", param="model",
                                   code="model_not_allowed")
        if cache is not None and deployment is None and entry is not None:
            # a direct model: the cache first; a hit needs neither routing nor a prompt count
            run = cls(rt, _trace(key, entry, body, endpoint, request_id), [entry])
            if run._consult_cache(cache, alias, entry):
                return run  # admitted by the lookup
            cache = None  # looked up: a miss goes on as any request, then stores its answer
        else:
            run = None
        if hold_slot:
            _refuse_cheaply(rt, key, body, body_bytes)
        if deployment is None:
            size = _request_size(body, body_bytes)
            try:
                models = router.models_for(alias, size, key.may_use)
            except ContextTooLong as exc:
                raise _refusal(exc) from None
            if not models:
                raise ModelNotFound(f"No model of the category '{alias}' is configured on this gateway.",
                                    param="model")
            prompt = size.counted(models[0].tokenizer)
        else:
            models, prompt = [rt.providers.catalog.get(alias)], None
        if run is None:
            run = cls(rt, _trace(key, models[0], body, endpoint, request_id, deployment), models, deployment)
        else:  # looked up before routing (a miss): the same run, now routed
            run.trace.entry, run.models = models[0], models
        trace = run.trace
        trace.prompt_estimate = prompt if prompt_tokens is None else prompt_tokens
        trace.output_estimate, trace.flat_cost = output_tokens, flat_cost
        if cache is not None and deployment is None:
            run._consult_cache(cache, alias, rt.providers.catalog.get(alias) or models[0])
        run._admit(hold_slot)
        return run

    def _consult_cache(self, ask: CacheAsk, alias: str, model: ModelEntry) -> bool:
        """Decide whether this request uses the response cache (`model`: whose `cache` setting
        counts) and look it up: a hit is kept for `complete` / `stream` (True), a miss
        remembers where to store the answer. On a hit of a key with a requests/min limit the
        lookup also admits the hit (`lookup_admitted`: one Redis round trip); refused, it
        raises the 429. The cache unreachable: the request goes on without it (logged)."""
        rt, trace = self.rt, self.trace
        settings = rt.settings
        use = decide(ask, trace.key.cache, model.cache, settings.RESPONSE_CACHE_DEFAULT, trace.request,
                     settings.RESPONSE_CACHE_MAX_TEMPERATURE)
        if use is None:
            return False
        limits = key_limits(trace.key)
        try:
            slot, found, adm = rt.response_cache.lookup_admitted(
                trace.key.tenant_id, alias, request_digest(trace.request), use.read, limits, rt.limiter,
                trace.request_id)
        except (*CACHE_ERRORS, LimiterUnavailable) as exc:
            log.warning("response cache unavailable (%s): request %s answered without it",
                        type(exc).__name__, trace.request_id)
            return False
        if found is None:
            trace.cache = "miss"
            self._slot = slot
            return False
        if adm is not None and not adm.admitted:
            raise limit_error(adm.reason, adm.retry_after_ms, adm.headers, tokens=0, rpm=limits.rpm,
                              tpm=limits.tpm, daily=limits.daily_tokens, concurrent=limits.max_concurrent)
        trace.cache, trace.saved_cost = "hit", found.cost
        trace.entry = rt.providers.catalog.get(found.model) or trace.entry
        trace.admission = adm
        self._hit = found
        return True

    def _admit(self, hold_slot: bool) -> None:
        """Reserve every limit of the key in one round trip (nothing when the key has none). A
        cache hit was admitted by its lookup (requests/min only: `hit_admission_limits`)."""
        if self._hit is not None:
            return
        limits = key_limits(self.trace.key)
        if not limits.any:
            return
        if not hold_slot and limits.max_concurrent:
            limits = replace(limits, max_concurrent=0)
        tokens, cost = self._estimate() if limits.needs_tokens else (0, 0)
        try:
            adm = self.rt.limiter.admit(limits, self.trace.request_id, tokens, cost)
        except LimiterUnavailable as exc:
            raise _refusal(exc) from None
        if not adm.admitted:
            raise limit_error(adm.reason, adm.retry_after_ms, adm.headers, tokens=tokens, rpm=limits.rpm,
                              tpm=limits.tpm, daily=limits.daily_tokens, concurrent=limits.max_concurrent)
        self.trace.admission = adm

    def _estimate(self) -> tuple[int, int]:
        """(tokens, nano-dollars) to reserve: everything the provider bills as prompt (messages,
        images, tools, functions, a response_format schema: `count_prompt`, counted once per run)
        plus the output cap (max_completion_tokens, max_tokens, else the model's
        max_output_tokens) times the number of choices `n`, priced, plus the flat cost (images).
        Non-chat runs give their own output estimate (`output_tokens` of `begin`)."""
        trace = self.trace
        body, entry = trace.request, trace.entry
        if trace.prompt_estimate is None:
            trace.prompt_estimate = count_prompt(body, entry.tokenizer)
        output = trace.output_estimate
        if output is None:
            output = _output_cap(body, entry.max_output_tokens) * _choices(body)
        cost = entry.pricing.cost(trace.prompt_estimate, output) + (trace.flat_cost or 0)
        return trace.prompt_estimate + output, to_nano(cost)

    # -- what the caller sees ------------------------------------------------------------------

    @property
    def request_id(self) -> str:
        return self.trace.request_id

    @property
    def headers(self) -> dict[str, str]:
        """The x-ratelimit-* headers of the key's admission ({} for a key without limits)."""
        adm = self.trace.admission
        return adm.headers if adm is not None else {}

    @property
    def deployment(self) -> Deployment | None:
        """The deployment that answered (None before one did)."""
        return self.trace.deployment

    def complete(self, invoke: Invoke | None = None) -> Completion:
        """The whole answer. `invoke(provider, deployment)` replaces the provider call (native
        passthrough); it returns a Completion whose `usage` is OpenAI-shaped. Raises APIError
        (the run is settled then)."""
        if self._hit is not None:
            body = self._replayed_body()
            self._answered = True
            return Completion(body=body, usage=body.get("usage"))
        call = invoke or self._provider_complete
        completion = self._dispatch(call)
        self.trace.first_byte()
        self.trace.usage, self.trace.body = completion.usage, completion.body
        self._answered = True
        if self._slot is not None:
            # before the answer goes out: the client's next identical request finds it
            self._answer = completion
            try:
                prompt, completion_tokens, _estimated, _details, cost = billed(self.trace)
            except Exception:  # settlement will say it too; the client gets its answer
                log.exception("cost of %s not worked out: its answer is not cached", self.trace.request_id)
            else:
                self._store(cost, prompt, completion_tokens)
        return completion

    def stream(self, invoke: Invoke | None = None) -> Pieces:
        """The answer's pieces; `None` items are keep-alive ticks (STREAM_KEEPALIVE_S > 0).
        Waits for the first piece, so that a failure before it still falls back or raises
        APIError (settled). After it, an upstream failure is raised from the iterator as
        ProviderError. The run settles when the iterator ends, raises or is closed."""
        if self._hit is not None:
            self._pieces = self._replay(replay_pieces(self._replayed_body()))
            return self._pieces
        if self._slot is not None:
            self._builder = AnswerBuilder(self.rt.settings.RESPONSE_CACHE_MAX_ENTRY_BYTES)
        call = invoke or self._provider_stream

        def open_stream(provider: Provider, deployment: Deployment) -> tuple[Any, StreamPiece]:
            upstream = call(provider, deployment)
            self._upstream = upstream
            try:
                return upstream, next(iter(upstream))
            except StopIteration:
                raise ProviderUnavailable("The provider ended the stream without any event.") from None

        upstream, first = self._dispatch(open_stream)
        self._pieces = self._iterate(upstream, first)
        return self._pieces

    def respond(self, response: Any) -> Any:
        """Add the admission's x-ratelimit-* headers to the response (a Werkzeug Response) and
        settle when it is closed. Returns the response."""
        adm = self.trace.admission
        if adm is not None:
            # `add`, not `set`: nothing set these names before, so no scan for them is needed
            response.headers.extend(adm.headers)
        if self.trace.cache is not None:
            response.headers[CACHE_HEADER] = self.trace.cache
        if self._pieces is not None:
            response.headers["Cache-Control"] = "no-cache"
            response.headers["X-Accel-Buffering"] = "no"
            response.response = self._guarded(response.response)
        response.call_on_close(self.close)
        return response

    def close(self) -> None:
        """End the run now: a stream not read to its end counts as a client disconnect; a run
        that never answered (a cancelled probe round, a controller error) releases its
        reservation. Idempotent."""
        pieces = self._pieces
        if pieces is not None:
            if getgeneratorstate(pieces) == GEN_CREATED:
                _abort(self._upstream)  # the client left before the first byte: the generator never ran
            pieces.close()              # a started stream settles in its own `finally`
        self._finish(*(_OK if self._answered else self._closing_outcome))

    def __enter__(self) -> "CompletionRun":
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is not None:
            self._closing_outcome = _INTERNAL
            self._answered = False
            self.close()

    # -- the attempt loop ------------------------------------------------------------------------

    def _provider_complete(self, provider: Provider, deployment: Deployment) -> Completion:
        """The default call: the canonical request with the deployment's upstream model id."""
        return provider.complete({**self.trace.request, "model": deployment.model})

    def _provider_stream(self, provider: Provider, deployment: Deployment) -> Iterator[StreamPiece]:
        return provider.stream({**self.trace.request, "model": deployment.model})

    def _dispatch(self, call: Invoke) -> Any:
        """Call `call(provider, deployment)` on the candidates (or the pinned deployment) until
        one answers. Any failure settles the run and is raised as APIError."""
        try:
            if self._pinned is not None:
                return self._call_pinned(call)
            router = self.rt.router
            cand, result = router.dispatch(router.candidates(self.models), self._attempt(call),
                                           started=self.trace.started, reserve=self._reserve,
                                           release=self._release_quota, wait=self._wait_for_quota)
            self._candidate = cand
            return result
        except ClientGone as gone:
            gone.observed = True
            self._finish(*_DISCONNECTED)
            raise
        except BaseException as exc:
            kind = exc.kind if isinstance(exc, ProviderError) else "internal"
            err = None
            if isinstance(exc, Exception):
                err = exc if isinstance(exc, APIError) else api_error_for(exc, model=self.trace.request.get("model"))
            if err is not None:
                self.trace.refusal = err.refusal
                err.observed = True  # counted and logged by the run's settlement, not again by the handler
            self._finish("error", kind)
            if isinstance(exc, APIError) or not isinstance(exc, Exception):
                raise
            if err is None:
                raise  # a bug of ours: the generic handler answers 500 (the run is settled)
            raise err from exc

    def _attempt(self, call: Invoke) -> Callable[[Candidate], Any]:
        providers = self.rt.providers

        last: list[Deployment | None] = [None]

        def attempt(cand: Candidate) -> Any:
            self._attempted = True
            trace = self.trace
            trace.attempts += 1
            if cand.deployment is not last[0]:
                last[0] = cand.deployment
                trace.deployments_tried += 1
            return call(providers.provider(cand.deployment.provider), cand.deployment)
        return attempt

    def _call_pinned(self, call: Invoke) -> Any:
        """One deployment, one attempt (uptime probes): no breaker, quota or retry. A provider
        that is not configured is not called."""
        dep = self._pinned
        provider = self.rt.providers.provider(dep.provider)
        missing = provider.missing_configuration()
        if missing:
            raise not_configured(dep.provider, missing)
        self._attempted = True
        return call(provider, dep)

    def _reserve(self, cand: Candidate) -> bool:
        """Before an attempt: the trace names the candidate (so the row names who answered),
        and its provider quota (rpm/tpm/rpd) is reserved if it has one; False when full."""
        trace = self.trace
        trace.entry, trace.deployment = cand.entry, cand.deployment
        quota = deployment_quota(cand.deployment)
        if quota is None:
            return True
        tokens = self._estimate()[0] if quota.tpm else 0
        if not self.rt.limiter.deployment_admit(quota, tokens):  # LimiterUnavailable: a refusal
            return False
        trace.quota, trace.quota_tokens = quota, tokens
        return True

    def _wait_for_quota(self, at_quota: list[Candidate]) -> Candidate:
        """Every deployment was at its quota: wait in the queue of the first one (routing
        order) that declares a `queue_timeout_s`. Raises NoDeploymentAvailable (429 with
        Retry-After) when none does or no slot came in time, ClientGone when the client hung
        up while waiting. The key's admission (its concurrency slot) is held meanwhile."""
        for cand in at_quota:
            timeout = cand.entry.queue_timeout_for(cand.deployment)
            quota = deployment_quota(cand.deployment)
            if timeout > 0 and quota is not None:
                break
        else:
            raise NoDeploymentAvailable(len(at_quota), 0, 0.0)
        trace = self.trace
        trace.entry, trace.deployment = cand.entry, cand.deployment
        tokens = self._estimate()[0] if quota.tpm else 0
        outcome = self.rt.limiter.deployment_wait(quota, tokens, trace.request_id, timeout,
                                                  client_connection.gone)
        if outcome.client_gone:
            raise ClientGone()
        if not outcome.admitted:
            raise NoDeploymentAvailable(len(at_quota), 0, outcome.retry_after_s, queued_for_s=timeout)
        trace.quota, trace.quota_tokens = quota, tokens
        return cand

    def _release_quota(self, cand: Candidate) -> None:
        """The deployment failed and the request moves on: its quota reservation goes back."""
        trace = self.trace
        if trace.quota is not None and trace.quota_tokens:
            self.rt.limiter.deployment_settle(trace.quota, trace.quota_tokens)
        trace.quota, trace.quota_tokens = None, 0

    # -- the response cache ------------------------------------------------------------------------

    def _replayed_body(self) -> dict[str, Any]:
        """The cached answer as a new chat.completion (the run's answer from now on)."""
        assert self._hit is not None
        body = replay_body(self._hit, int(self.rt.clock.now().timestamp()))
        self.trace.first_byte()
        self.trace.body = body
        return body

    def _replay(self, pieces: Iterator[Optional[StreamPiece]]) -> Generator[Optional[StreamPiece], None, None]:
        """A cached answer's chunks; settles like an upstream stream (`_iterate`)."""
        outcome = _DISCONNECTED
        try:
            yield from pieces
            outcome = _OK
        except GeneratorExit:
            outcome = self._closing_outcome
            raise
        except Exception:
            outcome = _INTERNAL
            raise
        finally:
            self._finish(*outcome)

    def _store(self, cost: Decimal, prompt: int, completion: int) -> None:
        """After a run that ended ok: its answer into the cache when it is complete and not
        larger than RESPONSE_CACHE_MAX_ENTRY_BYTES. Never raises (the client has its answer)."""
        slot, settings = self._slot, self.rt.settings
        assert slot is not None
        try:
            if self._builder is not None:
                body = self._builder.answer({"prompt_tokens": prompt, "completion_tokens": completion,
                                             "total_tokens": prompt + completion})
            elif self._answer is not None:
                answer = self._answer
                body = answer.body if answer.body is not None else json.loads(answer.raw or b"null")
                body = body if complete_answer(body) else None
            else:
                return
            if body is None:
                return
            raw = Entry(body, cost, self.trace.entry.alias).encode()
            if len(raw) <= settings.RESPONSE_CACHE_MAX_ENTRY_BYTES:
                self.rt.response_cache.store(slot, raw)
        except CACHE_ERRORS as exc:
            log.warning("answer of %s not cached (%s)", self.trace.request_id, type(exc).__name__)

    # -- streaming ---------------------------------------------------------------------------------

    def _iterate(self, upstream: Any, first: StreamPiece) -> Generator[Optional[StreamPiece], None, None]:
        trace = self.trace
        settings = self.rt.settings
        keepalive = settings.STREAM_KEEPALIVE_S
        rest = with_heartbeat(upstream, keepalive, settings.STREAM_BUFFER_BYTES) if keepalive > 0 else upstream
        outcome = _DISCONNECTED
        source = iter(rest)
        try:
            trace.first_byte()
            piece: Optional[StreamPiece] = first
            builder = self._builder
            while True:
                if piece is not None:
                    trace.add_piece(piece)
                    if builder is not None:
                        builder.feed(piece)
                yield piece
                try:
                    piece = next(source)
                except StopIteration:
                    break
            outcome = _OK
        except ProviderError as exc:
            # Bytes are out: no fallback; the caller turns the error into its dialect's event.
            outcome = ("error", exc.kind)
            self._health_failure(exc)
            raise
        except GeneratorExit:
            outcome = self._closing_outcome
            if outcome == _DISCONNECTED:
                self._await_usage(source, upstream)
            raise
        except Exception:
            outcome = _INTERNAL
            raise
        finally:
            close = getattr(rest, "close", None)
            if close is not None:
                close()
            self._finish(*outcome)

    def _await_usage(self, source: Iterator[Optional[StreamPiece]], upstream: Any) -> None:
        """The client hung up: the provider bills what it generated, so bill its usage.
        If it has not arrived yet, keep reading the upstream for at most STREAM_USAGE_GRACE_S
        (the upstream is then cut), discarding the text past GRACE_COUNT_BYTES (so the fallback
        count costs little CPU). Without usable usage by then, settlement counts the tokens it
        kept and marks the row estimated."""
        trace = self.trace
        grace = self.rt.settings.STREAM_USAGE_GRACE_S
        if usable_usage(trace.usage, trace.entry.context_window) is not None or grace <= 0:
            return
        deadline = time.monotonic() + grace
        kept = 0
        timer = threading.Timer(grace, _abort, (upstream,))  # unblocks a read that hangs
        timer.daemon = True
        timer.start()
        try:
            for piece in source:
                if piece is not None:
                    if piece.usage is not None:
                        trace.usage = piece.usage
                        if usable_usage(piece.usage, trace.entry.context_window):
                            return
                    size = _piece_bytes(piece)
                    if kept + size <= GRACE_COUNT_BYTES:
                        kept += size
                        trace.add_piece(piece)  # counted should no usage come; the rest is discarded
                if time.monotonic() >= deadline:
                    return
        except Exception:  # the upstream failed or was cut: settle with what arrived
            return
        finally:
            timer.cancel()

    def _guarded(self, body: Any) -> Iterator[bytes]:
        """The encoded body: an exception of the encoder marks the run as failed inside the
        gateway (not as a client disconnect) before the response is closed."""
        try:
            yield from body
        except GeneratorExit:
            raise
        except Exception:
            self._closing_outcome = _INTERNAL
            raise

    def _health_failure(self, exc: ProviderError) -> None:
        """A failure mid-stream counts against the deployment (the router saw its first piece
        as a success). Pinned runs (probes) report their own outcome."""
        if self._candidate is not None:
            self.rt.health.failure(self._candidate.health, exc)

    # -- settlement ----------------------------------------------------------------------------------

    def _finish(self, status: str, error_type: str | None) -> None:
        """The run's one settlement: release the reservations with the actual usage and write
        the usage row (when a provider was called). The settlement is taken out of the run
        before it is used, so a second call has nothing to settle."""
        settlement, self._settlement = self._settlement, None
        if settlement is None:
            return
        trace = self.trace
        if status != "ok":
            trace.status, trace.error_type = status, error_type
        event = settlement.settle(trace, record=self._attempted or self._hit is not None)
        if status == "ok" and self._builder is not None and event is not None:
            # a stream: stored before its end ([DONE]) reaches the client
            self._store(event.cost_usd, event.prompt_tokens, event.completion_tokens)


# The response header that says whether the response cache answered (hit) or not (miss).
CACHE_HEADER = "X-Gateway-Cache"

# The model kind each endpoint calls (models.json `kind`); every other endpoint calls chat models.
ENDPOINT_KINDS = {"embeddings": "embedding", "images": "image"}


def _a(kind: str) -> str:
    return f"an {kind}" if kind[0] in "aeiou" else f"a {kind}"


def _refusal(exc: Exception) -> APIError:
    err = api_error_for(exc)
    assert err is not None, exc
    return err


def _abort(upstream: Any) -> None:
    """Drop an upstream connection whose answer nobody will read."""
    abort = getattr(upstream, "abort", None)
    if abort is not None:
        abort()


def _output_cap(body: dict[str, Any], default: int) -> int:
    return int(body.get("max_completion_tokens") or body.get("max_tokens") or default)


def _choices(body: dict[str, Any]) -> int:
    """`n`: each choice is a whole output, billed (validated 1..128 by the chat schema)."""
    n = body.get("n")
    return n if isinstance(n, int) and not isinstance(n, bool) and n > 0 else 1


def _request_size(body: dict[str, Any], body_bytes: int | None) -> RequestSize:
    """The request's size for context-window checks (tiktoken runs only for long prompts). An
    image part is a few bytes of URL but up to IMAGE_TOKENS_HIGH tokens: added to the bound."""
    messages = body.get("messages") or []
    if body_bytes is None:
        body_bytes = len(json.dumps(body))
    images = image_parts(messages)
    if images:
        body_bytes += IMAGE_TOKENS_HIGH * len(images)
    return RequestSize(body_bytes, len(messages), _output_cap(body, 1),
                       lambda tokenizer: count_prompt(body, tokenizer))


def _trace(key: Any, entry: ModelEntry, body: dict[str, Any], endpoint: str, request_id: str | None,
           deployment: Deployment | None = None) -> CompletionTrace:
    trace = CompletionTrace(request_id=request_id or "req_" + uuid.uuid4().hex, key=key, entry=entry,
                            deployment=deployment, request=body, streamed=bool(body.get("stream")),
                            endpoint=endpoint)
    trace.public_request_id = request_context.public_request_id()
    return trace


def _refuse_cheaply(rt: Any, key: Any, body: dict[str, Any], body_bytes: int | None) -> None:
    """A key already at its requests/min or concurrency limit is refused before its prompt is
    counted (counting megabytes takes a worker's CPU for a while). One extra limiter round trip,
    so only for bodies of ADMISSION_PRECHECK_BYTES and more (a small prompt counts faster than
    the round trip takes); the admission proper still decides."""
    threshold = rt.settings.ADMISSION_PRECHECK_BYTES
    if body_bytes is not None and body_bytes < threshold:
        return
    limits = key_limits(key)
    if not (limits.rpm or limits.max_concurrent):
        return
    if body_bytes is None and len(json.dumps(body)) < threshold:
        return
    refusal = rt.limiter.peek(limits)
    if refusal is not None:
        raise limit_error(refusal.reason, refusal.retry_after_ms, refusal.headers, tokens=0, rpm=limits.rpm,
                          tpm=limits.tpm, daily=limits.daily_tokens, concurrent=limits.max_concurrent)
