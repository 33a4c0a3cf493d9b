"""Routing: candidate order (priority, weights, fallbacks, context window, categories) and the
attempt loop (retries, backoff, deadline, Retry-After, breakers, quotas), with a fake clock and
a seeded random generator; no upstream, no sleeping."""
from __future__ import annotations

import random
from collections import Counter
from typing import Any

import pytest

from app.providers.base import (ProviderAuthError, ProviderBadRequest, ProviderContextTooLong,
                                ProviderRateLimited, ProviderUnavailable)
from app.providers.catalog import parse_catalog
from app.services.circuit_breaker import OPEN, BreakerConfig
from app.services.provider_health import HealthBoard
from app.services.retry_policy import RetryPolicy
from app.services.router import ContextTooLong, NoDeploymentAvailable, RequestSize, Router


class Clock:
    def __init__(self) -> None:
        self.now = 100.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, s: float) -> None:
        self.sleeps.append(s)
        self.now += s


def model(deps: list[tuple[str, int, int]], **extra: Any) -> dict:
    return {"deployments": [{"provider": "p", "model": m, "priority": pr, "weight": w} for m, pr, w in deps],
            "context_window": extra.pop("context_window", 1000), **extra}


def router(models: dict, policy: RetryPolicy | None = None, seed: int = 1,
           breaker: BreakerConfig | None = None) -> tuple[Router, Clock]:
    catalog = parse_catalog({"providers": {"p": {"type": "openai", "base_url": "http://x"}}, "models": models})
    clock = Clock()
    health = HealthBoard(breaker or BreakerConfig(failure_threshold=3, cooldown_s=10), clock=clock)
    policy = policy or RetryPolicy(base_s=0.1, max_backoff_s=1, deadline_s=30, attempts_per_deployment=2)
    return Router(catalog, health, policy, rng=random.Random(seed), clock=clock, sleep=clock.sleep), clock


def size(tokens: int = 10, output: int = 1) -> RequestSize:
    return RequestSize(tokens, 0, output, lambda tok: tokens)


def order(r: Router, name: str, req: RequestSize | None = None, may_use=lambda a: True) -> list[str]:
    return [c.deployment.model for c in r.candidates(r.models_for(name, req or size(), may_use))]


def test_priority_order_lowest_number_first():
    """Deployments are tried by priority, the lowest number first, whatever the file order."""
    r, _ = router({"m": model([("c", 3, 1), ("a", 1, 1), ("b", 2, 1)])})
    for _ in range(20):
        assert order(r, "m") == ["a", "b", "c"]


def test_weights_among_equal_priorities_statistically():
    """Among equal priorities the first choice follows the weights (1:2:7, seeded draws), and
    every deployment still comes once in each order."""
    r, _ = router({"m": model([("w1", 1, 1), ("w2", 1, 2), ("w7", 1, 7), ("last", 2, 1)])}, seed=42)
    firsts: Counter[str] = Counter()
    n = 20000
    for _ in range(n):
        o = order(r, "m")
        assert sorted(o[:3]) == ["w1", "w2", "w7"] and o[3] == "last"
        firsts[o[0]] += 1
    assert abs(firsts["w1"] / n - 0.1) < 0.01
    assert abs(firsts["w2"] / n - 0.2) < 0.015
    assert abs(firsts["w7"] / n - 0.7) < 0.015


def test_alias_fallbacks_in_order_each_once():
    """An alias's deployments come first, then its fallbacks' (recursively, no repeats), and
    fallbacks the key may not use are left out."""
    r, _ = router({"x": model([("x1", 1, 1)], fallbacks=["y", "z"]),
                   "y": model([("y1", 1, 1), ("y2", 2, 1)], fallbacks=["z", "x", "secret"]),
                   "z": model([("z1", 1, 1)]), "secret": model([("s1", 1, 1)])})
    assert order(r, "x", may_use=lambda a: a != "secret") == ["x1", "y1", "y2", "z1"]
    assert order(r, "x") == ["x1", "y1", "y2", "z1", "s1"]


