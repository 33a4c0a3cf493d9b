"""The runtime's lifecycle (app/runtime.py): building starts nothing, start() starts every
background thread once however many threads call it (run.py's threaded server), close()
stores what is queued and ends every thread."""
from __future__ import annotations

import threading

import pytest

from app.config import Settings
from app.runtime import Runtime, build_runtime
from app.services.usage_service import UsageEvent
from Testing.conftest import app_config, usage_rows
from Testing.support import wait_until

pytestmark = pytest.mark.timeout(60)


def _threads(rt: Runtime) -> dict[str, threading.Thread | None]:
    return {"usage-writer": rt.usage_batcher._thread, "usage-outbox": rt.usage_batcher._flusher,
            "limiter-settlement": rt.limiter._thread, "key-events": rt.key_events._thread,
            "health-publisher": rt.health._publisher}


@pytest.fixture
def settings(pg_url, models_file, clean_db) -> Settings:
    return Settings.from_env({k: str(v) for k, v in app_config(pg_url, models_file).items()})


def test_building_starts_nothing_and_close_without_start_stores_the_queue(settings, clean_db):
    """A built runtime has every object and no thread; a usage row submitted before start()
    is stored by close()."""
    rt = build_runtime(settings)
    assert set(_threads(rt).values()) == {None}
    assert not rt.started
    event = UsageEvent(request_id="rt-unstarted", tenant_id=1, api_key_id=1, model="demo")
    rt.usage_batcher.submit(event)
    assert rt.close(timeout=5) is True
    assert [r["request_id"] for r in usage_rows(clean_db)] == ["rt-unstarted"]


def test_start_from_many_threads_starts_each_consumer_once_and_close_ends_them(settings):
    """16 threads call start() at once: one usage writer, one outbox flusher, one settlement
    sender, one key-event listener, one health publisher, all running; close() ends all five."""
    rt = build_runtime(settings)
    gate = threading.Barrier(16)
    seen: list[dict[str, threading.Thread | None]] = []

    def race() -> None:
        gate.wait()
        rt.start()
        seen.append(_threads(rt))
    callers = [threading.Thread(target=race) for _ in range(16)]
    for t in callers:
        t.start()
    for t in callers:
        t.join()
    try:
        first = seen[0]
        assert len(seen) == 16 and all(s == first for s in seen)
        assert sorted(first) == ["health-publisher", "key-events", "limiter-settlement", "usage-outbox",
                                 "usage-writer"]
        assert all(t is not None and t.is_alive() and t.name == name for name, t in first.items())
        rt.start()
        assert _threads(rt) == first
    finally:
        assert rt.close(timeout=5) is True
    wait_until(lambda: not any(t.is_alive() for t in first.values()), timeout=10,
               message="every background thread to end")
    rt.start()  # a closed runtime is not started again
    assert _threads(rt) == first and not any(t.is_alive() for t in first.values())
