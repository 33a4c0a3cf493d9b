"""Stored responses on the real PostgreSQL: saved rows are read back by their tenant only; a
lookup of a stored id whose save has not landed yet waits for it (the next turn of a
conversation sent right after the answer); unknown ids are not waited for; delete; prune by age."""
from __future__ import annotations

import re
import threading
import time
from datetime import datetime, timezone

import pytest

import db_manager
from app.services.response_store import ResponseStore, input_item_list, may_be_pending, new_response_id

pytestmark = pytest.mark.timeout(60)


def body(response_id: str) -> dict:
    return {"id": response_id, "object": "response", "model": "m", "status": "completed",
            "output": [{"type": "message", "id": "msg_1", "role": "assistant", "status": "completed",
                        "content": [{"type": "output_text", "text": "hi", "annotations": []}]}]}


def save(store: ResponseStore, response_id: str, tenant: int = 1, created_at: datetime | None = None) -> None:
    store.save(body(response_id), tenant_id=tenant, api_key_id=7, history=[{"role": "user", "content": "a"}],
               input_items=[{"type": "message", "role": "user", "content": "b"}], created_at=created_at)


class CountingStore(ResponseStore):
    """Counts lookups; `missed` is set after the first lookup that found nothing."""

    def __init__(self, engine, **kw) -> None:
        super().__init__(engine, **kw)
        self.lookups = 0
        self.missed = threading.Event()

    def _row(self, response_id):
        row = super()._row(response_id)
        self.lookups += 1
        if row is None:
            self.missed.set()
        return row


def test_response_ids_look_like_openai_ids_and_say_whether_a_save_may_follow():
    stored, unstored = new_response_id(True), new_response_id(False)
    assert re.fullmatch(r"resp_[0-9a-f]{48}", stored) and re.fullmatch(r"resp_[0-9a-f]{48}", unstored)
    assert may_be_pending(stored) and not may_be_pending(unstored)
    assert not may_be_pending(stored, now=time.time() + 3 * 3600)  # minted long ago
    assert not may_be_pending("resp_67ccd2bed1ec8190b14f964abc0542670bb6a6b452d3795b")  # not minted here


def test_saved_response_is_read_back_by_its_tenant_only(clean_db):
    store = ResponseStore(clean_db, wait_s=0)
    rid = new_response_id(True)
    save(store, rid, tenant=1)
    row = store.get(rid, 1)
    assert row.body["output"][0]["content"][0]["text"] == "hi" and row.api_key_id == 7
    assert row.history == [{"role": "user", "content": "a"}]
    assert store.get(rid, 2) is None


def test_lookup_waits_for_a_save_that_lands_after_it_started(clean_db):
    store = CountingStore(clean_db, wait_s=20)
    rid = new_response_id(True)
    saver = threading.Thread(target=lambda: (store.missed.wait(20), save(ResponseStore(clean_db), rid)))
    saver.start()
    row = store.get(rid, 1)
    saver.join()
    assert row is not None and row.id == rid and store.lookups >= 2


def test_unknown_ids_that_no_save_can_follow_are_not_waited_for(clean_db):
    store = CountingStore(clean_db, wait_s=20)
    assert store.get(new_response_id(False), 1) is None
    assert store.get("resp_nope", 1) is None
    assert store.lookups == 2


def test_delete_only_by_the_owning_tenant(clean_db):
    store = ResponseStore(clean_db, wait_s=0)
    rid = new_response_id(True)
    save(store, rid, tenant=1)
    assert store.delete(rid, 2) is False and store.get(rid, 1) is not None
    assert store.delete(rid, 1) is True and store.get(rid, 1) is None


def test_prune_responses_command_deletes_rows_older_than_the_cutoff(clean_db, pg_url, capsys):
    store = ResponseStore(clean_db, wait_s=0)
    old, new = new_response_id(True), new_response_id(True)
    save(store, old, created_at=datetime(2025, 12, 31, 23, 59, tzinfo=timezone.utc))
    save(store, new, created_at=datetime(2026, 1, 1, tzinfo=timezone.utc))
    assert db_manager.main(["--database-url", pg_url, "prune-responses", "--older-than", "2026-01-01"]) == 0
    assert "1 deleted" in capsys.readouterr().out
    assert store.get(old, 1) is None and store.get(new, 1) is not None


def test_input_items_are_listed_with_ids_and_content_parts():
    items = input_item_list([{"type": "message", "role": "user", "content": "hello"},
                             {"type": "function_call_output", "call_id": "c1", "output": "21"}])
    assert items[0]["id"].startswith("msg_") and items[1]["id"].startswith("fco_")
    assert items[0]["content"] == [{"type": "input_text", "text": "hello"}]
    assert items[0]["status"] == items[1]["status"] == "completed"


def test_embedded_sqlite_keeps_stored_responses(tmp_path):
    """Embedded mode (no PostgreSQL): the migration creates the table in SQLite and the store
    saves, reads, deletes and prunes there too."""
    from sqlalchemy import create_engine

    url = f"sqlite:///{tmp_path}/gw.db"
    db_manager.upgrade(url)
    engine = create_engine(url)
    try:
        store = ResponseStore(engine, wait_s=0)
        rid = new_response_id(True)
        save(store, rid, created_at=datetime(2025, 1, 1, tzinfo=timezone.utc))
        assert store.get(rid, 1).body["output"][0]["content"][0]["text"] == "hi"
        assert store.get(rid, 2) is None
        assert store.prune(datetime(2025, 1, 2, tzinfo=timezone.utc)) == 1 and store.get(rid, 1) is None
    finally:
        engine.dispose()


def test_scheduled_maintenance_prunes_stored_responses_past_their_retention(clean_db):
    """`db_manager maintain` (app/services/maintenance.upkeep) deletes stored responses older
    than RESPONSES_RETENTION_DAYS days before today's midnight (UTC) and keeps the others."""
    from app.services.maintenance import upkeep

    store = ResponseStore(clean_db, wait_s=0)
    old, kept = new_response_id(True), new_response_id(True)
    save(store, old, created_at=datetime(2026, 3, 1, 23, 59, tzinfo=timezone.utc))
    save(store, kept, created_at=datetime(2026, 3, 2, tzinfo=timezone.utc))
    run = upkeep(clean_db, 0, 0, now=datetime(2026, 3, 31, 12, tzinfo=timezone.utc), responses_retention_days=29)
    assert run.responses_pruned == 1 and "1 stored response(s) deleted" in run.summary()
    assert store.get(old, 1) is None and store.get(kept, 1) is not None