def test_context_window_fallback_and_none_fits():
    """A model too small for prompt + output is skipped for the next that fits; when none
    fits, ContextTooLong says how many tokens were needed and the largest window."""
    r, _ = router({"small-ctx": model([("s", 1, 1)], context_window=100, fallbacks=["big-ctx"]),
                   "big-ctx": model([("b", 1, 1)], context_window=5000)})
    assert order(r, "small-ctx", size(50, 40)) == ["s", "b"]
    assert order(r, "small-ctx", size(50, 60)) == ["b"]
    with pytest.raises(ContextTooLong) as err:
        order(r, "small-ctx", size(4990, 20))
    assert (err.value.needed, err.value.largest) == (5010, 5000)


def test_short_requests_are_not_counted_with_tiktoken():
    """A body whose byte size already fits every window is never tokenized (hot path)."""
    calls = []
    req = RequestSize(200, 2, 10, lambda tok: calls.append(tok) or 50)
    r, _ = router({"m": model([("a", 1, 1)], context_window=1000)})
    assert order(r, "m", req) == ["a"] and calls == []
    r2, _ = router({"m": model([("a", 1, 1)], context_window=100)})
    assert order(r2, "m", req) == ["a"] and calls == ["o200k_base"]


def test_category_picks_fitting_available_best_priority_least_recently_used():
    """`small` chooses among small models: only those that fit, open circuits last, best
    priority first, then the least recently used; `auto` considers every model."""
    r, clock = router({
        "s-a": model([("a", 1, 1)], category="small", context_window=1000),
        "s-b": model([("b", 1, 1)], category="small", context_window=1000),
        "s-low": model([("c", 2, 1)], category="small", context_window=1000),
        "s-tiny": model([("t", 1, 1)], category="small", context_window=20),
        "big": model([("g", 1, 1)], category="big", context_window=100000),
    })
    req = size(50)
    assert [m.alias for m in r.models_for("small", req, lambda a: True)] == ["s-a", "s-b", "s-low"]
    ok = lambda c: "fine"  # noqa: E731
    used = []
    for _ in range(4):
        cand, _ = r.dispatch(r.candidates(r.models_for("small", req, lambda a: True)), ok, started=clock())
        used.append(cand.entry.alias)
        clock.now += 1
    assert used == ["s-a", "s-b", "s-a", "s-b"]  # least recently used among the best priority
    for _ in range(3):
        r.health.failure(r.health.get("p/a"), ProviderUnavailable("down"))
        r.health.failure(r.health.get("p/b"), ProviderUnavailable("down"))
    assert [m.alias for m in r.models_for("small", req, lambda a: True)] == ["s-low", "s-a", "s-b"]
    assert [m.alias for m in r.models_for("auto", size(5000), lambda a: True)] == ["big"]


class Script:
    """A provider call that fails as scripted per deployment, then answers."""

    def __init__(self, clock: Clock, plan: dict[str, list[Exception]], duration: float = 0.0) -> None:
        self.clock, self.plan, self.duration = clock, plan, duration
        self.calls: list[str] = []

    def __call__(self, cand) -> str:
        name = cand.deployment.model
        self.calls.append(name)
        self.clock.now += self.duration
        errors = self.plan.get(name) or []
        if errors:
            raise errors.pop(0)
        return f"answer from {name}"


def run(r: Router, clock: Clock, name: str, script: Script, **kw):
    return r.dispatch(r.candidates(r.models_for(name, size(), lambda a: True)), script,
                      started=clock(), **kw)


