"""Which deployments serve a request, in which order, and the attempt loop over them.

Order of candidates for an alias:

1. its deployments by `priority` (lowest number first); among deployments of equal priority a
   **weighted random order** (`weight`). Why weighted and not least-busy: weights say what the
   operator wants (split traffic 3:1 between two accounts, keep a cheap one busy), while a
   per-worker least-busy count only sees that worker's own requests — with many workers and
   replicas it is noise, and sharing it would cost a round trip per request. A weighted draw
   costs a few microseconds and no shared state;
2. then, when all of them failed, the deployments of the alias's `fallbacks` (in the listed
   order, recursively, each alias once);
3. a model whose `context_window` cannot hold the prompt plus the requested output is left
   out (context-window fallback); when no candidate can hold it: 400 context_length_exceeded.

Category aliases `small`, `big` and `auto` (unless models.json defines a model of that name)
choose among the models tagged with that `category` (`auto`: all models): those that fit,
ordered by availability (not every deployment's circuit open), best priority, then least
recently used by this worker; each next model is the fallback of the previous one. Models at
their provider quota (rpm/tpm/rpd) are skipped by the attempt loop, like any deployment.

The attempt loop (`dispatch`): skip open circuits and saturated quotas, retry retryable
errors on the same deployment with backoff (`retry_policy`), move on to the next candidate
on failure, stop at once on a plain bad request (it would fail everywhere).
"""
from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass
from typing import Callable, Iterator, TypeVar

from app.providers.base import ProviderError
from app.providers.catalog import Catalog, Deployment, ModelEntry
from app.services.provider_health import DeploymentHealth, HealthBoard
from app.services.retry_policy import RetryPolicy

log = logging.getLogger("gateway.router")
T = TypeVar("T")
CATEGORY_ALIASES = ("small", "big", "auto")
# Error kinds that end the request at once: the request itself is wrong, any provider says so.
_STOP_KINDS = frozenset({"bad_request"})
# Kinds that say nothing about the deployment's health (the request did not fit).
_NEUTRAL_KINDS = frozenset({"bad_request", "context_too_long"})


class ContextTooLong(Exception):
    """No candidate model can hold the prompt plus the requested output."""

    def __init__(self, needed: int, largest: int) -> None:
        super().__init__(f"needs {needed} tokens, largest context window {largest}")
        self.needed, self.largest = needed, largest


class NoDeploymentAvailable(Exception):
    """Every candidate was skipped without an upstream call: quota full, circuit open, or its
    provider not configured (`not_configured`: one sentence per such provider)."""

    def __init__(self, quota_full: int, circuits_open: int, retry_in_s: float,
                 not_configured: list[str] | None = None, queued_for_s: float = 0.0) -> None:
        super().__init__(f"{quota_full} at quota, {circuits_open} with an open circuit, "
                         f"{len(not_configured or ())} providers not configured")
        self.quota_full, self.circuits_open, self.retry_in_s = quota_full, circuits_open, retry_in_s
        self.not_configured = not_configured or []
        self.queued_for_s = queued_for_s  # > 0: waited this long in a deployment's queue


class RequestSize:
    """The prompt's size for context-window checks, counted with tiktoken only when needed:
    a request body of B bytes cannot hold more than B tokens (every BPE token is at least one
    byte) plus the per-message overhead, so short requests never pay for a count."""

    __slots__ = ("bound", "output", "_count", "_exact")

    def __init__(self, body_bytes: int, n_messages: int, output_tokens: int,
                 count: Callable[[str], int]) -> None:
        self.bound = body_bytes + 4 * n_messages + 8
        self.output = output_tokens
        self._count = count
        self._exact: dict[str, int] = {}

    def prompt_tokens(self, tokenizer: str) -> int:
        n = self._exact.get(tokenizer)
        if n is None:
            n = self._exact[tokenizer] = self._count(tokenizer)
        return n

    def counted(self, tokenizer: str) -> int | None:
        """The exact count if one was already made for `tokenizer` (reused for admission)."""
        return self._exact.get(tokenizer)

    def fits(self, entry: ModelEntry) -> bool:
        if self.bound + self.output <= entry.context_window:
            return True
        return self.prompt_tokens(entry.tokenizer) + self.output <= entry.context_window

    def needed(self, entry: ModelEntry) -> int:
        return self.prompt_tokens(entry.tokenizer) + self.output