def test_retryable_error_is_retried_on_the_same_deployment_with_backoff():
    """A 5xx is retried on the same deployment after a jittered wait within the bounds."""
    r, clock = router({"m": model([("a", 1, 1), ("b", 2, 1)])})
    script = Script(clock, {"a": [ProviderUnavailable("500")]})
    cand, answer = run(r, clock, "m", script)
    assert answer == "answer from a" and script.calls == ["a", "a"]
    assert len(clock.sleeps) == 1 and 0 <= clock.sleeps[0] <= 0.1


def test_retries_exhausted_fall_back_to_the_next_deployment():
    """After attempts_per_deployment failures the next deployment answers."""
    r, clock = router({"m": model([("a", 1, 1), ("b", 2, 1)])})
    script = Script(clock, {"a": [ProviderUnavailable("500"), ProviderUnavailable("500")]})
    cand, answer = run(r, clock, "m", script)
    assert script.calls == ["a", "a", "b"] and answer == "answer from b"


def test_non_retryable_errors_are_not_retried_on_the_same_deployment():
    """Auth and context errors move on at once (no wait, no second call to that deployment);
    a plain bad request ends the request (every provider would refuse it)."""
    r, clock = router({"m": model([("a", 1, 1), ("b", 2, 1), ("c", 3, 1)])})
    script = Script(clock, {"a": [ProviderAuthError("401")], "b": [ProviderContextTooLong("ctx")]})
    _, answer = run(r, clock, "m", script)
    assert script.calls == ["a", "b", "c"] and clock.sleeps == [] and answer == "answer from c"
    assert r.health.get("p/b").breaker.consecutive == 0  # the request did not fit: not b's fault
    script = Script(clock, {"a": [ProviderBadRequest("400")]})
    with pytest.raises(ProviderBadRequest):
        run(r, clock, "m", script)
    assert script.calls == ["a"]


def test_retry_after_is_honoured():
    """A 429 with Retry-After waits at least that long before calling the deployment again."""
    r, clock = router({"m": model([("a", 1, 1)])},
                      RetryPolicy(base_s=0.01, max_backoff_s=0.01, max_retry_after_s=5, deadline_s=30))
    script = Script(clock, {"a": [ProviderRateLimited("429", retry_after=2.5)]})
    run(r, clock, "m", script)
    assert script.calls == ["a", "a"] and clock.sleeps[0] >= 2.5


def test_deadline_stops_new_attempts_and_the_last_error_is_raised():
    """No attempt starts after the total deadline; the client gets the last upstream error."""
    r, clock = router({"m": model([("a", 1, 1), ("b", 2, 1), ("c", 3, 1)])},
                      RetryPolicy(base_s=0.01, max_backoff_s=0.01, deadline_s=5, max_attempts=10))
    script = Script(clock, {"a": [ProviderUnavailable("1")] * 2, "b": [ProviderUnavailable("2")] * 2,
                            "c": [ProviderUnavailable("3")] * 2}, duration=2.0)
    with pytest.raises(ProviderUnavailable):
        run(r, clock, "m", script)
    assert len(script.calls) == 3 and clock.now - 100 <= 5 + 2.0 + 0.02


def test_max_attempts_bounds_the_calls():
    """The total number of upstream calls per request is bounded by max_attempts."""
    r, clock = router({"m": model([(f"d{i}", i, 1) for i in range(1, 6)])},
                      RetryPolicy(base_s=0.001, max_backoff_s=0.001, max_attempts=3))
    script = Script(clock, {f"d{i}": [ProviderUnavailable("x")] * 2 for i in range(1, 6)})
    with pytest.raises(ProviderUnavailable):
        run(r, clock, "m", script)
    assert len(script.calls) == 3