@dataclass(frozen=True)
class Candidate:
    entry: ModelEntry
    deployment: Deployment
    health: DeploymentHealth


def deployment_name(deployment: Deployment) -> str:
    return f"{deployment.provider}/{deployment.model}"


class Router:
    def __init__(self, catalog: Catalog, health: HealthBoard, policy: RetryPolicy,
                 rng: random.Random | None = None, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep,
                 unconfigured: Callable[[str], list[str]] | None = None) -> None:
        self.catalog = catalog
        # provider name -> its unset environment variables ([]: usable); ProviderManager.unconfigured
        self.unconfigured = unconfigured or (lambda provider: [])
        self.health = health
        self.policy = policy
        self.rng = rng or random.Random()
        self.clock = clock
        self.sleep = sleep
        # alias -> deployments grouped by priority, with their health records (built once)
        self._groups: dict[str, tuple[tuple[tuple[Deployment, DeploymentHealth], ...], ...]] = {}
        self._model_used: dict[str, float] = {}
        for alias, entry in catalog.models.items():
            groups: dict[int, list[tuple[Deployment, DeploymentHealth]]] = {}
            for dep in entry.deployments:
                groups.setdefault(dep.priority, []).append((dep, health.get(deployment_name(dep))))
            self._groups[alias] = tuple(tuple(groups[p]) for p in sorted(groups))

    # -- what a name means ------------------------------------------------------------------

    def is_category(self, name: str) -> bool:
        return name in CATEGORY_ALIASES and name not in self.catalog.models

    def category_models(self, name: str) -> list[ModelEntry]:
        models = self.catalog.models.values()
        return [m for m in models if name == "auto" or m.category == name]

    def models_for(self, name: str, size: RequestSize, may_use: Callable[[str], bool]) -> list[ModelEntry]:
        """The models to try for `name`, in order, each able to hold the request; raises
        ContextTooLong when none can. The caller checked that the key may use `name`; a
        category grants all of its models, an alias's fallbacks need their own grant."""
        if self.is_category(name):
            pool = self.category_models(name)  # the key may use `name`: that grants its models
            fitting = [m for m in pool if size.fits(m)]
            fitting.sort(key=self._category_rank)
        else:
            pool = self._with_fallbacks(self.catalog.models[name], may_use)
            fitting = [m for m in pool if size.fits(m)]
        if pool and not fitting:
            largest = max(pool, key=lambda m: m.context_window)
            raise ContextTooLong(size.needed(largest), largest.context_window)
        return fitting

    def _with_fallbacks(self, entry: ModelEntry, may_use: Callable[[str], bool]) -> list[ModelEntry]:
        if not entry.fallbacks:
            return [entry]
        order, seen = [entry], {entry.alias}
        i = 0
        while i < len(order):
            for alias in order[i].fallbacks:
                if alias not in seen and may_use(alias):
                    seen.add(alias)
                    order.append(self.catalog.models[alias])
            i += 1
        return order

    def _category_rank(self, entry: ModelEntry) -> tuple[int, int, float]:
        groups = self._groups[entry.alias]
        available = any(h.breaker.available() for group in groups for _, h in group)
        return (0 if available else 1, entry.priority, self._model_used.get(entry.alias, 0.0))

    # -- candidate order ----------------------------------------------------------------------

    def candidates(self, models: list[ModelEntry]) -> Iterator[Candidate]:
        for entry in models:
            for group in self._groups[entry.alias]:
                if len(group) == 1:
                    dep, health = group[0]
                    yield Candidate(entry, dep, health)
                    continue
                for dep, health in self.weighted_order(group):
                    yield Candidate(entry, dep, health)

    def weighted_order(self, group: tuple[tuple[Deployment, DeploymentHealth], ...]
                       ) -> list[tuple[Deployment, DeploymentHealth]]:
        """A random order where each next item is drawn with probability weight / remaining
        weights (weighted sampling without replacement)."""
        rest = list(group)
        order = []
        while rest:
            total = sum(d.weight for d, _ in rest)
            pick = self.rng.random() * total
            for i, (dep, _) in enumerate(rest):
                pick -= dep.weight
                if pick < 0 or i == len(rest) - 1:
                    order.append(rest.pop(i))
                    break
        return order

    # -- the attempt loop -----------------------------------------------------------------------

    def dispatch(self, candidates: Iterator[Candidate], call: Callable[[Candidate], T], *,
                 started: float, reserve: Callable[[Candidate], bool] | None = None,
                 release: Callable[[Candidate], None] | None = None,
                 on_attempt: Callable[[Candidate], None] | None = None,
                 wait: Callable[[list[Candidate]], Candidate] | None = None) -> tuple[Candidate, T]:
        """Call candidates in order until one answers; returns it and its answer.

        `reserve(c)` takes the deployment's provider quota (False: at quota, skip it) and
        `release(c)` gives it back when the deployment failed and the request moves on.
        `wait(at_quota)`: when nothing could be attempted because deployments were at their
        quota, it waits for a slot of one of them (the candidates skipped for their quota, in
        order) and returns the candidate whose quota it reserved, which is then attempted; it
        raises NoDeploymentAvailable itself when no slot came in time.
        A deployment whose provider is not configured is never called (and its breaker never
        hears of it). Raises the last ProviderError when every attempt failed,
        NoDeploymentAvailable when nothing could be attempted."""
        policy, health, clock = self.policy, self.health, self.clock
        attempts = 0
        quota_full = circuits_open = 0
        retry_in = 0.0
        last_error: ProviderError | None = None
        not_configured: list[str] = []
        at_quota: list[Candidate] = []
        for cand in candidates:
            if attempts >= policy.max_attempts or (attempts and clock() - started >= policy.deadline_s):
                break
            missing = self.unconfigured(cand.deployment.provider)
            if missing:
                reason = f"provider '{cand.deployment.provider}' is not configured (set {', '.join(missing)})"
                if reason not in not_configured:
                    not_configured.append(reason)
                continue
            rec = cand.health
            if not rec.breaker.allow():
                circuits_open += 1
                retry_in = min(retry_in, rec.breaker.retry_in()) if retry_in else rec.breaker.retry_in()
                continue
            if reserve is not None and not reserve(cand):
                quota_full += 1
                at_quota.append(cand)
                self._unclaim_probe(rec)
                continue
            self._model_used[cand.entry.alias] = clock()
            if on_attempt is not None:
                on_attempt(cand)
            tries = 0
            while True:
                attempts += 1
                tries += 1
                t0 = clock()
                try:
                    result = call(cand)
                except ProviderError as exc:
                    last_error = exc
                    health.failure(rec, exc, trips_breaker=exc.kind not in _NEUTRAL_KINDS)
                    if exc.kind in _STOP_KINDS:
                        raise
                    delay = None
                    if attempts < policy.max_attempts and rec.breaker.state == "closed":
                        delay = policy.delay_before_retry(exc, tries, clock() - started, self.rng)
                    if delay is None:
                        log.info("deployment %s failed (%s, HTTP %s): next candidate", rec.name,
                                 exc.kind, exc.upstream_status)
                        break
                    log.info("deployment %s failed (%s, HTTP %s): retry in %.3fs", rec.name, exc.kind,
                             exc.upstream_status, delay)
                    self.sleep(delay)
                    continue
                except Exception:
                    health.failure(rec, None)
                    raise
                health.success(rec, clock() - t0)
                return cand, result
            if release is not None:
                release(cand)
        if last_error is not None:
            raise last_error
        if wait is not None and at_quota and not attempts:
            chosen = wait(at_quota)  # its quota is reserved: attempt it without reserving again
            return self.dispatch(iter([chosen]), call, started=started, release=release, on_attempt=on_attempt)
        raise NoDeploymentAvailable(quota_full, circuits_open, retry_in, not_configured)

    @staticmethod
    def _unclaim_probe(rec: DeploymentHealth) -> None:
        """A half-open probe that never went out (quota full) frees its slot."""
        if rec.breaker.state == "half_open":
            rec.breaker.probe_started = None