def test_open_circuit_is_skipped_then_probed_and_closed():
    """Repeated failures open a deployment's circuit: later requests skip it (no call) until
    the cooldown, then one probe goes through and its success closes the circuit."""
    r, clock = router({"m": model([("a", 1, 1), ("b", 2, 1)])},
                      RetryPolicy(attempts_per_deployment=1, base_s=0.001, max_backoff_s=0.001))
    script = Script(clock, {"a": [ProviderUnavailable("down")] * 3})
    for _ in range(3):
        run(r, clock, "m", script)
    assert r.health.get("p/a").breaker.state == OPEN
    script.calls.clear()
    run(r, clock, "m", script)
    assert script.calls == ["b"]
    clock.now += 10.5
    run(r, clock, "m", script)
    assert script.calls == ["b", "a"] and r.health.get("p/a").breaker.state == "closed"


def test_nothing_attemptable_reports_why():
    """All circuits open, or all quotas full: NoDeploymentAvailable says which and when to retry."""
    r, clock = router({"m": model([("a", 1, 1)])})
    for _ in range(3):
        r.health.failure(r.health.get("p/a"), ProviderUnavailable("down"))
    with pytest.raises(NoDeploymentAvailable) as err:
        run(r, clock, "m", Script(clock, {}))
    assert err.value.circuits_open == 1 and 9 < err.value.retry_in_s <= 10
    r2, clock2 = router({"m": model([("a", 1, 1), ("b", 2, 1)])})
    with pytest.raises(NoDeploymentAvailable) as err:
        run(r2, clock2, "m", Script(clock2, {}), reserve=lambda c: False)
    assert err.value.quota_full == 2


def test_failed_deployment_quota_is_released_before_moving_on():
    """The quota taken on a deployment that failed is given back when the request moves on."""
    r, clock = router({"m": model([("a", 1, 1), ("b", 2, 1)])}, RetryPolicy(attempts_per_deployment=1))
    reserved, released = [], []
    script = Script(clock, {"a": [ProviderUnavailable("down")]})
    run(r, clock, "m", script, reserve=lambda c: reserved.append(c.deployment.model) or True,
        release=lambda c: released.append(c.deployment.model))
    assert reserved == ["a", "b"] and released == ["a"]


def test_deployment_of_an_unconfigured_provider_is_never_called_nor_counted_by_its_breaker():
    """A deployment whose provider lacks its environment variables is skipped before any call:
    the next one serves, its breaker stays closed with no request recorded; with nothing
    else to try, NoDeploymentAvailable names what is missing (it is not a provider error)."""
    catalog = parse_catalog({"providers": {"p": {"type": "openai", "base_url": "http://x"},
                                           "q": {"type": "openai", "base_url": "http://y"}},
                             "models": {"m": {"deployments": [{"provider": "q", "model": "a", "priority": 1},
                                                              {"provider": "p", "model": "b", "priority": 2}],
                                              "context_window": 1000},
                                        "only-q": {"deployments": [{"provider": "q", "model": "a"}],
                                                   "context_window": 1000}}})
    clock = Clock()
    health = HealthBoard(BreakerConfig(failure_threshold=1, cooldown_s=10), clock=clock)
    r = Router(catalog, health, RetryPolicy(), clock=clock, sleep=clock.sleep,
               unconfigured=lambda provider: ["Q_API_KEY"] if provider == "q" else [])
    called: list[str] = []

    def call(c):
        called.append(c.deployment.model)
        return "ok"

    for _ in range(3):
        cand, result = r.dispatch(r.candidates(r.models_for("m", size(), lambda a: True)), call, started=clock())
        assert (cand.deployment.model, result) == ("b", "ok")
    assert called == ["b", "b", "b"]
    rec = health.get("q/a")
    assert (rec.breaker.state, rec.requests, rec.failures) == ("closed", 0, 0)
    with pytest.raises(NoDeploymentAvailable) as info:
        r.dispatch(r.candidates(r.models_for("only-q", size(), lambda a: True)), call, started=clock())
    assert info.value.not_configured == ["provider 'q' is not configured (set Q_API_KEY)"]
    assert (info.value.quota_full, info.value.circuits_open) == (0, 0)
    assert called == ["b", "b", "b"] and health.get("q/a").breaker.state == "closed"
